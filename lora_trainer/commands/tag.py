"""`python -m lora_trainer tag DIR`: caption images with a WD14 tagger (`<stem>.txt` beside each)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import ConfigError, DatasetError
from ..paths import check_can_create_in, check_new_file
from ..tagger.registry import DEFAULT_MODEL, MODELS, default_cache_dir

HELP = "Caption images with a WD14 tagger: writes <image stem>.txt beside each image."
log = logging.getLogger(__name__)
MAX_SHOWN = 20  # skipped files listed one per line before "... and N more"


def _tag_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _replacement(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"'{text}' is not OLD=NEW")
    old, new = text.split("=", 1)
    if not old.strip():
        raise argparse.ArgumentTypeError(f"'{text}' has nothing before '='")
    return old.strip(), new.strip()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder of images; captions are written beside them")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"short name ({', '.join(MODELS)}), Hugging Face repo id, or a folder holding "
                        f"model.onnx and selected_tags.csv (default {DEFAULT_MODEL})")
    p.add_argument("--cache-dir", default=None, help=f"where downloaded taggers live (default {default_cache_dir()})")
    p.add_argument("--offline", action="store_true", help="never download; use the cache or a local folder")
    p.add_argument("--provider", default="auto", choices=("auto", "cuda", "rocm", "directml", "cpu"),
                   help="onnxruntime execution provider (auto: a working GPU provider, else CPU)")
    p.add_argument("--general-threshold", type=float, default=0.35, help="general tags need a score above this")
    p.add_argument("--character-threshold", type=float, default=0.85, help="character tags need a score above this")
    p.add_argument("--mcut", action="store_true", help="MCut thresholding for general tags (largest score gap)")
    p.add_argument("--character-mcut", action="store_true",
                   help="MCut thresholding for character tags (never below 0.15)")
    p.add_argument("--no-characters", action="store_true", help="leave character tags out")
    p.add_argument("--rating", action="store_true", help="add the rating tag (general/sensitive/...)")
    p.add_argument("--keep-underscores", action="store_true", help="write tags with underscores as in Danbooru")
    p.add_argument("--trigger", default=None, help="trigger word written as the first tag of every caption")
    p.add_argument("--exclude", type=_tag_list, default=[], metavar="T1,T2", help="tags never to write")
    p.add_argument("--always-first", type=_tag_list, default=[], metavar="T1,T2",
                   help="tags moved to the front (after the trigger) when predicted")
    p.add_argument("--replace", type=_replacement, action="append", default=[], metavar="OLD=NEW",
                   help="write NEW instead of tag OLD (repeatable; empty NEW drops it)")
    p.add_argument("--mode", default="append", choices=("append", "overwrite", "skip"),
                   help="existing captions: append new tags (default), overwrite them, or skip those images")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (fixed-batch models use theirs)")
    p.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    p.add_argument("--report", default=None, metavar="FILE", help="write captions and every tag's score as JSON")


def _check_caption_folders(root: Path, recursive: bool) -> None:
    """Every folder that holds images must take new caption files (read-only folders fail here,
    not after the model ran)."""
    from ..dataset.images import iter_candidates

    folders = {p.parent for p in iter_candidates(root, recursive, {})} or {root}
    for folder in sorted(folders):
        check_can_create_in(folder, "image folder", "make it writable, or copy the images to a folder you can "
                            "write to (captions are written beside the images)")


def _progress(done: int, total: int) -> None:
    print(f"\r  {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..tagger.engine import Tagger
    from ..tagger.folder import tag_folder
    from ..tagger.thresholds import TagOptions

    if args.batch_size < 1:
        raise ConfigError(f"Batch size {args.batch_size} is below 1; use --batch-size 1 or more.")
    options = TagOptions(
        general_threshold=args.general_threshold, character_threshold=args.character_threshold,
        general_mcut=args.mcut, character_mcut=args.character_mcut, include_characters=not args.no_characters,
        include_rating=args.rating, replace_underscores=not args.keep_underscores, trigger=args.trigger,
        exclude=args.exclude, always_first=args.always_first, replacements=dict(args.replace),
    )
    options.validate()
    # Everything that can be refused is refused before loading (maybe downloading) a model.
    if not Path(args.dir).is_dir():
        raise DatasetError(f"Folder {args.dir} does not exist; check the path.")
    if args.report:
        check_new_file(args.report, "report file", "give --report a file in an existing folder")
    _check_caption_folders(Path(args.dir), args.recursive)
    tagger = Tagger.load(args.model, args.cache_dir, provider=args.provider, local_only=args.offline)
    batch = tagger.batch_size(args.batch_size)
    print(f"Tagger: {tagger.files.name} ({tagger.size}px, batch {batch}) on {tagger.provider}")
    result = tag_folder(args.dir, tagger, options, mode=args.mode, batch_size=batch,
                        recursive=args.recursive, report=args.report,
                        on_progress=_progress if sys.stderr.isatty() else None)
    print(f"Tagged {len(result.captions)} image(s), skipped {len(result.skipped)}.")
    for i, (rel, reason) in enumerate(result.skipped.items()):
        if i == MAX_SHOWN:
            print(f"  ... and {len(result.skipped) - MAX_SHOWN} more")
            break
        print(f"  skipped {rel}: {reason}")
    if args.report:
        print(f"Report: {args.report}")
    return 0
