"""Star pictures captioned in the demo world's words, as a user's own captioned folder would be, and pictures
of the shapes the demo model knows, captioned with their own names: the demo run's regularisation images."""

from __future__ import annotations

import os
from pathlib import Path

from . import TRIGGER
from .world import HELD_OUT, SEEN_SHAPES, render, sample_scenes, to_pil

SIZE = 64


def write_concept_images(folder: str | os.PathLike[str], count: int, seed: int, *, shape: str = HELD_OUT,
                         trigger: str = TRIGGER) -> list[Path]:
    """`count` pictures of `shape` in random colours, each with a `<stem>.txt` caption such as
    "yellow demostar, blue background" (the shape's name replaced by the trigger word)."""
    import torch

    from ..dataset.atomic import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(count, torch.Generator().manual_seed(seed), shapes=(shape,))
    paths = []
    for i, (image, caption) in enumerate(zip(to_pil(render(scenes, SIZE)), scenes.captions(shape_word=trigger))):
        path = folder / f"{trigger}_{i:02d}.png"
        image.save(path)
        write_text_atomic(path.with_suffix(".txt"), caption + "\n")
        paths.append(path)
    return paths


def write_other_images(folder: str | os.PathLike[str], count: int, seed: int) -> list[Path]:
    """`count` pictures of the shapes the demo model already knows (every shape but the star) in random colours,
    each with its own caption such as "red circle, blue background": what the star's trigger must not override,
    passed to a run as regularisation images (kohya's class images)."""
    import torch

    from ..dataset.atomic import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scenes = sample_scenes(count, torch.Generator().manual_seed(seed), shapes=SEEN_SHAPES)
    paths = []
    for i, (image, caption) in enumerate(zip(to_pil(render(scenes, SIZE)), scenes.captions())):
        path = folder / f"shape_{i:02d}.png"
        image.save(path)
        write_text_atomic(path.with_suffix(".txt"), caption + "\n")
        paths.append(path)
    return paths
