#!/usr/bin/env python3
"""Does the next step's batch made ahead (train/step.py `AHEAD_DEVICES`) change a run on this device?

tests/test_train_cuda.py::test_stop_resume_on_cuda_matches failed once on an H100 with it on (2026-12-07) and could
not be re-run. This tells where a difference starts, on a tiny SD1 model (tests/train_support's dataset, 2 epochs of
6 steps, accel off, cuDNN deterministic, no TF32, as that test): four runs, each a fresh bundle with the same seed:

- `after`: each batch made after the step before has ended (the default);
- `ahead`: the batch made ahead;
- `ahead_resumed`: the batch made ahead, stopped after step `--stop-at`, resumed from its state;
- `after_resumed`: the same one step at a time.

For each run it records every batch the step used (checksums of latents, noise and timesteps, in step order) and the
losses, and prints the first step where a run's batches or losses leave `after`'s, with the largest loss difference.
Equal batches with different losses point at the step's arithmetic (nondeterministic kernels), different batches at
the draws or the copies.

    python bench/ahead_check.py --out $OUT/ahead_check.json     # a CUDA machine, about 30 s
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _checksums(batch: dict[str, torch.Tensor]) -> list[float]:
    return [float(batch[k].double().sum()) for k in ("latents", "noise", "timesteps") if k in batch]


def run(kind: str, data: Path, out: Path, device: str, stop_at: int) -> dict:
    from train_support import tiny_config

    from lora_trainer.models.tiny import build_tiny_bundle
    from lora_trainer.train import run_training
    from lora_trainer.train import step as step_mod
    from lora_trainer.train.placement import place_bundle

    step_mod.AHEAD_DEVICES = (device,) if kind.startswith("ahead") else ()
    used: list[list[float]] = []

    # record what each step used: the inputs handed to the runner
    from lora_trainer.accel import graphs

    real_runner_step = graphs.StepRunner.step

    def runner_step(self, batch, *, apply=True):
        used.append(_checksums(batch))
        return real_runner_step(self, batch, apply=apply)

    graphs.StepRunner.step = runner_step
    common = {"epochs": 2, "device": device, "learning_rate": 2e-3, "accel": "off"}
    try:
        def bundle():
            return place_bundle(build_tiny_bundle("sd1"), device, torch.float32)

        if kind.endswith("resumed"):
            stop = threading.Event()
            first = run_training(tiny_config(data, out / kind, **common), bundle=bundle(), owns_bundle=True,
                                 on_event=lambda e: e.kind == "step" and e.step == stop_at and stop.set(), stop=stop)
            result = run_training(tiny_config(data, out / kind, resume=str(first.state_dir), **common),
                                  bundle=bundle(), owns_bundle=True)
        else:
            result = run_training(tiny_config(data, out / kind, **common), bundle=bundle(), owns_bundle=True)
    finally:
        graphs.StepRunner.step = real_runner_step
    return {"kind": kind, "losses": result.losses, "batches": used}


def compare(ref: dict, other: dict) -> dict:
    def first_diff(a: list, b: list) -> int | None:
        return next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), None)

    diff_batch = first_diff(ref["batches"], other["batches"])  # a resumed run's: its first run's, then its own
    return {"kind": other["kind"], "first_step_with_another_batch": diff_batch,
            "first_step_with_another_loss": first_diff(ref["losses"], other["losses"]),
            "max_loss_difference": max((abs(x - y) for x, y in zip(ref["losses"], other["losses"])), default=None)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--stop-at", type=int, default=4)
    p.add_argument("--out", default="/tmp/ahead_check.json")
    a = p.parse_args()
    if a.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --device cpu)")
        b = torch.backends
        b.cudnn.deterministic, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = True, False, False, False
    from train_support import make_dataset

    work = Path(tempfile.mkdtemp(prefix="ahead-check-"))
    data = make_dataset(work / "data")
    runs = {k: run(k, data, work, a.device, a.stop_at) for k in ("after", "ahead", "ahead_resumed", "after_resumed")}
    again = run("after", data, work / "again", a.device, a.stop_at)
    report = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "torch": torch.__version__,
              "after_again": compare(runs["after"], again),
              "runs": [compare(runs["after"], runs[k]) for k in ("ahead", "ahead_resumed", "after_resumed")],
              "raw": {**runs, "after_again": again}}
    Path(a.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    for row in [report["after_again"], *report["runs"]]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
