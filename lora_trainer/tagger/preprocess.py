"""Image preprocessing identical to SmilingWolf's wd-tagger reference.

load_image (EXIF orientation, alpha composited on white, RGB) -> centred white padding to a square
-> BICUBIC resize to the model's size (skipped when already that size) -> float32 0-255 -> RGB to BGR.
One image gives HWC; a batch stacks them to NHWC.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def pad_square(image: Image.Image) -> Image.Image:
    """Centre `image` on a white square; odd padding puts the extra pixel right/bottom."""
    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image (from `load_image`) -> float32 BGR array of shape (size, size, 3), values 0-255."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    square = pad_square(image)
    if square.width != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(array[:, :, ::-1])
