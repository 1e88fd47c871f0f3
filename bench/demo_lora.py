"""Train the demo's LoRA (the star) on a demo-world model and measure it with the shape classifier.

    python bench/demo_lora.py --model MODEL.safetensors --out DIR [--optimizer AdamW|Prodigy]
        [--lr 2e-3] [--epochs 30] [--save-every 5] [--images 24] [--n 16] [--seed 1] [--rank 8] --json RESULT.json

For every saved epoch, and for the epoch the "did it learn?" report picked as best: the share of
"<colour> demostar, <colour> background" pictures the classifier reads as a star, with that LoRA and
without any (same prompts and seeds), plus training CPU time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lora_trainer.demo.classifier import train_classifier
from lora_trainer.demo.measure import star_share
from lora_trainer.train.report import LEAK_MAX_OTHER


def main(argv: list[str] | None = None) -> int:
    from lora_trainer.commands.demo import demo_config
    from lora_trainer.dataset.prepare import prepare_dataset
    from lora_trainer.demo import TRIGGER
    from lora_trainer.demo.dataset import write_concept_images
    from lora_trainer.models.loader import load_model
    from lora_trainer.train import run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--optimizer", default="AdamW")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--te-lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--n", type=int, default=16, help="pictures per measurement")
    p.add_argument("--sample-steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=1, help="training seed (the pictures keep seed 1)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--picks-only", action="store_true",
                   help="save every epoch but measure only the last, the report's best and the lowest-loss epoch")
    args = p.parse_args(argv)
    out = Path(args.out)
    write_concept_images(out / "images", args.images, seed=1)
    dataset = prepare_dataset(out / "images", out / "dataset", TRIGGER, repeats=1, resolution=64)
    config = demo_config(args.model, dataset.out, out / "lora", epochs=args.epochs, seed=args.seed,
                         device="cpu")
    config.rank, config.alpha = args.rank, float(args.rank)
    config.optimizer, config.save_every_n_epochs = args.optimizer, 1 if args.picks_only else args.save_every
    config.learning_rate, config.text_encoder_lr = args.lr, args.te_lr
    bundle = load_model(Path(args.model), dtype=torch.float32)
    result: dict = {"command": "python bench/demo_lora.py " + " ".join(argv or __import__("sys").argv[1:]),
                    "machine": f"{platform.machine()} CPU, torch {torch.__version__}", "settings": config.to_dict()
                    if hasattr(config, "to_dict") else str(config)}
    cpu, wall = time.process_time(), time.perf_counter()
    trained = run_training(config, bundle=bundle, owns_bundle=False)
    result["train"] = {"steps": trained.steps, "cpu_s": round(time.process_time() - cpu, 1),
                       "wall_s": round(time.perf_counter() - wall, 1), "first_loss": trained.losses[0],
                       "last_loss": trained.losses[-1]}
    print(result["train"], flush=True)
    classifier = train_classifier(steps=300, batch=64)
    result["star_share"] = {"base": star_share(bundle, classifier, None, n=args.n, steps=args.sample_steps)}
    report = trained.report or {}
    result["best_epoch"], best = report.get("best_epoch"), report.get("best_path")
    result["best_path"] = best
    result["verdict"], result["message"] = report.get("verdict"), report.get("message")
    result["epochs"] = [{k: e.get(k) for k in ("epoch", "val_loss", "improvement", "leak")}
                        for e in report.get("epochs", [])]
    measured = [*trained.saved, *([Path(best)] if best else [])]
    if args.picks_only:  # the last epoch (the final file), the report's pick and the plain lowest loss
        # the pick before the noise rule: the lowest validation loss among the epochs that do not leak
        clean = [e for e in report.get("epochs", []) if e.get("leak") is None or e["leak"] <= LEAK_MAX_OTHER]
        low = min(clean, key=lambda e: e["val_loss"])["epoch"] if clean else None
        result["lowest_loss_epoch"] = low
        by_epoch = {int(q.stem.rsplit("-", 1)[1]): q for q in trained.saved if q.stem.rsplit("-", 1)[-1].isdigit()}
        measured = [trained.lora_path, *([Path(best)] if best else []), *([by_epoch[low]] if low in by_epoch else [])]
    for path in dict.fromkeys(measured):
        result["star_share"][path.stem] = star_share(bundle, classifier, path, n=args.n, steps=args.sample_steps)
        print(path.stem, result["star_share"][path.stem], flush=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
