"""accel/group_norm_nhwc.py: the NHWC GroupNorm computes what F.group_norm computes, keeps channels_last, and takes
the GroupNorms of a real channels_last diffusers UNet.

Its kernels are Triton's: on a GPU compiled, without one in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 there), the same kernel code on the CPU. Where Triton is not installed (the CPU stacks' torch does
not bring it) the tests skip; CI installs it for the newest stack (.ci/run).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _why_not() -> str:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if DEVICE == "cpu":
        version = importlib.metadata.version("triton")
        if int(version.split(".")[0]) < 3:  # e.g. torch 2.1's Triton 2.1 (A1111's stack): no CPU interpreter
            return f"no GPU, and Triton {version}'s interpreter does not run on the CPU (3.0 and later do)"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "no GPU and Triton's interpreter not chosen (tests/conftest.py does)"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")


def _run(x, groups, weight, bias, dy, silu=False):
    from lora_trainer.accel.group_norm_nhwc import group_norm_nhwc

    x = x.detach().requires_grad_()
    y = group_norm_nhwc(x, groups, weight, bias, 1e-5, silu=silu)
    (y.float() * dy).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("shape,groups,affine", [
    ((2, 96, 5, 7), 32, True),  # channels past one 64-channel block, pixels not a multiple of 64
    ((1, 64, 9, 9), 8, False),  # no weight and bias
    ((3, 320, 4, 4), 32, True),  # SD's channels, a small picture
    ((1, 320, 33, 33), 4, True),  # 80 channels a group, 18 chunks of pixels: the per-group loop runs twice
])
@pytest.mark.parametrize("silu", [False, True])
def test_matches_torch_in_fp32_and_keeps_channels_last(shape, groups, affine, silu):
    """The norm (and with `silu` the norm then SiLU, one pass each way) equals torch's functions in fp32."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(DEVICE).contiguous(memory_format=torch.channels_last)
    c = shape[1]
    weight = torch.randn(c, generator=g).to(DEVICE) if affine else None
    bias = torch.randn(c, generator=g).to(DEVICE) if affine else None
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y, dx = _run(x, groups, weight, bias, dy, silu)
    ref_x = x.detach().contiguous().requires_grad_()
    ref = F.group_norm(ref_x, groups, weight, bias, 1e-5)
    ref = F.silu(ref) if silu else ref
    (ref * dy).sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_x.grad, rtol=1e-5, atol=1e-5)


def test_bf16_is_as_close_to_fp32_as_torchs_bf16_norm():
    """Statistics in fp32, one rounding of the output: no further from the fp32 norm than torch's bf16 kernel."""
    g = torch.Generator().manual_seed(1)
    shape = (2, 128, 8, 8)
    x = (torch.randn(shape, generator=g) * 2 + 5).bfloat16().to(DEVICE).contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(128, generator=g).bfloat16().to(DEVICE) for _ in range(2))
    dy = torch.randn(shape, generator=g).to(DEVICE)
    y, dx = _run(x, 32, weight, bias, dy)
    assert y.dtype == dx.dtype == torch.bfloat16
    exact_x = x.detach().float().contiguous().requires_grad_()
    exact = F.group_norm(exact_x, 32, weight.float(), bias.float(), 1e-5)
    (exact * dy).sum().backward()
    torch_x = x.detach().contiguous().requires_grad_()
    theirs = F.group_norm(torch_x, 32, weight, bias, 1e-5)
    (theirs.float() * dy).sum().backward()
    # the output within one bf16 unit in the last place of the exact value (Triton's interpreter rounds fp32 to bf16
    # toward zero, a GPU to nearest); output and input gradient no further off than twice torch's kernel's worst
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-6))) - 7)
    assert ((y.float() - exact).abs() <= ulp * 1.001 + 1e-6).all()
    for ours, torchs, ref in ((y, theirs, exact), (dx, torch_x.grad, exact_x.grad)):
        err, err_torch = (ours.float() - ref).abs().max(), (torchs.float() - ref).abs().max()
        assert err <= 2 * err_torch, (err, err_torch)


