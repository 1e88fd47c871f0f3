"""Loading and checking images: one careful decoder used by the tagger, the preparer and the trainer.

`load_image(path)` returns a fully decoded RGB `PIL.Image` the same way everywhere:
first frame of an animation, EXIF orientation applied, transparency composited on white,
palette / CMYK / 16-bit / float images converted with their value range kept.
`scan_images(folder)` sorts a folder into usable images and skipped files with a reason each.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError

log = logging.getLogger(__name__)

# What Pillow decodes and we accept as dataset images.
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".tga", ".ppm", ".pgm"}
)
# What kohya sd-scripts (and so every Kohya-format tool) globs for; others get converted to PNG.
KOHYA_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# Image formats users have that Pillow cannot decode: skipped with a remedy instead of "not an image".
UNSUPPORTED_IMAGE_EXTENSIONS = {
    ".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL", ".psd": "Photoshop",
    ".svg": "SVG", ".raw": "camera RAW", ".cr2": "camera RAW", ".nef": "camera RAW",
    ".arw": "camera RAW", ".dng": "camera RAW",
}
# Files that belong beside images in a dataset: never reported as problems.
SIDE_FILE_EXTENSIONS = frozenset({".txt", ".caption", ".json", ".toml", ".npz", ".yaml"})

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_16BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


class ImageLoadError(DatasetError):
    """One image cannot be used; `reason` is the short per-file text shown in reports."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"Image {path.name} {reason}; re-export it or remove it from the folder.")
        self.path = path
        self.reason = reason


@dataclass
class ImageInfo:
    """Facts about one decoded image, used to decide whether a file can be copied as is."""

    path: Path
    size: tuple[int, int]  # (width, height) after EXIF orientation
    mode: str  # mode as stored in the file
    format: str | None  # Pillow's format name ("JPEG", "PNG", ...)
    frames: int = 1
    exif_rotated: bool = False  # the file's EXIF orientation is not "normal"
    transparent: bool = False  # has pixels that are not fully opaque (composited on white)
    pixel_hash: str = ""  # sha256 of the decoded RGB pixels: equal for the same picture in any container

    @property
    def animated(self) -> bool:
        return self.frames > 1

    @property
    def plain(self) -> bool:
        """Any reader (kohya sd-scripts included) gets the same picture from the file's bytes."""
        return (self.path.suffix.lower() in KOHYA_EXTENSIONS and self.mode in ("RGB", "L", "P", "RGBA")
                and not self.animated and not self.exif_rotated and not self.transparent)


@dataclass
class ScanResult:
    """A folder sorted into usable images (in name order) and skipped files with reasons."""

    root: Path
    images: list[Path] = field(default_factory=list)
    info: dict[Path, ImageInfo] = field(default_factory=dict)
    skipped: dict[Path, str] = field(default_factory=dict)
    warnings: dict[Path, list[str]] = field(default_factory=dict)
    duplicates: dict[Path, Path] = field(default_factory=dict)  # skipped copy -> the image kept

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode `path` fully into an RGB image (see module docstring); raise ImageLoadError if unusable."""
    return decode_image(Path(path))[0]


def decode_image(path: Path) -> tuple[Image.Image, ImageInfo]:
    """`load_image` plus the facts the preparer needs (`ImageInfo`, pixel hash left empty)."""
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(path, "is empty (0 bytes)")
        with Image.open(path) as img:
            frames = int(getattr(img, "n_frames", 1) or 1)
            if frames > 1:
                img.seek(0)
            img.load()  # full decode now: truncated data fails here, not later in training
            fmt, mode = img.format, img.mode
            orientation = _exif_orientation(img)
            oriented = ImageOps.exif_transpose(img) if orientation not in (0, 1) else img
            rgb, transparent = to_rgb(oriented)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(path, f"has too many pixels to be safe to open (a decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(path, "is not an image Pillow can read") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e)
        if "truncated" in text.lower() or isinstance(e, EOFError):
            raise ImageLoadError(path, f"is truncated or corrupt ({text})") from e
        raise ImageLoadError(path, f"cannot be decoded ({text})") from e
    info = ImageInfo(path=path, size=rgb.size, mode=mode, format=fmt, frames=frames,
                     exif_rotated=orientation not in (0, 1), transparent=transparent)
    return rgb, info


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any Pillow mode to 8-bit RGB; return (image, whether transparency was composited)."""
    mode = img.mode
    if mode in _16BIT_MODES:
        # Pillow's convert("L") clips 16-bit values at 255 (a white image); scale the range instead.
        values = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        values = np.asarray(img).astype(np.float64)
        scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "CMYK":
        return _cmyk_to_rgb(img), False
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] == 255:
            return rgba.convert("RGB"), False
        # White like SmilingWolf's tagger: a transparent background is not black (what convert("RGB") gives).
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB"), True
    return (img if img.mode == "RGB" else img.convert("RGB")), False


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:  # the embedded profile knows the inks; Pillow's plain formula is only an approximation
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # no littlecms or a broken profile: fall back below
            log.debug("ICC conversion failed for a CMYK image", exc_info=True)
    return img.convert("RGB")


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # malformed EXIF must not make a good picture unusable
        log.debug("unreadable EXIF ignored", exc_info=True)
        return 1


