"""A dataset of random-pixel pictures for benchmarks (PNG decoding as costly as it gets), shared by the
benchmarks that time whole commands (`e2e_vs_kohya.py`, `ddp_scaling.py`)."""

from __future__ import annotations

from pathlib import Path


def random_pixels_dataset(root: Path, size: int, count: int, *, repeats: int, caption: str) -> Path:
    """`root/img/<repeats>_bench/NNN.png` (size x size, one bucket) + `NNN.txt` holding `caption.format(i=i)`;
    a folder that already holds `count` pictures is kept as it is."""
    import numpy as np
    from PIL import Image

    folder = root / "img" / f"{repeats}_bench"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png",
                                                                                     compress_level=1)
        (folder / f"{i:03d}.txt").write_text(caption.format(i=i), encoding="utf-8")
    return root
