"""Measure the "did it learn?" report's numbers on under-, well- and over-trained runs of one model.

The verdict thresholds (`LEARNED_MIN_IMPROVEMENT`, `LEAK_MAX_OTHER` in lora_trainer/train/report.py) are
meant to be set from runs like these on the demo model: the under-trained runs' best improvement must
stay below the "learned" threshold, the good runs' must pass it, and the over-trained runs' leakage
must pass the "leaks" threshold while the good runs' stays below it. This script trains each run with
the real engine (CPU by default), prints every epoch's scores and writes them as JSON. Leakage is read only
where a run has pictures of other subjects: give `leak_check_dir` (or regularisation images in the dataset) in a
run's settings; without them the report does not check it (train/validation.py says why).

    python bench/learn_thresholds.py --model demo.safetensors --data star-dataset/ --out results.json
    python bench/learn_thresholds.py --model ... --data ... --runs runs.json   # your own settings

`--runs` is a JSON object {label: {TrainConfig fields}}; the defaults are below. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = {  # label -> settings over the common ones; "kind" says which verdict the run should get
    "under: 1 epoch, lr 1e-5": {"kind": "under", "epochs": 1, "learning_rate": 1e-5},
    "good: 4 epochs, lr 1e-4": {"kind": "good", "epochs": 4, "learning_rate": 1e-4},
    "good: 4 epochs, lr 3e-4": {"kind": "good", "epochs": 4, "learning_rate": 3e-4},
    "over: 8 epochs, lr 3e-3, rank 32": {"kind": "over", "epochs": 8, "learning_rate": 3e-3, "rank": 32,
                                         "alpha": 32.0},
}
COMMON = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 8,
          "alpha": 8.0, "batch_size": 4, "seed": 7, "device": "cpu", "save_precision": "float",
          "mixed_precision": "no", "save_state": False}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="SD1-architecture checkpoint (.safetensors) or diffusers folder")
    p.add_argument("--data", required=True, help="Kohya dataset folder (img/<repeats>_<trigger>/)")
    p.add_argument("--runs", help="JSON file {label: {settings}} replacing the default runs")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="a setting for every run, e.g. --set resolution=128")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--keep", metavar="DIR", help="keep every run's LoRA files here (default: a temporary folder)")
    args = p.parse_args(argv)

    import torch

    from lora_trainer.config import TrainConfig
    from lora_trainer.train import report as report_mod
    from lora_trainer.train import run_training

    runs = json.loads(Path(args.runs).read_text(encoding="utf-8")) if args.runs else RUNS
    common = dict(COMMON)
    for item in args.set:
        field, _, value = item.partition("=")
        common[field] = json.loads(value)
    results = []
    with tempfile.TemporaryDirectory(prefix="learn-thresholds-") as tmp:
        tmp = args.keep or tmp
        for k, (label, settings) in enumerate(runs.items()):
            settings = dict(settings)
            kind = settings.pop("kind", "")
            config = TrainConfig(**{**common, **settings, "model": args.model, "data": args.data,
                                    "output_dir": str(Path(tmp) / f"run{k}"), "name": f"run{k}"})
            started = time.time()
            result = run_training(config)
            rep = result.report or {}
            print(f"\n== {label} ({kind}): {result.steps} steps, {time.time() - started:.0f} s")
            print(report_mod.report_text(rep))
            results.append({"label": label, "kind": kind, "settings": {**common, **settings},
                            "steps": result.steps, "seconds": round(time.time() - started, 1), "report": rep})
    summary = {kind: {"best_improvement": [max(e["improvement"] for e in r["report"]["epochs"]) for r in results
                                           if r["kind"] == kind],
                      "last_leak": [r["report"]["epochs"][-1]["leak"] for r in results if r["kind"] == kind]}
               for kind in dict.fromkeys(r["kind"] for r in results)}
    print("\nper kind:", json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
            "thresholds_now": {"learned_min_improvement": report_mod.LEARNED_MIN_IMPROVEMENT,
                               "leak_max": report_mod.LEAK_MAX_OTHER},
            "summary": summary, "runs": results}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
