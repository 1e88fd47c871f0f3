"""Build a Kohya dataset folder from a folder of images: `OUT/img/<repeats>_<concept>/` (+ `OUT/reg/`).

Originals are only ever read. Images any Kohya-format tool reads the same way are copied byte
for byte (name and modification time kept); the rest (animated, CMYK, 16-bit, transparent,
EXIF-rotated, or a format sd-scripts does not glob such as GIF/TIFF) are written as
`<same stem>.png` holding exactly what `load_image` decodes. Captions are copied as UTF-8.
Every write is atomic and skipped when the file already holds the same bytes; files a previous
run wrote that are no longer wanted (an old `<repeats>_<concept>` folder, a removed photo) are
deleted using the previous `dataset.json`, so re-running gives the same tree and no duplicates.

Nothing of the user's is overwritten unless asked (`overwrite=True`, the CLI's `--overwrite`): a
`dataset.json` that is not ours, or a file at a path we would write that no earlier run of ours
wrote and whose bytes differ, is a DatasetError before anything is written. Captions that were not
plain UTF-8 are listed in `dataset.json` under `caption_encodings` (and as problems when not UTF-8).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from ..hashing import sha256_file
from ..paths import check_can_create_in
from .atomic import copy_atomic, write_bytes_atomic
from .captions import caption_path, encoding_label, read_caption_encoding, split_tags, tag_frequency
from .images import ImageInfo, ScanResult, decode_image, scan_images
from .names import validate_name, validate_repeats

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
MANIFEST_VERSION = 1
GENERATOR = "lora_trainer prepare"  # marks a dataset.json as ours (older ones are recognised by their keys)
# Suggested repeats aim at about this many image views per epoch (20 images -> 10 repeats), the
# usual advice of LoRA guides; 10 epochs at batch size 1 then give about 2000 steps.
VIEWS_PER_EPOCH = 200
DEFAULT_EPOCHS = 10


def suggest_repeats(images: int) -> int:
    """Repeats so that images x repeats is about VIEWS_PER_EPOCH (1 to 100)."""
    return max(1, min(100, round(VIEWS_PER_EPOCH / max(1, images))))


def steps_plan(images: int, repeats: int, reg_images: int = 0, *, batch_size: int = 1,
               epochs: int = DEFAULT_EPOCHS) -> dict:
    """The Kohya steps arithmetic (with regularisation images each step pairs one of each, doubling it)."""
    views = images * repeats
    per_epoch = views * (2 if reg_images else 1)
    steps_per_epoch = math.ceil(per_epoch / batch_size)
    total = steps_per_epoch * epochs
    reg = " x 2 (regularisation images)" if reg_images else ""
    return {
        "images": images, "repeats": repeats, "regularisation_images": reg_images,
        "batch_size": batch_size, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "total_steps": total,
        "summary": (f"{images} images x {repeats} repeats{reg} = {per_epoch} per epoch; / batch size {batch_size} "
                    f"= {steps_per_epoch} steps per epoch; x {epochs} epochs = {total} steps"),
    }


@dataclass
class Subset:
    kind: str  # "img" (what to learn) or "reg" (regularisation / class images)
    source: Path
    name: str
    repeats: int

    @property
    def folder(self) -> str:
        return f"{self.kind}/{self.repeats}_{self.name}"


@dataclass
class PrepareResult:
    out: Path
    manifest: dict
    written: list[Path] = field(default_factory=list)  # files created or changed by this run
    unchanged: int = 0
    removed: list[Path] = field(default_factory=list)  # stale files of a previous run


@dataclass
class _Item:
    """One image of a subset and where it (and its caption) will go."""

    src: Path
    rel: str  # relative to the scanned folder
    info: ImageInfo
    reasons: list[str]  # why it is converted (empty: copied)
    dst: Path
    caption: Path | None  # the source caption file, when there is one

    @property
    def caption_dst(self) -> Path:
        return self.dst.with_suffix(".txt")


def prepare_dataset(source: str | os.PathLike[str], out: str | os.PathLike[str], concept: str, *,
                    repeats: int | None = None, class_images: str | os.PathLike[str] | None = None,
                    class_name: str | None = None, class_repeats: int = 1, recursive: bool = False,
                    resolution: int = 512, overwrite: bool = False,
                    on_progress: Callable[[int, int], None] | None = None) -> PrepareResult:
    """Build `out` as a Kohya dataset (see module docstring) and write `out/dataset.json`."""
    source, out = Path(source), Path(out)
    validate_name(concept, "Concept")
    if class_images is not None:
        validate_name(class_name, "Class")
        validate_repeats(class_repeats, "Class repeats")
    elif class_name:
        raise DatasetError("A class name was given without class images; pass --class-images DIR too, "
                           "or leave out --class-name.")
    if repeats is not None:
        validate_repeats(repeats)
    check_can_create_in(out, "dataset folder", "choose another folder with --out")
    scans = [("img", _scan(source, recursive, resolution, "Image"))]
    if class_images is not None:
        scans.append(("reg", _scan(Path(class_images), recursive, resolution, "Class image")))
    if repeats is None:
        repeats = suggest_repeats(len(scans[0][1].images))
    subsets = [Subset("img", source, concept, repeats)]
    if class_images is not None:
        subsets.append(Subset("reg", Path(class_images), class_name or "", class_repeats))
    for subset in subsets:
        _check_no_overlap(subset, out)

    result = PrepareResult(out=out, manifest={})
    previous = _previous_outputs(out, overwrite)
    plans = [_plan_subset(subset, scan, out) for subset, (_, scan) in zip(subsets, scans)]
    if not overwrite:
        _check_no_clobber([item for plan in plans for item in plan], out, previous)
    total = sum(len(s.images) for _, s in scans)
    done = 0
    parts = []
    for subset, (_, scan), plan in zip(subsets, scans, plans):
        def progress(n: int, _base: int = done) -> None:
            if on_progress:
                on_progress(_base + n, total)
        parts.append(_build_subset(subset, scan, plan, out, result, progress))
        done += len(scan.images)

    wanted = {p for part in parts for f in part["files"] for p in (f["image"], f["caption"]) if p}
    for rel in sorted(previous - wanted):
        _remove_stale(out, rel, result)
    reg_count = parts[1]["counts"]["usable"] if len(parts) > 1 else 0
    encodings = {f"{p['kind']}:{k}": v for p in parts for k, v in p.pop("caption_encodings").items()}
    manifest = {
        "version": MANIFEST_VERSION,
        "generator": GENERATOR,
        "counts": _sum_counts(parts),
        "training": {**steps_plan(parts[0]["counts"]["usable"], repeats, reg_count),
                     "suggested_repeats": suggest_repeats(parts[0]["counts"]["usable"])},
        "problems": {f"{p['kind']}:{k}": v for p in parts for k, v in p["problems"].items()},
        "tag_frequency": parts[0]["tag_frequency"],
        # captions that were not plain UTF-8: {"img:<caption file, relative to the source>": codec read with}
        "caption_encodings": encodings,
        "subsets": parts,
        "outputs": sorted(wanted),
    }
    manifest_bytes = (json.dumps(manifest, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    _write_if_changed(out / MANIFEST, manifest_bytes, result)
    result.manifest = manifest
    return result


def _scan(folder: Path, recursive: bool, resolution: int, what: str) -> ScanResult:
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist; check the path.")
    scan = scan_images(folder, recursive, min_size=resolution)
    if not scan.images:
        detail = ""
        if scan.skipped:
            path, reason = next(iter(scan.skipped.items()))
            detail = f" ({len(scan.skipped)} file(s) skipped, e.g. {scan.relative(path)}: {reason})"
        raise DatasetError(f"{what} folder {folder} holds no usable image{detail}; add JPEG/PNG/WEBP images"
                           f"{'' if recursive else ' or use --recursive for subfolders'}.")
    return scan


def _inside(a: Path, b: Path) -> bool:
    """a is b or inside b."""
    try:
        a.resolve().relative_to(b.resolve())
        return True
    except ValueError:
        return False


def _check_no_overlap(subset: Subset, out: Path) -> None:
    # OUT may hold the photos folder (OUT/raw), but what we write (OUT/img, OUT/reg, dataset.json)
    # must neither be nor contain nor sit inside the photos.
    target = out / subset.kind
    if _inside(subset.source, target) or _inside(target, subset.source) or _inside(subset.source, out / MANIFEST):
        raise DatasetError(f"The output folder {out} overlaps the images in {subset.source}; choose an output "
                           "folder outside your photos so they are never touched.")


def _is_ours(data: object) -> bool:
    return isinstance(data, dict) and (data.get("generator") == GENERATOR or (
        isinstance(data.get("version"), int) and isinstance(data.get("outputs"), list)
        and isinstance(data.get("subsets"), list) and isinstance(data.get("training"), dict)))


def _previous_outputs(out: Path, overwrite: bool) -> set[str]:
    """What an earlier run listed in `dataset.json` (those files may be replaced or removed). A
    `dataset.json` that is not ours is the user's: refused unless `overwrite`, and never trusted."""
    path = out / MANIFEST
    if not path.exists():
        return set()
    if path.is_dir():
        raise DatasetError(f"{path} is a folder, where the dataset manifest goes; remove or rename it, or choose "
                           "another output folder.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not _is_ours(data):
        if overwrite:
            return set()
        raise DatasetError(f"{path} exists and was not written by prepare; choose another output folder, or "
                           "pass --overwrite to replace it.")
    return {str(p) for p in data.get("outputs", []) if isinstance(p, str)}


def _check_no_clobber(items: list[_Item], out: Path, previous: set[str]) -> None:
    """Refuse (before writing anything) to replace a file no earlier prepare wrote, unless it already
    holds exactly what we would write."""
    for item in items:
        targets = [(item.dst, None)] + ([(item.caption_dst, item.caption)] if item.caption else [])
        for dst, caption in targets:
            if not os.path.lexists(dst) or _rel(dst, out) in previous:
                continue
            if dst.is_dir():
                raise DatasetError(f"{dst} is a folder, where {'a caption' if caption else 'an image'} goes; "
                                   "remove or rename it, or choose another output folder.")
            if caption is not None:
                same = dst.read_bytes() == _caption_bytes(caption)[0]
            elif item.reasons:
                same = dst.read_bytes() == _png_bytes(item.src)
            else:
                same = dst.stat().st_size == item.src.stat().st_size and sha256_file(dst) == sha256_file(item.src)
            if not same:
                raise DatasetError(f"{dst} exists and was not written by prepare; choose another output folder, "
                                   "or pass --overwrite to replace it.")


def _caption_bytes(caption: Path) -> tuple[bytes, str, str]:
    """(what we write for a caption file, its text, the codec it was read with)."""
    text, encoding = read_caption_encoding(caption)
    return (text + "\n").encode("utf-8"), text, encoding


def _png_bytes(src: Path) -> bytes:
    rgb, _ = decode_image(src)
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    return buf.getvalue()


def _remove_stale(out: Path, rel: str, result: PrepareResult) -> None:
    path = out / rel
    # Only files inside OUT/img or OUT/reg that a previous run listed: never anything else.
    if not (rel.startswith(("img/", "reg/")) and ".." not in Path(rel).parts and path.is_file()):
        return
    path.unlink()
    result.removed.append(path)
    folder = path.parent
    if folder != out and not any(folder.iterdir()):
        folder.rmdir()


def _write_if_changed(path: Path, data: bytes, result: PrepareResult) -> None:
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            result.unchanged += 1
            return
    except OSError:
        pass
    write_bytes_atomic(path, data)
    result.written.append(path)


def _copy_if_changed(src: Path, dst: Path, result: PrepareResult) -> None:
    try:
        same = dst.stat().st_size == src.stat().st_size and sha256_file(dst) == sha256_file(src)
    except OSError:
        same = False
    if same:
        result.unchanged += 1
        return
    copy_atomic(src, dst)
    result.written.append(dst)


def conversion_reasons(info: ImageInfo) -> list[str]:
    """Why an image is written as PNG instead of copied (empty: copy it as is)."""
    if info.plain:
        return []
    reasons = []
    if info.animated:
        reasons.append(f"animated ({info.frames} frames): first frame kept")
    if info.mode == "CMYK":
        reasons.append("CMYK converted to RGB")
    elif info.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        reasons.append(f"{'16-bit' if info.mode != 'F' else 'floating-point'} image converted to 8-bit")
    elif info.mode not in ("RGB", "L", "P", "RGBA"):
        reasons.append(f"{info.mode} pixels converted to RGB")
    if info.transparent:
        reasons.append("transparency composited on white")
    if info.exif_rotated:
        reasons.append("EXIF orientation applied")
    if info.path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        reasons.append(f"{info.path.suffix.lower()} is not read by Kohya tools")
    return reasons or ["converted to PNG"]


def _plan_subset(subset: Subset, scan: ScanResult, out: Path) -> list[_Item]:
    """Where each image of the subset goes (nothing is written): names made unique, PNG for conversions."""
    folder = out / subset.folder
    used_stems: set[str] = set()
    items = []
    for src in scan.images:
        info = scan.info[src]
        reasons = conversion_reasons(info)
        stem = _unique_stem(src.stem, used_stems)
        cap = caption_path(src)
        items.append(_Item(src=src, rel=scan.relative(src), info=info, reasons=reasons,
                           dst=folder / f"{stem}{'.png' if reasons else src.suffix}",
                           caption=cap if cap.is_file() else None))
    return items


def _build_subset(subset: Subset, scan: ScanResult, plan: list[_Item], out: Path, result: PrepareResult,
                  progress: Callable[[int], None]) -> dict:
    problems: dict[str, list[str]] = {scan.relative(p): [reason] for p, reason in scan.skipped.items()}
    for path, warnings in scan.warnings.items():
        problems.setdefault(scan.relative(path), []).extend(warnings)
    files, captions = [], []
    encodings: dict[str, str] = {}
    counts = {"found": len(scan.images) + len(scan.skipped), "usable": len(scan.images), "copied": 0,
              "converted": 0, "skipped": len(scan.skipped), "duplicates": len(scan.duplicates),
              "small": len(scan.warnings), "captioned": 0, "uncaptioned": 0}
    for n, item in enumerate(plan, 1):
        rel, src, dst, reasons = item.rel, item.src, item.dst, item.reasons
        if dst.stem != src.stem:
            problems.setdefault(rel, []).append(f"renamed to {dst.name}: another image has the same name")
        if reasons:
            _write_if_changed(dst, _png_bytes(src), result)
            problems.setdefault(rel, []).append("written as PNG: " + "; ".join(reasons))
            counts["converted"] += 1
        else:
            _copy_if_changed(src, dst, result)
            counts["copied"] += 1
        entry = {"source": rel, "image": _rel(dst, out), "caption": None, "action":
                 "converted" if reasons else "copied", "size": list(item.info.size)}
        cap = item.caption
        if cap is not None:
            data, text, encoding = _caption_bytes(cap)
            cap_rel = scan.relative(cap)
            if encoding != "utf-8":
                encodings[cap_rel] = encoding
                entry["caption_encoding"] = encoding
                if encoding != "utf-8-sig":  # a BOM is only dropped; anything else was converted
                    problems.setdefault(rel, []).append(
                        f"caption {cap.name} is {encoding_label(encoding)}, not UTF-8: converted to UTF-8 "
                        "(check its accents; save captions as UTF-8)")
            if not split_tags(text):
                problems.setdefault(rel, []).append(f"caption {cap.name} is empty")
            _write_if_changed(item.caption_dst, data, result)
            entry["caption"] = _rel(item.caption_dst, out)
            captions.append(text)
            counts["captioned"] += 1
        else:
            counts["uncaptioned"] += 1
            problems.setdefault(rel, []).append(
                f"no caption file: training will use the folder's name '{subset.name}' as its caption")
        files.append(entry)
        progress(n)
    return {"kind": subset.kind, "source": str(subset.source), "folder": subset.folder, "name": subset.name,
            "repeats": subset.repeats, "counts": counts, "files": files, "problems": problems,
            "tag_frequency": tag_frequency(captions), "caption_encodings": encodings}


def _unique_stem(stem: str, used: set[str]) -> str:
    # Kohya pairs image and caption by stem, and Windows/macOS ignore case: compare case-folded.
    candidate, n = stem, 1
    while candidate.casefold() in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate.casefold())
    return candidate


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _sum_counts(parts: list[dict]) -> dict:
    total: dict[str, int] = {}
    for part in parts:
        for k, v in part["counts"].items():
            total[k] = total.get(k, 0) + v
    if len(parts) > 1:
        total["class_images"] = parts[1]["counts"]["usable"]
    return total