def test_other_inputs_take_torchs_norm():
    from lora_trainer.accel.group_norm_nhwc import group_norm_nhwc

    x = torch.randn(1, 64, 4, 4, device=DEVICE)  # NCHW
    assert group_norm_nhwc(x, 32).is_contiguous()
    # a trained weight gets its gradient from torch's norm (not run backward here: torch 2.13's CPU GroupNorm
    # backward crashes on a channels_last input with a weight to train)
    w = torch.ones(64, requires_grad=True, device=DEVICE)
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert "NHWC" not in group_norm_nhwc(xl, 32, w).grad_fn.name()
    assert "NHWC" in group_norm_nhwc(xl, 32, w.detach()).grad_fn.name()


def test_kernels_that_do_not_run_leave_torchs_norm_with_a_warning(monkeypatch, caplog):
    """An old Triton or a GPU it cannot compile for: checked once, said once, and torch's norm runs instead."""
    from lora_trainer.accel import group_norm_nhwc as gn

    def broken(interpret):
        raise RuntimeError("no kernels here")

    monkeypatch.setattr(gn, "_kernels", broken)
    monkeypatch.setattr(gn, "_checked", {})
    x = torch.randn(1, 64, 4, 4, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with caplog.at_level("WARNING"):
        y = gn.group_norm_nhwc(x, 32)
        gn.group_norm_nhwc(x, 32)
    assert [r.getMessage() for r in caplog.records if "do not run" in r.getMessage()] == [
        f"The NHWC GroupNorm's Triton kernels do not run on {x.device} (RuntimeError: no kernels here): torch's runs"]
    torch.testing.assert_close(y, F.group_norm(x, 32))


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU: tests/test_accel_cuda.py trains one under autocast")
def test_a_channels_last_unet_runs_its_group_norms_nhwc(monkeypatch):
    """A real diffusers UNet with LoRA, channels_last: the norms take the NHWC path (the lowp path's autocast dtype
    is mocked to fp32: CUDA autocast does not run here), with SiLU in the same pass in the resnets, so do the LoRA'd
    1×1 convolutions around the transformers, and the output and LoRA gradients are diffusers', torch's and
    peft's."""
    from accel_support import fwd_bwd, inputs, lora_unet

    from lora_trainer.accel import group_norm_nhwc as gn
    from lora_trainer.accel import lora_fast, norms
    from lora_trainer.accel.channels_last import use_channels_last
    from lora_trainer.accel.lora_fast import _pointwise_conv_lora

    real_gn = gn.group_norm_nhwc

    monkeypatch.setattr(norms, "_autocast_dtype", lambda x: torch.float32)
    calls = []

    real_is_nhwc = gn.is_nhwc

    def counted(x):  # each call of the NHWC-marked norms: was its input channels_last (or 1×1)?
        calls.append(real_is_nhwc(x) or x.shape[2] * x.shape[3] == 1)
        return real_is_nhwc(x)

    monkeypatch.setattr(gn, "is_nhwc", counted)  # group_norm_nhwc's own test of its input
    unet = lora_unet().to(memory_format=torch.channels_last)
    x, t, ctx, kw = inputs(unet, bs=2)
    batch = (x.contiguous(memory_format=torch.channels_last), t, ctx, kw)
    ref_out, ref_grads = fwd_bwd(unet, batch)
    n = norms.lowp_norms(unet, nhwc=True)
    assert n > 0 and norms.nhwc_group_norms(unet) == sum(type(m) is torch.nn.GroupNorm for m in unet.modules())
    # with the lean LoRA forward: the 1×1 proj_in convolutions after the norms run as Linear products on NHWC rows
    lora_fast.fuse_lora_layers(unet)
    # channels_last end to end: each resnet's norm + SiLU pairs fused (where their input is NHWC, not 1×1)
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert use_channels_last(unet)["fused_resnets"] == len(resnets) > 0
    fused = []
    monkeypatch.setattr(norms, "group_norm_nhwc", lambda *a, **k: fused.append(k.get("silu")) or real_gn(*a, **k))
    pointwise = []
    monkeypatch.setattr(lora_fast, "_pointwise_conv_lora",
                        lambda *a: pointwise.append(1) or _pointwise_conv_lora(*a))
    out, grads = fwd_bwd(unet, batch)
    assert calls and all(calls), f"{calls.count(False)} of {len(calls)} GroupNorm inputs were not channels_last"
    assert pointwise and fused.count(True) > 0
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    norms.restore_norms(unet)
    assert norms.nhwc_group_norms(unet) == 0
