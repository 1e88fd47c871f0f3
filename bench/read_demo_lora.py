"""Read finished demo LoRA files with the shape classifier, as bench/reg_leak_demo.py's `--read` does for the file
it trains: per file, the star share of N "<colour> demostar, <colour> background" generations and, for N prompts
asking for a seen shape, the share drawn as asked and read as a star ("base": no LoRA). Used for the report's
best-epoch file against the last one. `--each`: one digit per generation too, so that two files read on the same
prompts and starting noise compare generation by generation (paired errors: bench/pick_vs_last.py); `--seeds
PS,IS,PO,IO`: prompt and image seeds of the star and the other prompts (default 7,7,31,100).

    OMP_NUM_THREADS=1 python bench/read_demo_lora.py MODEL CLASSIFIER.pt N base LORA.safetensors ...
    OMP_NUM_THREADS=1 python bench/read_demo_lora.py --each [--seeds 1007,1007,1031,2100] MODEL CLASSIFIER.pt N FILE ...

Results: bench/results/demo_lora_cpu/shipped_candidate_2026-12-05.md, best_epoch_learned_runs.md,
best_epoch_second_model_product.md, best_epoch_pick_rule_2026-12-06.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch
    from reg_leak_demo import read

    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("classifier", help="cached classifier state (trained and saved there when missing)")
    p.add_argument("n", type=int)
    p.add_argument("files", nargs="+", help="LoRA files, or base")
    p.add_argument("--seeds", default="7,7,31,100", help="star prompts, star images, other prompts, other images")
    p.add_argument("--each", action="store_true", help="one digit per generation too (paired comparisons)")
    args = p.parse_args(argv)
    seeds = tuple(map(int, args.seeds.split(",")))
    bundle = load_model(args.model, dtype=torch.float32)
    for f in args.files:
        row = read(bundle, None if f == "base" else f, args.n, Path(args.classifier), seeds, args.each)
        print(json.dumps({"file": f, **row}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
