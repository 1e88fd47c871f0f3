"""`python -m lora_trainer prepare SRC --out DIR --concept NAME`: build a Kohya dataset folder."""

from __future__ import annotations

import argparse

HELP = ("Copy images and captions into a Kohya dataset (OUT/img/<repeats>_<concept>/); "
        "originals are never changed.")
MAX_SHOWN = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="folder of your images (with optional <stem>.txt captions); only read")
    p.add_argument("--out", required=True, help="dataset folder to create or update")
    p.add_argument("--concept", required=True, help="what the LoRA learns, e.g. 'mychar woman' (folder name)")
    p.add_argument("--repeats", type=int, default=None, help="times each image is seen per epoch (default: suggested)")
    p.add_argument("--class-images", default=None, metavar="DIR", help="regularisation images (optional)")
    p.add_argument("--class-name", default=None, help="class of the regularisation images, e.g. 'woman'")
    p.add_argument("--class-repeats", type=int, default=1, help="repeats of the regularisation images (default 1)")
    p.add_argument("--recursive", action="store_true", help="include images in subfolders")
    p.add_argument("--resolution", type=int, default=512,
                   help="training resolution: images under half of it are flagged (default 512)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files in OUT that prepare did not write (a dataset.json of your own, images "
                        "or captions already in OUT/img/...); default: refuse and change nothing")


def run(args: argparse.Namespace) -> int:
    from ..dataset.prepare import MANIFEST, prepare_dataset
    from ..errors import DatasetError

    if args.class_images and not args.class_name:
        raise DatasetError("Class images were given without a class name; add --class-name, e.g. 'woman'.")
    result = prepare_dataset(args.src, args.out, args.concept, repeats=args.repeats,
                             class_images=args.class_images, class_name=args.class_name,
                             class_repeats=args.class_repeats, recursive=args.recursive,
                             resolution=args.resolution, overwrite=args.overwrite)
    m = result.manifest
    c = m["counts"]
    for part in m["subsets"]:
        pc = part["counts"]
        print(f"{part['folder']}: {pc['usable']} image(s) ({pc['copied']} copied, {pc['converted']} converted to PNG), "
              f"{pc['captioned']} with captions, {pc['skipped']} skipped")
    problems = m["problems"]
    for i, (path, reasons) in enumerate(problems.items()):
        if i == MAX_SHOWN:
            print(f"  ... and {len(problems) - MAX_SHOWN} more (see {MANIFEST})")
            break
        print(f"  {path}: {'; '.join(reasons)}")
    training = m["training"]
    if args.repeats is None:
        print(f"Repeats: {training['repeats']} (suggested for {c['usable'] - c.get('class_images', 0)} images)")
    print(f"Steps: {training['summary']}")
    if m.get("caption_encodings"):
        print(f"Captions not in plain UTF-8 (copied as UTF-8): {len(m['caption_encodings'])}; see "
              f"caption_encodings in {MANIFEST}")
    print(f"Dataset: {result.out} ({len(result.written)} file(s) written, {result.unchanged} unchanged, "
          f"{len(result.removed)} stale removed); details in {result.out / MANIFEST}")
    return 0
