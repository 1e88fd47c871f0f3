"""Build a Kohya dataset folder from a folder of images: `OUT/img/<repeats>_<concept>/` (+ `OUT/reg/`).

Originals are only ever read. Images any Kohya-format tool reads the same way are copied byte
for byte (name and modification time kept); the rest (animated, CMYK, 16-bit, transparent,
EXIF-rotated, or a format sd-scripts does not glob such as GIF/TIFF) are written as
`<same stem>.png` holding exactly what `load_image` decodes. Captions are copied as UTF-8.
Every write is atomic and skipped when the file already holds the same bytes; files a previous
run wrote that are no longer wanted (an old `<repeats>_<concept>` folder, a removed photo) are
deleted using the previous `dataset.json`, so re-running gives the same tree and no duplicates.
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
from .atomic import copy_atomic, write_bytes_atomic
from .captions import caption_path, read_caption_checked, split_tags, tag_frequency
from .images import ImageInfo, ScanResult, decode_image, scan_images
from .names import validate_name, validate_repeats

log = logging.getLogger(__name__)

MANIFEST = "dataset.json"
MANIFEST_VERSION = 1
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


def prepare_dataset(source: str | os.PathLike[str], out: str | os.PathLike[str], concept: str, *,
                    repeats: int | None = None, class_images: str | os.PathLike[str] | None = None,
                    class_name: str | None = None, class_repeats: int = 1, recursive: bool = False,
                    resolution: int = 512,
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
    previous = _previous_outputs(out)
    total = sum(len(s.images) for _, s in scans)
    done = 0
    parts = []
    for subset, (_, scan) in zip(subsets, scans):
        def progress(n: int, _base: int = done) -> None:
            if on_progress:
                on_progress(_base + n, total)
        parts.append(_build_subset(subset, scan, out, result, progress))
        done += len(scan.images)

    wanted = {p for part in parts for f in part["files"] for p in (f["image"], f["caption"]) if p}
    for rel in sorted(previous - wanted):
        _remove_stale(out, rel, result)
    reg_count = parts[1]["counts"]["usable"] if len(parts) > 1 else 0
    manifest = {
        "version": MANIFEST_VERSION,
        "counts": _sum_counts(parts),
        "training": {**steps_plan(parts[0]["counts"]["usable"], repeats, reg_count),
                     "suggested_repeats": suggest_repeats(parts[0]["counts"]["usable"])},
        "problems": {f"{p['kind']}:{k}": v for p in parts for k, v in p["problems"].items()},
        "tag_frequency": parts[0]["tag_frequency"],
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


def _previous_outputs(out: Path) -> set[str]:
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        return {str(p) for p in data.get("outputs", []) if isinstance(p, str)}
    except (OSError, ValueError, AttributeError):
        return set()


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


def _build_subset(subset: Subset, scan: ScanResult, out: Path, result: PrepareResult,
                  progress: Callable[[int], None]) -> dict:
    folder = out / subset.folder
    problems: dict[str, list[str]] = {scan.relative(p): [reason] for p, reason in scan.skipped.items()}
    for path, warnings in scan.warnings.items():
        problems.setdefault(scan.relative(path), []).extend(warnings)
    files, captions = [], []
    used_stems: set[str] = set()
    counts = {"found": len(scan.images) + len(scan.skipped), "usable": len(scan.images), "copied": 0,
              "converted": 0, "skipped": len(scan.skipped), "duplicates": len(scan.duplicates),
              "small": len(scan.warnings), "captioned": 0, "uncaptioned": 0}
    for n, src in enumerate(scan.images, 1):
        rel = scan.relative(src)
        info = scan.info[src]
        reasons = conversion_reasons(info)
        suffix = ".png" if reasons else src.suffix
        stem = _unique_stem(src.stem, used_stems)
        if stem != src.stem:
            problems.setdefault(rel, []).append(f"renamed to {stem}{suffix}: another image has the same name")
        dst = folder / f"{stem}{suffix}"
        if reasons:
            rgb, _ = decode_image(src)
            buf = io.BytesIO()
            rgb.save(buf, "PNG")
            _write_if_changed(dst, buf.getvalue(), result)
            problems.setdefault(rel, []).append("written as PNG: " + "; ".join(reasons))
            counts["converted"] += 1
        else:
            _copy_if_changed(src, dst, result)
            counts["copied"] += 1
        entry = {"source": rel, "image": _rel(dst, out), "caption": None, "action":
                 "converted" if reasons else "copied", "size": list(info.size)}
        cap = caption_path(src)
        if cap.is_file():
            text, warning = read_caption_checked(cap)
            if warning:
                problems.setdefault(rel, []).append(f"caption {cap.name} {warning}")
            if not split_tags(text):
                problems.setdefault(rel, []).append(f"caption {cap.name} is empty")
            cap_dst = dst.with_suffix(".txt")
            _write_if_changed(cap_dst, (text + "\n").encode("utf-8"), result)
            entry["caption"] = _rel(cap_dst, out)
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
            "tag_frequency": tag_frequency(captions)}


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
