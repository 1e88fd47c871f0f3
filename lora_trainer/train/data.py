"""Kohya dataset folders: scan, validate, assign buckets, and order each epoch's batches.

Layout: <data>/img/<repeats>_<name>/ (or <data> itself holding <repeats>_<name>/), optional
<data>/reg/<repeats>_<class>/. Captions share the image's stem (`.txt`, else `.caption`); without
one the folder's class tokens (the part after `N_`) are the caption.
"""

from __future__ import annotations

import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..dataset.captions import read_caption
from ..dataset.images import load_image
from ..errors import DatasetError
from .buckets import BucketChoice, BucketSelector
from .events import TrainingPlan

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass
class ImageItem:
    path: Path
    caption: str  # raw caption (before per-step shuffle/dropout)
    class_tokens: str
    folder: str
    repeats: int
    is_reg: bool
    size: tuple[int, int]  # (width, height) after EXIF rotation
    choice: BucketChoice | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        assert self.choice is not None
        return self.choice.bucket


@dataclass
class Dataset:
    items: list[ImageItem]
    img_root: Path
    reg_root: Path | None
    warnings: list[str]
    held_out: list[ImageItem] = field(default_factory=list)  # validation images, never trained on (report.py)
    leak_check: list[ImageItem] = field(default_factory=list)  # other concepts' pictures, the report's leakage only

    @property
    def train_items(self) -> list[ImageItem]:
        return [i for i in self.items if not i.is_reg]

    def class_tokens(self) -> list[str]:
        seen: dict[str, None] = {}
        for item in self.train_items:
            seen.setdefault(item.class_tokens, None)
        return list(seen)


def resolve_roots(data: str | Path, reg_data: str | Path = "") -> tuple[Path, Path | None]:
    root = Path(data)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist; check the path.")
    img_root = root / "img" if (root / "img").is_dir() else root
    reg_root: Path | None = None
    if reg_data:
        reg_root = Path(reg_data)
        if not reg_root.is_dir():
            raise DatasetError(f"Regularisation folder {reg_root} does not exist; check the path.")
    elif (root / "reg").is_dir() and img_root != root:
        reg_root = root / "reg"
    return img_root, reg_root


def scan_dataset(data: str | Path, reg_data: str | Path = "", *, caption_extension: str = ".txt",
                 decode: bool = True) -> Dataset:
    """Read every folder and image once (fail fast on anything unusable).

    decode=False reads only image headers (sizes, EXIF orientation): quick enough for a UI that
    recomputes the plan as settings change; training always decodes everything up front.
    """
    img_root, reg_root = resolve_roots(data, reg_data)
    warnings: list[str] = []
    items = _scan_root(img_root, False, caption_extension, warnings, decode)
    if not items:
        raise DatasetError(f"Dataset folder {img_root} holds no images; add images under "
                           f"{img_root}/<repeats>_<name>/ (e.g. 10_mychar).")
    if reg_root is not None:
        items += _scan_root(reg_root, True, caption_extension, warnings, decode)
    for w in warnings:
        log.warning(w)
    return Dataset(items, img_root, reg_root, warnings)


def _scan_root(root: Path, is_reg: bool, caption_extension: str, warnings: list[str],
               decode: bool = True) -> list[ImageItem]:
    kind = "regularisation" if is_reg else "dataset"
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders and loose:
        raise DatasetError(f"Images in {root} are not inside a <repeats>_<name> folder; move them into "
                           f"e.g. {root}/10_{root.name}/ (10 = repeats per epoch).")
    items: list[ImageItem] = []
    for folder in folders:
        m = _FOLDER.match(folder.name)
        if not m:
            raise DatasetError(f"The {kind} folder '{folder.name}' has no <repeats>_ prefix; "
                               f"rename it like 10_{folder.name} (10 = repeats per epoch).")
        repeats, class_tokens = int(m.group(1)), m.group(2).strip()
        if repeats <= 0:
            raise DatasetError(f"The {kind} folder '{folder.name}' has 0 repeats; use a number ≥ 1 "
                               f"in its prefix, e.g. 10_{class_tokens}.")
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            warnings.append(f"Folder {folder.name} holds no images; it is skipped.")
        for path, size in zip(files, _sizes(files, decode)):
            items.append(ImageItem(path, _caption_for(path, class_tokens, caption_extension, warnings),
                                   class_tokens, folder.name, repeats, is_reg, size))
    return items


def scan_leak_check(folder: str | Path, *, caption_extension: str = ".txt", decode: bool = True) -> list[ImageItem]:
    """The leak-check set (`leak_check_dir`): the folder's images, each with its same-named caption; never
    trained on, only scored for the report's leakage (train/validation.py)."""
    root = Path(folder)
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise DatasetError(f"Leak-check folder {root} holds no images; add pictures of other concepts with "
                           "same-named .txt captions, or leave leak_check_dir empty.")
    items = []
    for path, size in zip(files, _sizes(files, decode)):
        missing: list[str] = []
        caption = _caption_for(path, "", caption_extension, missing)
        if missing or not caption.strip():
            raise DatasetError(f"Leak-check image {path.name} has no caption; add {path.stem}"
                               f"{caption_extension or '.txt'} saying what it shows (e.g. 'red circle').")
        items.append(ImageItem(path, caption, "", root.name, 0, True, size))
    return items


