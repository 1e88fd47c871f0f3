"""What demo LoRAs draw where another shape is asked for: `<colour> <seen shape>, <colour> background`
prompts, generated with each LoRA file (and "base": none) and read by the package's shape classifier.

    OMP_NUM_THREADS=1 python bench/leak_classify.py 96 31 base /tmp/leak/work/good/demo-lora.safetensors ...

Arguments: generations, prompt seed, LoRA files. Prints per file the share read as the shape asked for,
the share read as a star and the mean P(star) (12 Euler steps, CFG 5, image seeds 100...; classifier: 300
steps, cached in --classifier). Results: bench/results/learn_thresholds_demo_cpu.md, section "Leakage".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.demo import DEMO_MODEL
    from lora_trainer.demo.classifier import train_classifier
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, sample_scenes
    from lora_trainer.lora import applied_lora
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("n", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("loras", nargs="+", help='LoRA files, or "base" for none')
    p.add_argument("--classifier", default="/tmp/leak/clf.pt")
    p.add_argument("--model", default=str(DEMO_MODEL), help="a demo-world checkpoint (default: the shipped one)")
    args = p.parse_args(argv)
    bundle = load_model(args.model, dtype=torch.float32)
    cached = Path(args.classifier)
    if cached.exists():
        clf = torch.load(cached, weights_only=False)
    else:
        clf = train_classifier(steps=300, batch=64)
        torch.save(clf, cached)
    clf.eval()
    scenes = sample_scenes(args.n, torch.Generator().manual_seed(args.seed), shapes=SEEN_SHAPES)
    prompts, asked = scenes.captions(), scenes.shapes()
    star = clf.classes.index(HELD_OUT)
    for lora in args.loras:
        with applied_lora(bundle, None if lora == "base" else lora), torch.no_grad():
            probs = clf(generate_batch(bundle, prompts, seed=100, steps=12)).softmax(1)
        labels = [clf.classes[int(i)] for i in probs.argmax(1)]
        print(lora, {"asked_shape": round(sum(a == b for a, b in zip(labels, asked)) / args.n, 3),
                     "star": round(labels.count(HELD_OUT) / args.n, 3),
                     "mean_p_star": round(float(probs[:, star].mean()), 3)}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
