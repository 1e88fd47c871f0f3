"""Shared helpers for the training tests: tiny Kohya datasets and configs (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.config import TrainConfig

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 30), (200, 40, 200), (30, 200, 200)]


def shape_image(i: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A coloured disc or square on a grey background: simple, distinct, learnable."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 128, np.uint8)
    cx, cy, r = w / 2, h / 2, min(w, h) / 3
    mask = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) if i % 2 == 0 else (
        (abs(xx - cx) <= r) & (abs(yy - cy) <= r))
    img[mask] = COLOURS[i % len(COLOURS)]
    return Image.fromarray(img)


def make_dataset(root: Path, n: int = 3, repeats: int = 2, name: str = "shape", sizes=None,
                 captions: bool = True, reg: int = 0) -> Path:
    folder = root / "img" / f"{repeats}_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = sizes[i] if sizes else (64, 64)
        shape_image(i, size).save(folder / f"{i:02d}.png")
        if captions:
            kind = "circle" if i % 2 == 0 else "square"
            (folder / f"{i:02d}.txt").write_text(f"{name}, {kind}, colour {i}", encoding="utf-8")
    if reg:
        reg_folder = root / "reg" / "1_thing"
        reg_folder.mkdir(parents=True, exist_ok=True)
        for i in range(reg):
            shape_image(i + 3).save(reg_folder / f"r{i}.png")
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    base = {"data": str(data), "output_dir": str(out), "name": "tiny", "resolution": 64, "min_bucket_reso": 32,
                "max_bucket_reso": 128, "bucket_reso_steps": 32, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3,
                "epochs": 1, "batch_size": 1, "seed": 7, "device": "cpu", "save_precision": "float"}
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session")
def tiny_sd1_ckpt(tmp_path_factory) -> Path:
    """A tiny SD1 single-file checkpoint + yaml, written once per test session."""
    from lora_trainer.models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """3 images × 2 repeats in img/2_shape/ with captions (read-only: copy before changing)."""
    return make_dataset(tmp_path_factory.mktemp("data"))


def lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
