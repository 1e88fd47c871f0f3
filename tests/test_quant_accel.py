"""A quantised base under accel's speed paths, on the CPU: the lean LoRA forward (`forward_with_lora`), the fp8
weight's one-kernel dequantisation and where it is switched on, and the checkpoint that keeps the weights its
recomputation dequantised (the GPU's own kernels: tests/test_fp8_cuda.py, tests/test_accel_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from quant_support import D_IN, FORMATS, Block, lora_grads, quantized, with_lora, x_input
from torch import nn

from lora_trainer.quant import Fp8Weight


def test_accel_fused_forward_runs_over_quantised_base():
    from lora_trainer.accel.lora_fast import fuse_lora_layers, unfuse_lora_layers

    block, _ = quantized(Block(), FORMATS["fp8_scaled"][0])
    model = with_lora(block)
    want = lora_grads(model, x_input())
    assert fuse_lora_layers(model) == 2
    got = lora_grads(model, x_input())
    unfuse_lora_layers(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", ["none", "tensor", "per_row", "number"])
def test_dequant8_is_the_dequantisation_and_compiles_to_the_same_values(scale):
    """The fp8 weight's one-kernel dequantisation (accel's fused_math on CUDA) gives the eager values bit for bit:
    the compiled function is traced here on the CPU (aot_eager: what inductor compiles on the GPU; the GPU's own
    kernel is checked in tests/test_accel_cuda.py)."""
    from lora_trainer.accel.fused_math import fused
    from lora_trainer.quant.formats import dequant8

    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    fw = {"none": Fp8Weight.quantize(w, scaled=False), "tensor": Fp8Weight.quantize(w),
          "per_row": Fp8Weight.quantize(w, per_row=True), "number": Fp8Weight(w.to(torch.float8_e4m3fn), 0.5)}[scale]
    for dtype in (torch.bfloat16, torch.float32):
        sc = fw.scale.float() if isinstance(fw.scale, torch.Tensor) else fw.scale
        expected = fw.data.to(dtype) if sc is None else (fw.data.float() * sc).to(dtype)
        if sc is not None:  # the formula hosts use rounds the scale first: at most one unit in the last place apart
            host = fw.data.to(dtype) * (sc.to(dtype) if isinstance(sc, torch.Tensor) else sc)
            assert torch.allclose(expected.float(), host.float(), rtol=2 * torch.finfo(dtype).eps, atol=0)
        assert torch.equal(fw.dequantize(dtype), expected)
        assert torch.equal(fw.dequantize(dtype, fused=True), expected)  # no CUDA: the eager function
        if scale != "number":
            assert torch.equal(fused(dequant8, "aot_eager")(fw.data, fw.scale, dtype), expected)


def test_fused_dequant_is_set_on_fp8_layers_only_where_it_compiles(monkeypatch):
    """`use_fused_dequant` marks the fp8 frozen Linears (quant's and accel's), never others, and none without CUDA;
    a marked layer's forward and input gradient are unchanged off CUDA. `fused_math_available` is patched for the
    marking (no CUDA here)."""
    from lora_trainer import accel
    from lora_trainer.accel import fused_math

    block, _ = quantized(Block(), FORMATS["fp8_per_row"][0])
    plain = nn.Sequential(block, accel.Fp8Linear(nn.Linear(D_IN, D_IN)), nn.Linear(D_IN, D_IN))
    assert fused_math.use_fused_dequant(plain, "cpu") == 0
    x = x_input().requires_grad_(True)
    ref = plain(x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    monkeypatch.setattr(fused_math, "fused_math_available", lambda device: True)
    assert fused_math.use_fused_dequant(plain, "cuda") == 3
    assert [getattr(m, "fused_cast", None) for m in (block.fc1, block.fc2, plain[1], plain[2])] == [
        True, True, True, None]
    out = plain(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(out, ref) and torch.equal(gx, gx_ref)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_per_row", "int8_host"])
@pytest.mark.parametrize("autocast", [False, True])
def test_lean_lora_forward_over_a_quantised_base_is_peft_s_math(fmt, autocast):
    """accel's lean LoRA forward over a QuantLinear runs base and LoRA products as one autograd function
    (`QuantLinear.forward_with_lora`): output, input gradient and LoRA gradients are peft's own, in fp32 and under
    bf16 autocast (there 2e-3 apart: peft rounds the base's and the LoRA's outputs apart, the fused product once);
    an input without grad still trains the LoRA."""
    from lora_trainer.accel.lora_fast import fuse_lora_layers, unfuse_lora_layers

    block, _ = quantized(Block(), FORMATS[fmt][0])
    model = with_lora(block)

    def run(x):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        y.float().square().mean().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        return y.detach(), grads, None if x.grad is None else x.grad.detach().clone()

    for wants_grad in (True, False):
        x = x_input().requires_grad_(wants_grad)
        want = run(x)
        x.grad = None
        assert fuse_lora_layers(model) == 2
        got = run(x)
        unfuse_lora_layers(model)
        pairs = [(got[0], want[0]), *((got[1][n], want[1][n]) for n in want[1])]
        pairs += [(got[2], want[2])] if wants_grad else []
        assert wants_grad or got[2] is None
        for g, w in pairs:
            if autocast:
                assert float((g.float() - w.float()).norm() / w.float().norm()) < 1e-2
            else:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("fmt", ["fp8_scaled", "int8_host"])
def test_checkpoint_keeps_the_recomputed_weights_for_backward(fmt, lean):
    """accel's checkpoint with `keep_recomputed_weights`: each layer's weight is dequantised twice a step (forward,
    recomputation) instead of three times (and again for the input gradient), and the gradients are the same bits;
    with the LoRA's lean product (`forward_with_lora`) and a frozen layer without LoRA alike."""
    from lora_trainer.accel import graph_safe_checkpointing
    from lora_trainer.accel.lora_fast import fuse_lora_layers

    def build(keep: bool):
        block, frozen = quantized(Block(), FORMATS[fmt][0])
        model = with_lora(block) if lean else block
        if lean:
            assert fuse_lora_layers(model) == 2
        holder = nn.Module()
        holder.gradient_checkpointing, holder._gradient_checkpointing_func = True, None
        holder.model = model
        assert graph_safe_checkpointing(holder, keep_recomputed_weights=keep) == 1
        calls = []
        for fw in frozen.values():
            def counted(*args, _f=fw.dequantize, **kwargs):
                calls.append(1)
                return _f(*args, **kwargs)
            fw.dequantize = counted
        return holder, calls

    results = []
    for keep in (False, True):
        holder, calls = build(keep)
        x = x_input().requires_grad_(True)
        holder._gradient_checkpointing_func(holder.model, x).square().mean().backward()
        grads = {n: p.grad for n, p in holder.model.named_parameters() if p.grad is not None}
        assert bool(grads) == lean
        results.append((len(calls), x.grad, grads))
    (n_plain, gx_plain, g_plain), (n_kept, gx_kept, g_kept) = results
    # two layers, each dequantised in forward, recomputation and (plain) for its input gradient; without LoRA the
    # plain recomputation stops before the last layer, which saves nothing (torch's early stop): 5
    assert (n_plain, n_kept) == (6 if lean else 5, 4)
    assert torch.equal(gx_kept, gx_plain)
    assert all(torch.equal(g_kept[n], g_plain[n]) for n in g_plain)
