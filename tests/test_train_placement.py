"""A model the engine loads itself: memory-mapped, cast part by part on the way to the device,
parts the run is done with dropped; a host's model only moved. (GPU side: test_train_cuda.py.)"""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_support import tiny_config, tiny_data  # noqa: F401

from lora_trainer.models.bundle import Family
from lora_trainer.models.loader import load_model
from lora_trainer.models.tiny import build_tiny_bundle, write_tiny_checkpoint
from lora_trainer.train import run_training
from lora_trainer.train.placement import Placement, training_dtypes, vae_dtype


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory) -> Path:
    """A tiny SD1 checkpoint stored in fp16, as most real checkpoints are."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("fp16")
    path = write_tiny_checkpoint(folder, "sd1", seed=0)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, str(path))
    return path


def test_lazy_load_keeps_the_files_tensors_as_stored(fp16_ckpt):
    bundle = load_model(fp16_ckpt, dtype=None, device=None)
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
        assert {p.device.type for p in module.parameters()} == {"cpu"}
    # the same numbers as an fp32 load, only not converted yet
    eager = load_model(fp16_ckpt)
    for a, b in zip(bundle.unet.parameters(), eager.unet.parameters()):
        assert torch.equal(a.float(), b)


def test_owned_parts_are_cast_on_the_way_and_dropped_when_done(fp16_ckpt):
    bundle = load_model(fp16_ckpt, dtype=None, device=None)
    place = Placement(bundle, "cpu", torch.float32)
    assert place.owns(bundle.unet) and place.owns(bundle.vae)
    place.to(bundle.vae, "cpu")
    assert {p.dtype for p in bundle.vae.parameters()} == {torch.float32}
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float16}  # untouched until needed
    place.release(bundle.vae, needed_later=False)
    assert {p.device.type for p in bundle.vae.parameters()} == {"meta"}
    te = bundle.text_encoders[0]
    place.to(te, "cpu")
    place.release(te, needed_later=True)  # sampling later: kept on the CPU, in its training dtype
    assert {(p.device.type, p.dtype) for p in te.parameters()} == {("cpu", torch.float32)}
    assert not place.upload_in_background(bundle.unet)  # CPU: nothing to overlap
    place.close()


def test_a_hosts_model_is_only_moved_never_cast_or_dropped():
    bundle = build_tiny_bundle(Family.SD1)
    bundle.vae.to(torch.float16)
    place = Placement(bundle, "cpu", None)
    assert not place.owns(bundle.vae)
    place.to(bundle.vae, "cpu")
    place.release(bundle.vae, needed_later=False)
    assert {(p.device.type, p.dtype) for p in bundle.vae.parameters()} == {("cpu", torch.float16)}


@pytest.mark.parametrize(("family", "dtype", "expected"), [
    (Family.SDXL, torch.float16, torch.float32),  # SDXL's fp16 VAE overflows
    (Family.SDXL, torch.bfloat16, torch.bfloat16),  # bf16 has fp32's range (kohya's default too)
    (Family.SD1, torch.float16, torch.float16),
    (Family.SD1, torch.float32, torch.float32),
])
def test_vae_dtype(family, dtype, expected):
    bundle = build_tiny_bundle(family)
    assert vae_dtype(bundle, dtype) == expected
    dtypes = training_dtypes(bundle, dtype)
    assert dtypes[id(bundle.vae)] == expected and dtypes[id(bundle.unet)] == dtype


def test_training_from_a_file_equals_training_the_same_model_in_memory(tmp_path, tiny_data, fp16_ckpt):
    """The lazy path (file → parts cast as they are needed, VAE/text encoder dropped after caching)
    trains exactly what a model held in memory trains."""
    from_file = run_training(tiny_config(tiny_data, tmp_path / "a", model=str(fp16_ckpt), max_steps=3))
    held = load_model(fp16_ckpt)  # fp32 in memory, as a host would hand it over
    in_memory = run_training(tiny_config(tiny_data, tmp_path / "b", model=str(fp16_ckpt), max_steps=3), bundle=held)
    assert from_file.losses == in_memory.losses
    assert {p.device.type for p in held.vae.parameters()} == {"cpu"}  # a host's VAE is given back