def pixel_hash(rgb: Image.Image) -> str:
    h = hashlib.sha256()
    h.update(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def iter_candidates(folder: Path, recursive: bool, skipped: dict[Path, str]) -> Iterator[Path]:
    """Image files under `folder` in name order; everything else that is not a side file goes to `skipped`."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"Folder {folder} cannot be read ({e.strerror}); check the path and its permissions.") from e
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            if entry.is_dir() and not recursive:
                continue
            skipped[path] = "hidden folder, not scanned" if entry.is_dir() else "hidden file"
            continue
        if entry.is_dir():
            if recursive and entry.is_symlink():  # a link back up the tree would recurse forever
                skipped[path] = "linked folder, not followed"
            elif recursive:
                yield from iter_candidates(path, recursive, skipped)
            continue
        if not entry.is_file():
            skipped[path] = "not a regular file"
            continue
        ext = path.suffix.lower()
        if ext in IMAGE_EXTENSIONS:
            yield path
        elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
            skipped[path] = (f"{UNSUPPORTED_IMAGE_EXTENSIONS[ext]} images cannot be read; "
                             "convert it to JPEG or PNG")
        elif ext not in SIDE_FILE_EXTENSIONS:
            skipped[path] = "not an image file"


def scan_images(folder: str | os.PathLike[str], recursive: bool = False, *,
                min_size: int | None = None, dedupe: bool = True) -> ScanResult:
    """Decode every image under `folder`; sort them into usable and skipped (with a reason each).

    `min_size`: the training resolution; images whose shorter side is under half of it are kept
    but get a warning (they would be upscaled a lot). Duplicates (same decoded pixels) are skipped.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"Folder {root} does not exist; check the path.")
    result = ScanResult(root=root)
    first_by_hash: dict[str, Path] = {}
    for path in iter_candidates(root, recursive, result.skipped):
        try:
            rgb, info = decode_image(path)
        except ImageLoadError as e:
            result.skipped[path] = e.reason
            continue
        info.pixel_hash = pixel_hash(rgb)
        if dedupe and info.pixel_hash in first_by_hash:
            original = first_by_hash[info.pixel_hash]
            result.duplicates[path] = original
            result.skipped[path] = f"duplicate of {result.relative(original)}"
            continue
        first_by_hash[info.pixel_hash] = path
        result.images.append(path)
        result.info[path] = info
        if min_size and min(info.size) * 2 < min_size:
            result.warnings.setdefault(path, []).append(
                f"small image ({info.size[0]}x{info.size[1]}) for training at {min_size}px; it will be upscaled")
    return result
