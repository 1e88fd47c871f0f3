"""Read demo LoRA files with the shape classifier as bench/reg_leak_demo.py's `read()` does (`--read N`,
bench/read_demo_lora.py), keeping every generation's result, so that two files read on the same prompts and
starting noise can be compared generation by generation (paired errors: bench/pick_vs_last.py). Per file one JSON
line: the star share of N "<colour> demostar, <colour> background" generations, the share of N prompts asking for a
seen shape drawn as asked and read as a star, and one digit per generation (`star_each`, `asked_each`,
`other_star_each`). `--seeds PS,IS,PO,IO`: prompt and image seeds of the star and the other prompts (default
7,7,31,100: `read()`'s); "base" reads the model without a LoRA.

    OMP_NUM_THREADS=1 python bench/read_pergen.py MODEL CLASSIFIER.pt N [--seeds 1007,1007,1031,2100] FILE ...

Results: bench/results/demo_lora_cpu/best_epoch_learned_runs.md, best_epoch_second_model_product.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.demo import TRIGGER
    from lora_trainer.demo.classifier import cached_classifier
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, sample_scenes
    from lora_trainer.lora import applied_lora
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("classifier", help="cached classifier state (trained and saved there when missing)")
    p.add_argument("n", type=int)
    p.add_argument("files", nargs="+", help="LoRA files, or base")
    p.add_argument("--seeds", default="7,7,31,100", help="star prompts, star images, other prompts, other images")
    args = p.parse_args(argv)
    ps, is_, po, io = map(int, args.seeds.split(","))
    n = args.n
    bundle = load_model(args.model, dtype=torch.float32)
    clf = cached_classifier(Path(args.classifier))
    star = clf.classes.index(HELD_OUT)
    stars = sample_scenes(n, torch.Generator().manual_seed(ps), shapes=(HELD_OUT,)).captions(shape_word=TRIGGER)
    others = sample_scenes(n, torch.Generator().manual_seed(po), shapes=SEEN_SHAPES)
    for f in args.files:
        with applied_lora(bundle, None if f == "base" else f), torch.no_grad():
            s = (clf(generate_batch(bundle, stars, seed=is_, steps=12)).argmax(1) == star).int().tolist()
            labels = [clf.classes[int(i)] for i in clf(generate_batch(bundle, others.captions(), seed=io,
                                                                      steps=12)).argmax(1)]
        asked = [int(a == b) for a, b in zip(labels, others.shapes())]
        ostar = [int(a == HELD_OUT) for a in labels]
        print(json.dumps({"file": f, "n": n, "seeds": [ps, is_, po, io], "star": round(sum(s) / n, 3),
                          "other_asked": round(sum(asked) / n, 3), "other_star": round(sum(ostar) / n, 3),
                          "star_each": "".join(map(str, s)), "asked_each": "".join(map(str, asked)),
                          "other_star_each": "".join(map(str, ostar))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
