"""accel's channels_last path on the CPU: the lean 1×1-convolution LoRA product on NHWC inputs, diffusers'
Transformer2DModel outputs kept NHWC, and the fused-resnet forward against diffusers' own (the Triton GroupNorm
under it: test_group_norm_nhwc.py; on a GPU: test_accel_cuda.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from accel_support import assert_grads_match, fwd_bwd, inputs, lora_unet, rel
from peft import LoraConfig

from lora_trainer import accel
from lora_trainer.models.bundle import Family


def _product_fn(y: torch.Tensor) -> str:
    """The autograd function under an output (under the permute back to NCHW for a 1×1 convolution's)."""
    fn = y.grad_fn
    while type(fn).__name__.startswith("Permute"):
        fn = fn.next_functions[0][0]
    return type(fn).__name__


@pytest.mark.parametrize("bias", [True, False])
def test_lean_pointwise_conv_product_on_channels_last_inputs(bias):
    """A frozen 1×1 convolution (SD1's proj_in/proj_out) and its LoRA on a channels_last input: the lean Linear
    product over the NHWC rows, output channels_last; output and gradients equal peft's (fp32 and bf16 autocast).
    An NCHW input, or a 3×3 convolution, keeps the convolution path."""
    from peft import get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(24, 40, 1, bias=bias), torch.nn.Conv2d(40, 16, 3, padding=1))
    peft_net = get_peft_model(net.requires_grad_(False), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"],
                                                                    init_lora_weights="gaussian"))
    with torch.no_grad():
        for m in (peft_net.base_model.model[0], peft_net.base_model.model[1]):
            m.lora_B["default"].weight.normal_()
    x = torch.randn(2, 24, 5, 6).contiguous(memory_format=torch.channels_last)

    def run(model, x, autocast=None):
        xi = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            mid = model.base_model.model[0](xi)
            y = model.base_model.model[1](mid)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        layer = model.base_model.model[0]
        return mid, y, [xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    ref, lean = copy.deepcopy(peft_net), copy.deepcopy(peft_net)
    accel.fuse_lora_layers(lean)
    for autocast, tol in ((None, 1e-6), (torch.bfloat16, 2e-2)):
        mid_ref, y_ref, g_ref = run(ref, x, autocast)
        mid, y, g = run(lean, x, autocast)
        assert _product_fn(mid) == "_LoraProductFnBackward" and _product_fn(y) != "_LoraProductFnBackward"
        assert mid.is_contiguous(memory_format=torch.channels_last) and mid.dtype == mid_ref.dtype
        assert rel(mid, mid_ref) < tol and rel(y, y_ref) < tol
        for got, want in zip(g, g_ref):
            assert got.dtype == want.dtype and rel(got, want) < tol
    mid, _, _ = run(lean, x.contiguous())  # NCHW: the convolution path
    assert _product_fn(mid) != "_LoraProductFnBackward"


def test_channels_last_keeps_the_transformer_outputs_nhwc(monkeypatch):
    """accel's channels_last: diffusers' Transformer2DModel output stays a channels_last view (no NCHW copy), so
    with the lean LoRA forward both 1×1 convolutions around each transformer (proj_in, proj_out) take the Linear
    product on NHWC rows; output and LoRA gradients as the plain channels_last model's."""
    from lora_trainer.accel import lora_fast
    from lora_trainer.accel.channels_last import restore_block_outputs, use_channels_last

    ref = lora_unet().to(memory_format=torch.channels_last)
    x, t, ctx, kw = inputs(ref, bs=2)
    batch = (x.contiguous(memory_format=torch.channels_last), t, ctx, kw)
    out_ref, g_ref = fwd_bwd(ref, batch)
    unet = lora_unet()
    blocks = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    assert use_channels_last(unet) == {"nhwc_block_outputs": len(blocks), "fused_resnets": 0}  # norms: torch's
    assert len(blocks) > 0
    layouts = []
    for m in blocks:
        m.register_forward_hook(lambda m, a, y: layouts.append(y[0].is_contiguous(memory_format=torch.channels_last)))
    accel.fuse_lora_layers(unet)
    pointwise = []
    real = lora_fast._pointwise_conv_lora
    monkeypatch.setattr(lora_fast, "_pointwise_conv_lora", lambda *a: pointwise.append(1) or real(*a))
    out, g = fwd_bwd(unet, batch)
    assert layouts and all(layouts)
    assert len(pointwise) >= len(blocks)  # every transformer's proj_out at least
    assert rel(out, out_ref) < 1e-5
    assert_grads_match(g, g_ref)
    assert restore_block_outputs(unet) == len(blocks)


def test_fused_resnet_forward_is_diffusers_own(monkeypatch):
    """accel/channels_last.py's ResnetBlock2D forward (norm + SiLU pairs fused) computes what this diffusers
    version's own forward computes, for a tiny SD1 and SDXL UNet with LoRA: checked on every stack, with torch's
    norm under it where Triton cannot run (the fused kernels have their own tests: test_group_norm_nhwc.py). The
    CUDA autocast the fused path waits for is mocked (as fp32): it does not run here."""
    from lora_trainer.accel import norms
    from lora_trainer.accel.channels_last import use_channels_last

    monkeypatch.setattr(norms, "_autocast_dtype", lambda x: torch.float32)
    monkeypatch.setattr(norms, "check_kernels", lambda device, dtype: True)
    for family in (Family.SD1, Family.SDXL):
        ref = lora_unet(family=family).to(memory_format=torch.channels_last)
        x, t, ctx, kw = inputs(ref, bs=2)
        batch = (x.contiguous(memory_format=torch.channels_last), t, ctx, kw)
        out_ref, g_ref = fwd_bwd(ref, batch)
        unet = lora_unet(family=family)
        norms.lowp_norms(unet, nhwc=True)
        resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
        assert use_channels_last(unet)["fused_resnets"] == len(resnets) > 0
        out, g = fwd_bwd(unet, batch)
        # fp32; where Triton runs (its interpreter here) its norm sums in another order than torch's
        assert rel(out, out_ref) < 1e-5, family
        assert_grads_match(g, g_ref, rtol=1e-3)
