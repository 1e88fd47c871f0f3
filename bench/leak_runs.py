"""Leakage on the demo model: train the demo's LoRA with several settings through the engine, print the
"did it learn?" report's leakage per epoch and keep every run's LoRA files for bench/leak_classify.py.

    OMP_NUM_THREADS=1 python bench/leak_runs.py good over15 over long slow unetonly

Data: the demo's 16 star pictures (`write_concept_images(..., 16, seed=1)`), settings `commands.demo.demo_config`
(seed 1) with the overrides in RUNS. Files under --out (default /tmp/leak/work); reports as <run>.json there.
Results: bench/results/learn_thresholds_demo_cpu.md, section "Leakage".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVER = {"rank": 32, "alpha": 32.0, "learning_rate": 3e-3, "text_encoder_lr": 3e-3}
RUNS = {
    "good": {"epochs": 15, "save_every_n_epochs": 5},  # the demo's settings, 15 epochs
    "demo": {"epochs": 30, "save_every_n_epochs": 10},  # the demo's own run
    "over15": {"epochs": 15, **OVER},
    "over": {"epochs": 60, "save_every_n_epochs": 15, **OVER},
    "long": {"epochs": 60, "save_every_n_epochs": 30},  # the demo's settings, four times as long
    "slow": {"epochs": 15, "learning_rate": 3e-4, "text_encoder_lr": 1.5e-4},
    "unetonly": {"epochs": 60, "save_every_n_epochs": 30, "rank": 32, "alpha": 32.0, "train_text_encoder": False},
}


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.commands.demo import demo_config
    from lora_trainer.dataset.prepare import prepare_dataset
    from lora_trainer.demo import DEMO_MODEL, TRIGGER
    from lora_trainer.demo.dataset import write_concept_images
    from lora_trainer.models.loader import load_model
    from lora_trainer.train import run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", choices=list(RUNS))
    p.add_argument("--out", default="/tmp/leak/work")
    p.add_argument("--seed", type=int, default=1, help="training seed (the pictures keep seed 1)")
    args = p.parse_args(argv)
    work = Path(args.out)
    if not (work / "dataset").exists():
        write_concept_images(work / "images", 16, seed=1)
        prepare_dataset(work / "images", work / "dataset", TRIGGER, repeats=1, resolution=64)
    bundle = load_model(DEMO_MODEL, dtype=torch.float32)
    for name in args.runs:
        settings = dict(RUNS[name])
        config = demo_config(str(DEMO_MODEL), work / "dataset", work / name, epochs=settings.pop("epochs"),
                             seed=args.seed, device="cpu")
        for key, value in settings.items():
            setattr(config, key, value)
        started = time.time()
        report = run_training(config, bundle=bundle, owns_bundle=False).report
        print(f"{name} (seed {args.seed}): {time.time() - started:.0f} s, {report['verdict']}, "
              f"best epoch {report['best_epoch']}: {report['message']}")
        print("  leakage per epoch:", [round(e["leak"], 3) for e in report["epochs"]])
        print("  improvement per epoch:", [round(e["improvement"], 3) for e in report["epochs"]], flush=True)
        (work / f"{name}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
