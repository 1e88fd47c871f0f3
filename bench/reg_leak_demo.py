"""The "did it learn?" report's "other concepts" leakage (train/validation.py) on demo runs: the demo's sixteen
star pictures, and sixteen pictures of the other, seen shapes with their captions as the leak-check set (never
trained on, `leak_check_dir`, as `python -m lora_trainer demo` passes them; the default), or as regularisation
images (`--reg`: trained on, kohya's prior preservation), or neither (`--no-reg`: the pure-noise measure); trained
with `demo_config` and overrides; prints one JSON line per run (settings, seconds, verdict, the leakage per epoch)
and, with `--read N`, what the LoRA draws, read by the package's shape classifier (cached as
OUT/../classifier.pt): the star share of N "<colour> demostar, <colour> background" generations (prompt and image seeds 7..) and, for N prompts asking for a
seen shape (prompt seed 31, image seeds 100..), the share drawn as asked and read as a star (bench/candidate_lesson.py's
readings; 12 steps, CFG 5). The other shapes' pictures use scene seed SEED + 100, as the demo does.

    OMP_NUM_THREADS=1 python bench/reg_leak_demo.py OUT '{"epochs": 15, "rank": 32, "text_encoder_lr": 3e-3}' \\
        [--model MODEL] [--seed 1] [--reg | --no-reg] [--read 64]

Results: bench/results/demo_lora_cpu/candidate_lesson_and_leakage_2026-12-05.md (sections 4 and 5).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.commands.demo import demo_config
    from lora_trainer.dataset.prepare import prepare_dataset
    from lora_trainer.demo import DEMO_MODEL, TRIGGER
    from lora_trainer.demo.dataset import write_concept_images, write_other_images
    from lora_trainer.models.loader import load_model
    from lora_trainer.train import run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("overrides", nargs="?", default="{}")
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--reg", action="store_true", help="the other shapes as regularisation images (trained on)")
    p.add_argument("--no-reg", action="store_true", help="without the other shapes (the pure-noise measure)")
    p.add_argument("--read", type=int, default=0, help="generations per reading (0: none)")
    args = p.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    write_concept_images(out / "images", 16, args.seed)
    others = None if args.no_reg else out / "others"
    if others is not None:
        write_other_images(others, 16, args.seed + 100)
    reg = others if args.reg else None
    dataset = prepare_dataset(out / "images", out / "dataset", TRIGGER, repeats=1, resolution=64,
                              class_images=reg, class_name="shape" if reg else None)
    overrides = json.loads(args.overrides)
    config = demo_config(args.model, dataset.out, out / "lora", epochs=int(overrides.pop("epochs", 30)),
                         seed=args.seed, device="cpu", leak_check=others if reg is None else None)
    for key, value in overrides.items():
        setattr(config, key, value)
    if "rank" in overrides and "alpha" not in overrides:
        config.alpha = float(config.rank)
    bundle = load_model(args.model, dtype=torch.float32)
    started = time.perf_counter()
    result = run_training(config, bundle=bundle, owns_bundle=False)
    rep = result.report
    readings = read(bundle, result.lora_path, args.read, out.parent / "classifier.pt") if args.read else {}
    print(json.dumps({**readings, "out": str(out), "overrides": json.loads(args.overrides), "seed": args.seed,
                      "others": "none" if others is None else "reg" if reg else "leak_check",
                      "other_source": rep.get("other_source", ""), "steps": result.steps,
                      "train_s": round(time.perf_counter() - started, 1), "measure": rep["leak_measure"],
                      "verdict": rep["verdict"], "best_epoch": rep["best_epoch"],
                      "leak": [round(e["leak"], 3) for e in rep["epochs"]],
                      "improvement": [round(e["improvement"], 4) for e in rep["epochs"]],
                      "message": rep["message"], "lora": str(result.lora_path)}), flush=True)
    return 0


def read(bundle, lora, n: int, classifier_path: Path, seeds: tuple[int, int, int, int] = (7, 7, 31, 100),
         each: bool = False) -> dict:
    """The star share with the trigger and what the LoRA draws where a seen shape is asked for. `seeds`: prompt and
    image seeds of the star prompts and of the other prompts; `each`: also one digit per generation (`star_each`,
    `asked_each`, `other_star_each`), so that two files read on the same prompts and noise pair up
    (bench/pick_vs_last.py)."""
    import torch

    from lora_trainer.demo import TRIGGER
    from lora_trainer.demo.classifier import cached_classifier
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, sample_scenes
    from lora_trainer.lora import applied_lora

    ps, is_, po, io = seeds
    clf = cached_classifier(classifier_path)
    star = clf.classes.index(HELD_OUT)
    stars = sample_scenes(n, torch.Generator().manual_seed(ps), shapes=(HELD_OUT,)).captions(shape_word=TRIGGER)
    others = sample_scenes(n, torch.Generator().manual_seed(po), shapes=SEEN_SHAPES)
    with applied_lora(bundle, lora), torch.no_grad():
        s = (clf(generate_batch(bundle, stars, seed=is_, steps=12)).argmax(1) == star).int().tolist()
        labels = [clf.classes[int(i)] for i in clf(generate_batch(bundle, others.captions(), seed=io,
                                                                  steps=12)).argmax(1)]
    asked = [int(a == b) for a, b in zip(labels, others.shapes())]
    ostar = [int(a == HELD_OUT) for a in labels]
    out = {"star": round(sum(s) / n, 3), "other_asked": round(sum(asked) / n, 3),
           "other_star": round(sum(ostar) / n, 3)}
    if each:
        out.update(n=n, seeds=list(seeds), star_each="".join(map(str, s)), asked_each="".join(map(str, asked)),
                   other_star_each="".join(map(str, ostar)))
    return out

if __name__ == "__main__":
    raise SystemExit(main())
