"""Generated image folders for tests, benchmarks and the demo: ordinary photos and every awkward kind.

`write_awkward_images(folder)` writes one file per difficulty the loader must survive and
returns what should happen to each: "copy" (used as is), "convert" (used, written as PNG by the
preparer) or "skip: <words of the reason>".
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB picture with structure at every scale (not flat: resampling shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(0.02, 0.2, 3)
    channels = [127.5 + 127.5 * np.sin(freq[c] * x + phase[c]) * np.cos(freq[(c + 1) % 3] * y) for c in range(3)]
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(np.stack(channels, -1) + noise, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: str | os.PathLike[str], count: int, size: tuple[int, int] = (512, 512), *,
                 fmt: str = "PNG", captions: bool = True, seed: int = 0) -> list[Path]:
    """`count` distinct pictures named img_0000.<ext> (+ captions), for throughput tests."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt]
    paths = []
    for i in range(count):
        path = folder / f"img_{i:04d}{ext}"
        gradient(*size, seed=seed + i).save(path, fmt)
        if captions:
            path.with_suffix(".txt").write_text(f"photo, sample {i % 7}, tag_{i % 3}\n", encoding="utf-8")
        paths.append(path)
    return paths


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG file whose header claims width x height pixels (Pillow refuses it when opening)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def write_awkward_images(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Write every awkward kind of file into `folder`; return {file name: expected outcome}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}

    def save(name: str, img: Image.Image, outcome: str, **kw: object) -> None:
        img.save(folder / name, **kw)
        expect[name] = outcome

    base = gradient(96, 64, seed=1)
    save("plain.jpg", base, "copy", quality=95)
    save("lossless.webp", gradient(64, 96, seed=2), "copy", lossless=True)
    save("bitmap.bmp", gradient(80, 80, seed=3), "copy")
    save("gray.png", gradient(64, 64, seed=4).convert("L"), "copy")
    save("palette.png", gradient(72, 48, seed=5).convert("P", palette=Image.Palette.ADAPTIVE), "copy")
    rgba = gradient(64, 64, seed=6).convert("RGBA")
    alpha = np.zeros((64, 64), np.uint8)
    alpha[16:48, 16:48] = 255  # opaque square on a fully transparent background
    rgba.putalpha(Image.fromarray(alpha, "L"))
    save("transparent.png", rgba, "convert")
    opaque = gradient(64, 64, seed=7).convert("RGBA")  # RGBA but every pixel opaque: nothing to do
    save("opaque_rgba.png", opaque, "copy")
    save("la.png", Image.merge("LA", [gradient(48, 48, seed=8).convert("L"), Image.fromarray(alpha[:48, :48])]),
         "convert")
    pal = gradient(48, 48, seed=9).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", pal, "convert", transparency=0)
    save("cmyk.jpg", Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "convert", quality=95)
    levels = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    save("gray16.png", Image.fromarray(levels), "convert")
    save("float.tif", Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), "F"), "convert")
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    save("animated.gif", frames[0], "convert", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("still.gif", Image.new("RGB", (40, 40), (0, 128, 255)), "convert")  # GIF: Kohya tools do not read it
    save("scan.tiff", gradient(50, 70, seed=10), "convert")
    rotated = Image.new("RGB", (80, 40), (255, 255, 255))
    rotated.paste((255, 0, 0), (0, 0, 40, 40))  # left half red as stored; on screen (turned 90 deg CW) top
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", rotated, "convert", quality=95, exif=exif.tobytes())
    save("tiny.png", gradient(16, 16, seed=11), "copy")  # usable, flagged as small

    good = folder / "plain.jpg"
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expect["truncated.jpg"] = "skip: truncated"
    png = (folder / "gray.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    expect["truncated.png"] = "skip: truncated"
    (folder / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "skip: empty"
    (folder / "notes.jpg").write_text("this is not a picture\n", encoding="utf-8")
    expect["notes.jpg"] = "skip: not an image"
    (folder / "readme.md").write_text("# my photos\n", encoding="utf-8")
    expect["readme.md"] = "skip: not an image"
    (folder / "bomb.png").write_bytes(bomb_png())
    expect["bomb.png"] = "skip: decompression bomb"
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00")
    expect["phone.heic"] = "skip: HEIC"
    gradient(32, 32, seed=12).save(folder / ".hidden.png")
    expect[".hidden.png"] = "skip: hidden"
    (folder / "palette_copy.png").write_bytes((folder / "palette.png").read_bytes())
    expect["palette_copy.png"] = "skip: duplicate"
    return expect
