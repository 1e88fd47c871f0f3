"""docs/demo-model-samples.png: what the demo models draw without a LoRA, one row per model, one column per prompt
(seen shapes in given colours, then `demostar` and `star`, neither of which the denoisers saw), twice with image
seeds 3.. (Euler, 20 steps, CFG 5, CPU).

    python bench/demo_samples.py docs/demo-model-samples.png lora_trainer/demo/model/shapes-sd1.safetensors \\
        bench/demo_models/shapes-mini.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("red circle, blue background", "yellow square, purple background", "blue triangle, yellow background",
           "green diamond, pink background", "white ring, black background", "purple cross, orange background",
           "orange demostar, teal background", "orange star, teal background")


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.commands.demo import ab_grid
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import to_pil
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("models", nargs="+")
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        bundle = load_model(model, dtype=torch.float32)
        rows.append(to_pil(generate_batch(bundle, list(PROMPTS) * 2, seed=3, steps=20, cfg_scale=5.0)))
    ab_grid(rows, labels=tuple(Path(m).stem for m in args.models)).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
