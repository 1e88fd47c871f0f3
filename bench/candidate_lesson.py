"""One demo LoRA on a demo-world checkpoint (e.g. the longer-pretrained candidate), measured three ways:
the star share of `--n` "<colour> demostar, <colour> background" generations (CFG scales and step counts
given), the report's per-epoch leakage/improvement, and (`--leak-n`) what it draws where a seen shape is
asked for (bench/leak_classify.py's prompts: prompt seed 31, image seeds 100..).

    OMP_NUM_THREADS=1 python bench/candidate_lesson.py MODEL WORK SEED '{"epochs": 60, "learning_rate": 4.5e-3}' \
        [--gen 5:12,7.5:12] [--n 64] [--leak-n 64] [--base]

Overrides: TrainConfig fields, plus "epochs" (30), "images" (16), "plain_captions" (true: captions are the
trigger word alone). The classifier (300 steps) is cached as WORK/../classifier.pt. One JSON line at the end.
Results: bench/results/demo_lora_cpu/candidate_lesson_and_leakage_2026-12-05.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.commands.demo import demo_config
    from lora_trainer.dataset.prepare import prepare_dataset
    from lora_trainer.demo import TRIGGER
    from lora_trainer.demo.classifier import cached_classifier
    from lora_trainer.demo.dataset import write_concept_images
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, sample_scenes
    from lora_trainer.lora import applied_lora
    from lora_trainer.models.loader import load_model
    from lora_trainer.train import run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("work")
    p.add_argument("seed", type=int)
    p.add_argument("overrides", nargs="?", default="{}")
    p.add_argument("--gen", default="5:12", help="CFG:steps pairs for the star share")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--leak-n", type=int, default=0)
    p.add_argument("--base", action="store_true", help="measure the model without a LoRA only")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clf_path = work.parent / "classifier.pt"
    clf = cached_classifier(clf_path)
    bundle = load_model(args.model, dtype=torch.float32)
    over = json.loads(args.overrides)
    out: dict = {"seed": args.seed, **over}
    epochs, images, plain = over.pop("epochs", 30), over.pop("images", 16), over.pop("plain_captions", False)
    lora = None
    if not args.base:
        write_concept_images(work / "images", images, seed=1)
        if plain:
            for txt in (work / "images").glob("*.txt"):
                txt.write_text(TRIGGER + "\n")
        ds = prepare_dataset(work / "images", work / "dataset", TRIGGER, repeats=1, resolution=64)
        cfg = demo_config(args.model, ds.out, work / "lora", epochs=epochs, seed=args.seed, device="cpu")
        for key, value in over.items():
            setattr(cfg, key, value)
        t = time.perf_counter()
        res = run_training(cfg, bundle=bundle, owns_bundle=False)
        lora, report = res.lora_path, res.report
        out.update(train_s=round(time.perf_counter() - t, 1), verdict=report["verdict"], best=report["best_epoch"],
                   leak=[round(e["leak"], 3) for e in report["epochs"]],
                   impr=[round(e["improvement"], 3) for e in report["epochs"]], lora=str(lora))
    prompts = sample_scenes(args.n, torch.Generator().manual_seed(7), shapes=(HELD_OUT,)).captions(shape_word=TRIGGER)
    star = clf.classes.index(HELD_OUT)
    for spec in args.gen.split(","):
        scale, steps = spec.split(":")
        with applied_lora(bundle, lora), torch.no_grad():
            prob = clf(generate_batch(bundle, prompts, seed=7, steps=int(steps), cfg_scale=float(scale))).softmax(1)
        out[f"star@{spec}"] = round((prob.argmax(1) == star).float().mean().item(), 3)
    if args.leak_n:
        scenes = sample_scenes(args.leak_n, torch.Generator().manual_seed(31), shapes=SEEN_SHAPES)
        asked = scenes.shapes()
        with applied_lora(bundle, lora), torch.no_grad():
            prob = clf(generate_batch(bundle, scenes.captions(), seed=100, steps=12)).softmax(1)
        labels = [clf.classes[int(i)] for i in prob.argmax(1)]
        out["other_asked"] = round(sum(a == b for a, b in zip(labels, asked)) / args.leak_n, 3)
        out["other_star"] = round(labels.count(HELD_OUT) / args.leak_n, 3)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
