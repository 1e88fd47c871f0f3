"""What a demo-world checkpoint draws, read by the shape classifier (CPU is fine: the models are tiny).

    python bench/demo_check.py MODEL.safetensors [MODEL2 ...] --out bench/results/demo_check.json
        [--per-shape 16] [--steps 20] [--lora LORA.safetensors]

For each seen shape: the share of pictures prompted "<colour> <shape>, <colour> background" (random
colours) that the classifier names that shape; and the share of "<colour> demostar, ..." pictures
read as a star (the unseen concept; with --lora, also with that LoRA loaded).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lora_trainer.demo.classifier import accuracy, train_classifier
from lora_trainer.demo.measure import generate_batch
from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, sample_scenes


def star_share(bundle, classifier, n: int, steps: int, seed: int = 7) -> float:
    scenes = sample_scenes(n, torch.Generator().manual_seed(seed), shapes=(HELD_OUT,))
    images = generate_batch(bundle, scenes.captions(shape_word="demostar"), seed=seed, steps=steps)
    return classifier.fraction(images, HELD_OUT)


def check(bundle, classifier, *, per_shape: int, steps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, shape in enumerate(SEEN_SHAPES):
        scenes = sample_scenes(per_shape, torch.Generator().manual_seed(100 + k), shapes=(shape,))
        images = generate_batch(bundle, scenes.captions(), seed=1000 * (k + 1), steps=steps)
        out[shape] = round(classifier.fraction(images, shape), 3)
    out["mean_seen"] = round(sum(out[s] for s in SEEN_SHAPES) / len(SEEN_SHAPES), 3)
    out["star_with_trigger"] = round(star_share(bundle, classifier, per_shape, steps), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--per-shape", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--classifier-steps", type=int, default=300)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    classifier = train_classifier(steps=args.classifier_steps, batch=64)
    result = {"command": "python bench/demo_check.py " + " ".join(argv or __import__("sys").argv[1:]),
              "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
              "classifier": {"steps": args.classifier_steps, "accuracy_on_renders": accuracy(classifier),
                             "seconds": round(time.perf_counter() - t0, 1)},
              "models": {}}
    for model in args.models:
        bundle = load_model(Path(model), dtype=torch.float32)
        result["models"][Path(model).stem] = check(bundle, classifier, per_shape=args.per_shape, steps=args.steps)
        print(Path(model).stem, result["models"][Path(model).stem], flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
