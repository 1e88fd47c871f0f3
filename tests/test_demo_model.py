"""The shipped demo model and its synthetic world (lora_trainer.demo)."""

from __future__ import annotations

import torch

from lora_trainer.demo import DEMO_MODEL, TRIGGER
from lora_trainer.demo.dataset import write_concept_images
from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, SHAPES, render, sample_scenes


def test_demo_model_ships_small_and_loads_as_sd1():
    from lora_trainer.models.bundle import Family
    from lora_trainer.models.loader import load_model

    assert DEMO_MODEL.is_file() and DEMO_MODEL.stat().st_size < 25 * 2**20
    bundle = load_model(DEMO_MODEL, dtype=torch.float32)
    assert bundle.family == Family.SD1 and bundle.unet.config.cross_attention_dim == 64
    # every word of the world is one CLIP token; the trigger is not one of them
    tokenizer = bundle.tokenizers[0]
    assert all(len(tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in SHAPES + ("background",))
    assert TRIGGER not in tokenizer.get_vocab() and HELD_OUT not in SEEN_SHAPES


def test_world_renders_each_shape_differently():
    g = torch.Generator().manual_seed(0)
    scenes = sample_scenes(len(SHAPES), g, shapes=SHAPES)
    for i, shape in enumerate(SHAPES):  # same place, size and colours: only the outline differs
        scenes.shape[i], scenes.cx[i], scenes.cy[i], scenes.radius[i] = SHAPES.index(shape), 0.5, 0.5, 0.35
        scenes.colour[i], scenes.background[i], scenes.rotation[i] = 0, 5, 0.0
    images = render(scenes, 64)
    assert images.shape == (len(SHAPES), 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    flat = images.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(SHAPES)) * 1e3).min() > 1.0


def test_concept_images_are_captioned_with_the_trigger(tmp_path):
    paths = write_concept_images(tmp_path, 3, seed=1)
    assert len(paths) == 3
    for path in paths:
        caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        _colour, rest = caption.split(" ", 1)
        assert rest.startswith(f"{TRIGGER}, ") and rest.endswith(" background")
