"""The LoRA scale as the lean products' GEMM alpha (accel's lora_fast over quant's `linear_with_lora`), on the CPU:
peft's math with a scale that is not 1, and no multiply of B by it forward or backward."""

from __future__ import annotations

import copy

import pytest
import torch
from accel_support import rel
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from lora_trainer import accel
from lora_trainer.quant import Fp8Weight, quantize_linears

SCALE = 5 / 4  # lora_alpha 5 over rank 4: not a power of two, so B·scale rounds differently from B


class _Ops(TorchDispatchMode):
    """Every aten op run under it (forward and, on the CPU, backward): its name, tensor shapes and alpha."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, list[tuple[int, ...]], object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.seen.append((func.overloadpacket.__name__, shapes, kwargs.get("alpha")))
        return func(*args, **kwargs)


@pytest.mark.parametrize("base", ["linear", "conv1x1", "quant"])
def test_lora_scale_is_the_gemms_alpha_with_peft_s_math(base):
    """A LoRA with scale 1.25 through the lean product (a plain frozen Linear, a 1×1 convolution on a channels_last
    input, a QuantLinear): output, input gradient and A/B gradients are peft's, in fp32 to rounding and under bf16
    autocast as close to the fp32 result as peft's own bf16 path; and no multiply touches a tensor of B's size in
    forward or backward (the GEMMs' alpha applies the scale: forward, the gradient of A's output and B's)."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(24, 40, 1) if base == "conv1x1" else torch.nn.Linear(24, 40)
    net = torch.nn.Sequential(layer).requires_grad_(False)
    if base == "quant":
        assert quantize_linears(net, lambda name, m: Fp8Weight.quantize(m.weight.detach(), per_row=True)) == 1
    peft_net = get_peft_model(net, LoraConfig(r=4, lora_alpha=5, target_modules=["0"], init_lora_weights="gaussian"))
    lora = peft_net.base_model.model[0]
    assert lora.scaling["default"] == SCALE
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()
    b_size = lora.lora_B["default"].weight.numel()
    x = (torch.randn(2, 24, 5, 6).contiguous(memory_format=torch.channels_last) if base == "conv1x1"
         else torch.randn(2, 5, 24))

    def run(model, autocast=None, ops=None):
        xi = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with ops or torch.autocast("cpu", enabled=False):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                y = model(xi)
            (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        layer = model.base_model.model[0]
        return [y.detach(), xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]

    lean = copy.deepcopy(peft_net)
    assert accel.fuse_lora_layers(lean) == 1
    exact = run(peft_net)
    for autocast in (None, torch.bfloat16):
        ops = _Ops()
        want, got = run(peft_net, autocast), run(lean, autocast, ops)
        for g, w, e in zip(got, want, exact):
            assert g.dtype == w.dtype
            if autocast is None:
                assert rel(g, w) < 1e-6
            else:  # as close to fp32 as peft's bf16 path (which rounds the input gradient twice, we once)
                assert rel(g, w) < 2e-2 and rel(g, e) <= 1.5 * rel(w, e) + 1e-6
        muls = [shapes for name, shapes, _ in ops.seen if name in ("mul", "mul_")]
        assert not [s for s in muls if any(torch.Size(t).numel() == b_size for t in s)], muls
        # the forward's accumulation into the base output, the gradients of A's output and of B: alpha 1.25
        assert sum(name == "addmm" or name == "addmm_" for name, _, a in ops.seen if a == SCALE) == 3, ops.seen


def test_linear_with_lora_keeps_a_prescaled_b_and_ignores_addmm_s_input():
    """`linear_with_lora` without a scale is the old call (B scaled by the caller); with one it is the same product,
    and the beta = 0 GEMMs of its backward neither read nor copy the 0-dim input they broadcast."""
    from lora_trainer.quant.formats import PlainWeight
    from lora_trainer.quant.linear import linear_with_lora

    g = torch.Generator().manual_seed(3)
    w, a, b = (torch.randn(*s, generator=g) for s in ((40, 24), (4, 24), (40, 4)))
    x, gy = torch.randn(10, 24, generator=g), torch.randn(10, 40, generator=g)

    def run(b_in, scale):
        ps = [t.clone().requires_grad_(True) for t in (x, a, b_in)]
        ops = _Ops()
        with ops:
            y = linear_with_lora(ps[0], PlainWeight(w), None, ps[1], ps[2], torch.float32, scale=scale)
            y.backward(gy)  # no loss ops under the mode: only the product's own
        return [y.detach(), *(p.grad for p in ps)], ops.seen

    old, old_ops = run(b * SCALE, 1.0)
    new, new_ops = run(b, SCALE)
    old[3] = old[3] * SCALE  # the pre-scaled B's gradient, for B itself
    assert all(rel(n, o) < 1e-6 for o, n in zip(old, new))
    assert not [op for op in old_ops if op[2] not in (None, 1.0)]  # scale 1: plain products
    assert not [op for op in new_ops if op[0] in ("copy_", "expand_copy", "fill_", "zero_", "mul", "mul_")]
