"""What the tab shows, computed without Gradio: gallery items, problem lists, tag tables, steps; a run's
progress, result and report are in `progress_view.py` (re-exported here).

Kept apart from the layout so the same code runs on Gradio 3.41 and 4.x and is easy to test.
"""

from __future__ import annotations

import html
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image

from ..dataset import captions as cap
from ..errors import DatasetError, LoraTrainerError
from ..paths import resolve_user_path
from .progress_view import (  # noqa: F401  (the run's view: the tab and tests read it from here)
    PHASE_WORDS,
    ab_grids,
    loss_figure,
    progress_html,
    report_figure,
    report_md,
    result_md,
    sample_items,
)

log = logging.getLogger(__name__)

MAX_GALLERY = 300  # thumbnails shown; the rest is counted
THUMB = 256
NO_CAPTION = "(no caption)"


def user_error(e: BaseException) -> str:
    """The text shown for a failure: our message as is; anything else without its traceback."""
    if isinstance(e, LoraTrainerError):
        return str(e)
    log.error("LoRA Trainer tab action failed", exc_info=e)
    return (f"Unexpected error ({type(e).__name__}: {str(e)[:200]}); "
            "see the console log for details and report it if it happens again.")


def error_md(e: BaseException) -> str:
    return f"**Error:** {html.escape(user_error(e))}"


def is_error(line: str | None) -> bool:
    return (line or "").lstrip().startswith("**Error:**")


def outdated_errors(fresh: str | None, *lines: str | None) -> Any:
    """The other status lines of a step, with an error emptied once `fresh` (the line of the action just
    done) says it went well: an old error beside a later success says something that is no longer true."""
    settled = bool((fresh or "").strip()) and not is_error(fresh)
    out = tuple("" if settled and is_error(line) else line for line in lines)
    return out if len(out) > 1 else out[0]


# ---------------------------------------------------------------------- dataset
_THUMBS: OrderedDict[tuple[str, int, int], Image.Image] = OrderedDict()  # (path, mtime, size) -> thumbnail
_THUMBS_LOCK = threading.Lock()


def thumbnail(path: Path, size: int = THUMB) -> Image.Image:
    """A small copy for the gallery; remembered (by path and mtime), so redrawing the gallery after a
    caption edit does not decode every picture again."""
    from ..dataset.images import load_image

    try:
        key = (str(path), Path(path).stat().st_mtime_ns, size)
    except OSError:
        key = None
    with _THUMBS_LOCK:
        if key in _THUMBS:
            _THUMBS.move_to_end(key)
            return _THUMBS[key]
    img = load_image(path)
    img.thumbnail((size, size))
    if key is not None:
        with _THUMBS_LOCK:
            _THUMBS[key] = img
            while len(_THUMBS) > 2 * MAX_GALLERY:
                _THUMBS.popitem(last=False)
    return img


def gallery_items(images: list[str]) -> list[tuple[Image.Image, str]]:
    return [(thumbnail(Path(p)), gallery_label(p)) for p in images[:MAX_GALLERY]]


def scan_folder(folder: str, roots: list[Path] | None, *, resolution: int = 512, recursive: bool = False
                ) -> dict[str, Any]:
    """Everything the dataset section shows about `folder`.

    Returns {"folder", "images": [paths], "gallery": [(PIL, caption)], "problems": [[file, problem]],
    "summary": markdown}.
    """
    from ..dataset.images import scan_images

    root = resolve_user_path(folder, roots, what="image folder")
    scan = scan_images(root, recursive=recursive)  # size warnings: size_problems(), they follow the resolution
    images = list(scan.images)
    gallery = gallery_items([str(p) for p in images])
    skipped = [[scan.relative(p), reason] for p, reason in sorted(scan.skipped.items())]
    sizes = {scan.relative(p): list(scan.info[p].size) for p in images if p in scan.info}
    captioned = sum(1 for p in images if cap.caption_path(p).exists())
    summary = (f"**{len(images)}** usable image(s) in `{root}`, **{captioned}** with captions"
               + (f", **{len(scan.skipped)}** skipped" if scan.skipped else "")
               + (f" (showing the first {MAX_GALLERY})" if len(images) > MAX_GALLERY else "") + ".")
    if not images:
        summary += " Add JPEG/PNG/WEBP images to the folder."
    return {"folder": str(root), "images": [str(p) for p in images], "gallery": gallery,
            "skipped": skipped, "sizes": sizes, "problems": skipped + size_problems(sizes, resolution),
            "summary": summary}


def gallery_label(image: str | Path) -> str:
    """What a thumbnail says: its file name and caption."""
    return f"{Path(image).name}: {read_caption_or_empty(image) or NO_CAPTION}"


def size_problems(sizes: dict[str, list[int]], resolution: int) -> list[list[str]]:
    """Images whose shorter side is under half the training resolution (they get upscaled, blurry)."""
    return [[rel, f"small image ({w}x{h}) for training at {resolution}px; it will be upscaled"]
            for rel, (w, h) in sorted(sizes.items()) if min(w, h) * 2 < resolution]