def _decoded_size(path: Path) -> tuple[int, int]:
    return load_image(path).size  # decoding fully makes a broken file fail here, before any training


def _sizes(files: list[Path], decode: bool) -> list[tuple[int, int]]:
    """Image sizes in file order; full decodes run in threads (Pillow releases the GIL), and the
    first broken file in name order raises, as a sequential scan would."""
    if not decode:
        return [_header_size(p) for p in files]
    workers = min(8, os.cpu_count() or 1, len(files))
    if workers <= 1:
        return [_decoded_size(p) for p in files]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan-decode") as pool:
        return list(pool.map(_decoded_size, files))


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DatasetError(f"Image {path.name} cannot be read ({e.__class__.__name__}); "
                           "re-export it or remove it from the folder.") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # EXIF rotations by 90°


def _caption_for(path: Path, class_tokens: str, extension: str, warnings: list[str]) -> str:
    for ext in dict.fromkeys((extension or ".txt", ".caption")):
        candidate = path.with_suffix(ext)
        if candidate.is_file():
            return read_caption(candidate)
    warnings.append(f"{path.name} has no caption file; using the folder's class tokens '{class_tokens}'.")
    return class_tokens


def assign_buckets(dataset: Dataset, selector: BucketSelector) -> None:
    for item in dataset.items:
        item.choice = selector.select(*item.size)


def epoch_repeats(dataset: Dataset) -> list[int]:
    """How often each item appears per epoch: its folder's repeats; regularisation images are cycled
    until they balance the training samples (kohya's rule: extra repeats one image at a time)."""
    counts = [i.repeats if not i.is_reg else 0 for i in dataset.items]
    n_train = sum(counts)
    reg = [k for k, i in enumerate(dataset.items) if i.is_reg]
    n, first = 0, True
    while reg and n < n_train:
        for k in reg:
            if first:
                counts[k] = dataset.items[k].repeats
                n += counts[k]
            else:
                counts[k] += 1
                n += 1
            if n >= n_train:
                break
        first = False
    return counts


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Item indices per batch for one epoch; a pure function of (seed, epoch) so resuming mid-epoch
    replays the same order. Batches never mix buckets (one latent shape per batch)."""
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for k, count in enumerate(epoch_repeats(dataset)):
        by_bucket.setdefault(dataset.items[k].bucket, []).extend([k] * count)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        rng.shuffle(idx)
        batches += [idx[s:s + batch_size] for s in range(0, len(idx), batch_size)]
    order = rng.permutation(len(batches))
    return [batches[o] for o in order]


def make_plan(dataset: Dataset, *, batch_size: int, grad_accum: int, epochs: int, max_steps: int) -> TrainingPlan:
    counts = epoch_repeats(dataset)
    buckets: dict[tuple[int, int], int] = {}
    for item, c in zip(dataset.items, counts):
        if c:
            buckets[item.bucket] = buckets.get(item.bucket, 0) + c
    batches = sum(math.ceil(n / batch_size) for n in buckets.values())
    steps_per_epoch = math.ceil(batches / grad_accum)
    if max_steps > 0:
        total, epochs = max_steps, math.ceil(max_steps / steps_per_epoch)
    else:
        total = steps_per_epoch * epochs
    folders: dict[str, list[int]] = {}
    for item in dataset.items:
        f = folders.setdefault(("reg/" if item.is_reg else "") + item.folder, [0, item.repeats])
        f[0] += 1
    train = [i for i, c in zip(dataset.items, counts) if not i.is_reg]
    return TrainingPlan(
        num_images=len(train),
        num_reg_images=len(dataset.items) - len(train),
        images_x_repeats=sum(i.repeats for i in train),
        reg_x_repeats=sum(c for i, c in zip(dataset.items, counts) if i.is_reg),
        samples_per_epoch=sum(counts),
        batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=total,
        buckets={f"{w}x{h}": n for (w, h), n in sorted(buckets.items())},
        folders=[f"{name}: {n} images × {r} repeats" for name, (n, r) in folders.items()],
    )


def image_tensor(item: ImageItem) -> torch.Tensor:
    """The image scaled to cover its bucket and centre-cropped, as a (3, H, W) tensor in [-1, 1]."""
    from PIL import Image

    assert item.choice is not None
    image = load_image(item.path)
    rw, rh = item.choice.resized
    if image.size != (rw, rh):
        image = image.resize((rw, rh), Image.LANCZOS)
    top, left = item.choice.crop_top_left
    bw, bh = item.choice.bucket
    image = image.crop((left, top, left + bw, top + bh))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
