"""Candidate leakage measures on saved demo LoRA files, outside the engine (the first ones tried).

    OMP_NUM_THREADS=1 python bench/leak_probes.py --data /tmp/leak/work/dataset LORA.safetensors...

16 pure-noise probes (timesteps 999-650, noise seed 5), one per training caption, scored by the base model
and by each LoRA (loaded with lora.applied_lora) with the caption, the caption without the trigger and the
empty caption. Prints per file: "ratio empty/trigger" (mean squared change by the LoRA with the empty
caption / with the captions), "projection (plain)" (the LoRA's change of the trigger-less prediction
projected on its change from there to the triggered one) and "share" (the measure in train/validation.py,
here at these probe levels). Results: bench/results/learn_thresholds_demo_cpu.md, section "Leakage".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.demo import DEMO_MODEL, TRIGGER
    from lora_trainer.lora import applied_lora
    from lora_trainer.models.loader import load_model
    from lora_trainer.train.text import encode_captions
    from lora_trainer.train.validation import strip_trigger

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the Kohya dataset the LoRAs were trained on")
    p.add_argument("loras", nargs="+")
    args = p.parse_args(argv)
    bundle = load_model(DEMO_MODEL, dtype=torch.float32)
    captions = [f.read_text(encoding="utf-8").strip() for f in sorted(Path(args.data).rglob("*.txt"))][:16]
    plain = [strip_trigger(c, [TRIGGER]) or c for c in captions]
    noise = torch.randn(len(captions), 4, 16, 16, generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([999, 950, 900, 850, 800, 750, 700, 650] * 2)[:len(captions)]

    @torch.no_grad()
    def predict(texts: list[str]) -> torch.Tensor:
        return bundle.unet(noise, timesteps, encoder_hidden_states=encode_captions(bundle, texts)[0]).sample

    base_plain, base_trig, base_empty = predict(plain), predict(captions), predict([""] * len(captions))
    for lora in args.loras:
        with applied_lora(bundle, lora):
            trig, without, empty = predict(captions), predict(plain), predict([""] * len(captions))
        ratio = float(((empty - base_empty) ** 2).mean() / ((trig - base_trig) ** 2).mean())
        towards = trig - base_plain
        projection = float(((without - base_plain) * towards).sum() / (towards ** 2).sum())
        share = 1 - float(((trig - without) ** 2).sum() / (towards ** 2).sum())
        print(f"{lora}: ratio empty/trigger {ratio:.3f}, projection (plain) {projection:.3f}, share {share:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