def read_caption_or_empty(image: str | Path) -> str:
    path = cap.caption_path(image)
    if not path.exists():
        return ""
    try:
        return cap.read_caption(path)
    except (OSError, LoraTrainerError):
        return ""


def save_caption(image: str, text: str, roots: list[Path] | None = None) -> str:
    """Write the edited caption beside `image`; returns a status line."""
    if not image:
        raise DatasetError("No image is selected; click an image in the gallery first.")
    image = str(resolve_user_path(image, roots, kind="file", what="image"))
    tags = cap.unique_tags(cap.split_tags(text))
    cap.write_caption(cap.caption_path(image), cap.join_tags(tags))
    return f"Saved the caption of {Path(image).name} ({len(tags)} tags)."


def caption_unsaved(image: str, text: str | None) -> bool:
    """Whether the caption box holds an edit of `image` that is not in its file yet."""
    if not image or text is None:
        return False
    return cap.unique_tags(cap.split_tags(text)) != cap.unique_tags(cap.split_tags(read_caption_or_empty(image)))


def keep_unsaved_caption(image: str, text: str | None, roots: list[Path] | None = None) -> str:
    """Save an edit still in the caption box before something else replaces the box (another image,
    a bulk edit, the tagger, a new folder): an edit is kept, never dropped. Returns a note, or ""."""
    if not caption_unsaved(image, text):
        return ""
    return "Kept your edit: " + save_caption(image, text or "", roots)


def tag_frequency_rows(folder: str, roots: list[Path] | None = None, *, recursive: bool = False
                       ) -> list[list[Any]]:
    if not folder:
        return []
    folder = str(resolve_user_path(folder, roots, what="image folder"))
    return [[tag, n] for tag, n in cap.folder_tag_frequency(folder, recursive=recursive).items()]


def bulk_edit(folder: str, action: str, tag: str, new: str = "", roots: list[Path] | None = None, *,
              recursive: bool = False) -> str:
    """Add / remove / replace one tag in every caption of `folder`; returns a status line."""
    if not folder:
        raise DatasetError("No image folder is loaded; load a folder first.")
    folder = str(resolve_user_path(folder, roots, what="image folder"))
    tag = tag.strip()
    if not tag:
        raise DatasetError("No tag was given; type the tag to add, remove or replace.")
    if action == "add":
        result = cap.bulk_add_tag(folder, tag, recursive=recursive)
    elif action == "add first":
        result = cap.bulk_add_tag(folder, tag, first=True, recursive=recursive)
    elif action == "remove":
        result = cap.bulk_remove_tag(folder, tag, recursive=recursive)
    elif action == "replace":
        if not new.strip():
            raise DatasetError("No replacement was given; type the new tag (or use remove).")
        result = cap.bulk_replace_tag(folder, tag, new.strip(), recursive=recursive)
    else:
        raise DatasetError(f"Unknown edit '{action}'; choose add, add first, remove or replace.")
    failed = f"; {len(result.failed)} caption(s) could not be read" if result.failed else ""
    return f"{action.capitalize()} '{tag}': changed {len(result.changed)} caption(s){failed}."


def save_uploads(files: list[Any], dest_root: Path) -> Path:
    """Copy uploaded files (Gradio 3: tempfile objects, 4: paths) into a fresh folder."""
    if not files:
        raise DatasetError("No files were uploaded; drop images (and .txt captions) on the upload box.")
    dest = dest_root / time.strftime("upload-%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        n += 1
        dest = dest_root / f"{time.strftime('upload-%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir(parents=True)
    for f in files:
        src = Path(getattr(f, "name", None) or (f.get("name") if isinstance(f, dict) else f))
        name = Path(getattr(f, "orig_name", None) or src.name).name
        shutil.copyfile(src, dest / name)
    return dest


# ---------------------------------------------------------------------- prepare / plan
def dataset_origin(data: str) -> tuple[str, str, int]:
    """(picture folder it was prepared from, concept, repeats) of a prepared dataset, from its
    dataset.json and `img/<repeats>_<concept>/` ("" / 0 where it does not say)."""
    import json

    root = Path(data or "")
    source = ""
    try:
        manifest = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        source = next((str(s.get("source") or "") for s in manifest.get("subsets") or [] if s.get("kind") == "img"),
                      "")
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    img = root / "img" if (root / "img").is_dir() else root
    try:
        names = sorted(p.name for p in img.iterdir() if p.is_dir()) if data else []
    except OSError:
        names = []
    for name in names:
        if m := re.match(r"^(\d+)_(.+)$", name):
            return source, m.group(2), int(m.group(1))
    return source, "", 0

def steps_text(images: int, repeats: int, epochs: int, batch_size: int, reg_images: int = 0) -> str:
    from ..dataset.prepare import steps_plan, suggest_repeats

    repeats = repeats or suggest_repeats(images)
    if images <= 0:
        return "Load an image folder to see the steps arithmetic."
    plan = steps_plan(images, repeats, reg_images, batch_size=max(1, batch_size), epochs=max(1, epochs))
    return f"**Steps:** {plan['summary']}."
