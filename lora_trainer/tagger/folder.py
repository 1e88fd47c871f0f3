"""Tag every image in a folder: `<stem>.txt` beside each image, a JSON report, skipped files kept."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dataset.atomic import write_text_atomic
from ..dataset.captions import (
    caption_path,
    join_tags,
    normalize_tag,
    read_caption_checked,
    split_tags,
    write_caption,
)
from ..dataset.images import ImageLoadError, iter_candidates, load_image
from ..errors import ConfigError, DatasetError
from ..prefetch import prefetched
from .engine import Tagger
from .preprocess import prepare_image
from .thresholds import MODES, TagOptions, compose_caption, select_tags

log = logging.getLogger(__name__)


@dataclass
class TagRun:
    """Outcome of tagging a folder; paths are relative to `root` (POSIX style)."""

    root: Path
    provider: str
    model: str
    batch_size: int
    captions: dict[str, str] = field(default_factory=dict)  # caption written per image
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # every tag's score per image
    skipped: dict[str, str] = field(default_factory=dict)  # image or file -> reason

    def report(self) -> dict:
        """The `--report` JSON: images -> caption and scores (names as in selected_tags.csv), skipped."""
        return {
            "images": {rel: {"caption": self.captions[rel], "scores": self.scores[rel]} for rel in self.captions},
            "skipped": dict(self.skipped),
        }


def tag_folder(folder: str | os.PathLike[str], tagger: Tagger, options: TagOptions | None = None, *,
               mode: str = "append", batch_size: int = 8, recursive: bool = False,
               report: str | os.PathLike[str] | None = None,
               on_progress: Callable[[int, int], None] | None = None,
               keep_out: Mapping[str, Collection[str]] | None = None) -> TagRun:
    """Write `<stem>.txt` beside each image of `folder` (see TagOptions and `mode`); never touch images.

    mode: append (keep existing tags, add new ones, no duplicates), overwrite, or skip (leave
    images that have a caption alone). Raise DatasetError when the folder is missing or holds no
    usable image; unreadable files are skipped and listed, not fatal.
    keep_out: per image (path relative to `folder`, POSIX), tags the user took out of its caption;
    append mode does not add them back (the tab passes what was removed since the tagger wrote it).
    """
    options = options or TagOptions()
    options.validate()
    if mode not in MODES:
        raise ConfigError(f"Caption mode '{mode}' is unknown; use one of {', '.join(MODES)}.")
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"Folder {root} does not exist; check the path.")
    batch = tagger.batch_size(batch_size)
    run = TagRun(root=root, provider=tagger.provider, model=tagger.files.name, batch_size=batch)
    skipped: dict[Path, str] = {}
    todo: list[Path] = []
    kept = 0
    for image in iter_candidates(root, recursive, skipped):
        if mode == "skip" and caption_path(image).exists():
            skipped[image] = "has a caption already (mode skip)"
            kept += 1
        else:
            todo.append(image)
    names = tagger.labels.names
    done = 0
    for paths, arrays, failed in _prepared_batches(todo, batch, tagger.size):
        skipped.update(failed)
        if paths:
            for path, scores in zip(paths, tagger.predict_arrays(np.stack(arrays))):
                rel = path.relative_to(root).as_posix()
                predicted = select_tags(scores, tagger.labels, options)
                if mode == "append" and keep_out and keep_out.get(rel):
                    out = {normalize_tag(t) for t in keep_out[rel]}
                    predicted = [t for t in predicted if normalize_tag(t) not in out]
                run.captions[rel] = _write_caption(path, predicted, options, mode)
                run.scores[rel] = dict(zip(names, scores.tolist()))
        done += len(paths) + len(failed)
        if on_progress:
            on_progress(done, len(todo))
    run.skipped = {p.relative_to(root).as_posix(): reason for p, reason in sorted(skipped.items())}
    if not run.captions and not kept:
        detail = ""
        if run.skipped:
            rel, reason = next(iter(run.skipped.items()))
            detail = f" ({len(run.skipped)} file(s) skipped, e.g. {rel}: {reason})"
        raise DatasetError(f"Folder {root} holds no usable image{detail}; add JPEG/PNG/WEBP images"
                           f"{'' if recursive else ' or use --recursive for subfolders'}.")
    if report is not None:
        write_text_atomic(report, json.dumps(run.report(), ensure_ascii=False, indent=1) + "\n")
    return run


def _prepared_batches(todo: list[Path], batch: int, size: int
                      ) -> Iterator[tuple[list[Path], list[np.ndarray], dict[Path, str]]]:
    """(paths, model inputs, failures) per batch, decoded and resized in threads one batch ahead
    of the model, so a GPU tagger is not left waiting on one CPU core."""
    def load(path: Path) -> np.ndarray:
        return prepare_image(load_image(path), size)

    with closing(prefetched(load, todo, ahead=2 * batch, workers=8, name="tagger-load")) as inputs:
        for start in range(0, len(todo), batch):
            paths, arrays, failed = [], [], {}
            for path in todo[start:start + batch]:
                try:
                    arrays.append(next(inputs).result())
                    paths.append(path)
                except ImageLoadError as e:
                    failed[path] = e.reason
            yield paths, arrays, failed


def _write_caption(image: Path, predicted: list[str], options: TagOptions, mode: str) -> str:
    cap = caption_path(image)
    existing = None
    if mode == "append" and cap.exists():
        text, warning = read_caption_checked(cap)
        if warning:
            log.warning("caption %s %s", cap.name, warning)
        existing = split_tags(text)
    caption = join_tags(compose_caption(predicted, options, existing, mode))
    write_caption(cap, caption)
    return caption
