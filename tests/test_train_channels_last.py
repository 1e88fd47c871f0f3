"""accel's channels_last (on by default, CUDA only) through the real engine: caching, steps, the epoch-end scoring,
saving and a conv LoRA whose 3×3 adapters become channels_last.

No GPU here: the engine's `accel.prepare_model` call is wrapped to pass no device, which prepare treats as CUDA's
case for channels_last (the model NHWC, the NHWC transformer outputs); the NHWC GroupNorm
and with it the fused resnets run in Triton's interpreter where Triton (>= 3) is, else torch's norm."""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import os

import torch
from train_support import lora_tensors, tiny_config, tiny_data, tiny_sd1_ckpt  # noqa: F401

from lora_trainer import accel
from lora_trainer.accel import prepare
from lora_trainer.train import run_training


def _triton() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return int(triton.__version__.split(".")[0]) >= 3 and os.environ.get("TRITON_INTERPRET") == "1"


TRITON = _triton()


def test_channels_last_run_is_the_plain_run(tmp_path, tiny_data, tiny_sd1_ckpt, monkeypatch):
    # from a checkpoint file: the engine's own model (never channels_last over a host's weights)
    settings = {"model": str(tiny_sd1_ckpt), "max_steps": 4, "conv_rank": 4, "conv_alpha": 2.0, "learning_rate": 2e-3}
    plain = run_training(tiny_config(tiny_data, tmp_path / "a", **settings))

    real_prepare = accel.prepare_model
    seen: list[tuple[dict, bool]] = []

    def prepare_as_on_cuda(model, opts=None, *, device=None):
        done = real_prepare(model, opts, device=None)
        conv_adapters = [p for n, p in model.named_parameters() if p.dim() == 4 and p.shape[-1] == 3 and "lora_" in n]
        seen.append((done, bool(conv_adapters) and all(
            p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in conv_adapters)))
        return done

    monkeypatch.setattr(accel, "prepare_model", prepare_as_on_cuda)
    if TRITON:  # the NHWC GroupNorms (and with them the fused resnets) in Triton's interpreter, as on a GPU
        monkeypatch.setattr(prepare, "fused_math_available", lambda device: True)
    nhwc = run_training(tiny_config(tiny_data, tmp_path / "b", **settings))

    done, adapters_nhwc = seen[0]
    assert done["channels_last"] == 1 and done["nhwc_block_outputs"] > 0
    assert (done["fused_resnets"] > 0 and done["nhwc_group_norms"] > 0) == TRITON
    assert adapters_nhwc  # the 3×3 conv adapters trained channels_last
    assert nhwc.steps == plain.steps == 4
    assert nhwc.report is not None and plain.report is not None  # the "did it learn?" scoring ran on the NHWC model
    torch.testing.assert_close(nhwc.losses, plain.losses, rtol=1e-4, atol=1e-6)
    a, b = lora_tensors(plain.lora_path), lora_tensors(nhwc.lora_path)  # saved contiguous, as kohya's files are
    assert a.keys() == b.keys() and any(t.dim() == 4 and t.shape[-1] == 3 for t in b.values())
    for key in a:
        # Adam turns a gradient at noise level (a time embedding's, here) into a step of about the learning rate
        # whatever its size: the two layouts' sums in another order may move such weights by up to one step
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=settings["learning_rate"], msg=key)
