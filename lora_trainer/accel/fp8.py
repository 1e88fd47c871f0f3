"""Frozen Linear/Conv2d weights stored in float8 (e4m3) with one scale per output row, for low-VRAM runs.

The base model is frozen while a LoRA trains, so its weights only need to be read. Stored in fp8
they take half the memory of bf16 (SDXL's UNet: ~2 GiB saved). Each layer dequantises its weight
to the compute dtype for the forward GEMM and again in backward (the dequantised copy is never
kept), so peak memory grows by one layer's weight at a time. Per-row scales keep the relative
error of each weight row at fp8's ~3 significant bits over that row's range, better than a plain
cast to fp8 (what other trainers do). Never saved: only LoRA weights are exported.

`fp8_matmul` (accel option, off by default): a Linear's forward product runs on fp8 tensor cores
(`torch._scaled_mm`, compute capability >= 8.9: Ada and Hopper; quant/fp8_products.py), its input rounded to
fp8 with one scale per row, at twice the bf16 rate; `fp8_matmul_backward` moves the input-gradient product
there too. With gradient checkpointing the forward runs twice per step, so the forward alone is two thirds of
the frozen base's matrix work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.formats import dequant8
from ..quant.fp8_products import FP8, FP8_MAX, compiled, fp8_input_grad, fp8_product, fp8_product_fits


def fp8_available() -> bool:
    return FP8 is not None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    try:  # torch >= 2.4 takes the device type
        on = torch.is_autocast_enabled(kind)
        return torch.get_autocast_dtype(kind) if on else x.dtype
    except (TypeError, AttributeError):
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return x.dtype


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight8, scale, bias, compute8=0, fused=False):  # type: ignore[override]
        dt = _compute_dtype(x)
        ctx.save_for_backward(weight8, scale)
        ctx.dt = dt
        ctx.grad8 = compute8 >= 2
        ctx.fused = fused
        with torch.autocast(x.device.type, enabled=False):
            if compute8 and fp8_product_fits(x, weight8, dt):
                return fp8_product(x.to(dt), weight8, scale, bias, dt)
            w = _dequant(fused, weight8)(weight8, scale, dt)
            return F.linear(x.to(dt), w, None if bias is None else bias.to(dt))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight8, scale = ctx.saved_tensors
        if ctx.grad8 and fp8_product_fits(grad, weight8.t(), grad.dtype):
            return fp8_input_grad(grad, weight8, scale), None, None, None, None, None
        w = _dequant(ctx.fused, weight8)(weight8, scale, grad.dtype)
        return grad @ w, None, None, None, None, None


def _dequant(fused: bool, weight8: torch.Tensor):
    """quant's `dequant8`: compiled into one kernel when `fused` (accel's fused_math) and on CUDA with Triton."""
    return compiled(dequant8, weight8.device.type) if fused else dequant8


def _store_quantized(target: nn.Module, layer: nn.Module) -> None:
    """`weight8` (fp8) and `scale` (one per output channel, keepdim) of `layer`'s frozen weight,
    its bias as a frozen parameter, and the original dtype, registered on `target`."""
    if FP8 is None:
        raise RuntimeError("this torch has no float8 dtype")
    w = layer.weight.detach()
    w32 = w.float()
    scale = (w32.abs().amax(dim=tuple(range(1, w32.dim())), keepdim=True) / FP8_MAX).clamp(min=1e-12)
    target.register_buffer("weight8", (w32 / scale).to(FP8))
    target.register_buffer("scale", scale)
    target.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
    target._orig_dtype = w.dtype


class Fp8Linear(nn.Module):
    """Drop-in frozen replacement for an nn.Linear (no weight gradient). `compute8`: 1: the forward product on fp8
    tensor cores, 2: the backward product too (see the module's docstring; set by `use_fp8_products`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute8 = 0
        self.fused_cast = False  # set by accel's `use_fused_dequant`
        _store_quantized(self, linear)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a temporary), for code that inspects `layer.weight`."""
        return (self.weight8.to(self._orig_dtype) * self.scale.to(self._orig_dtype)).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight8, self.scale, self.bias, self.compute8, self.fused_cast)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


class _Fp8Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight8, scale, bias, stride, padding, dilation, groups):  # type: ignore[override]
        dt = _compute_dtype(x)
        w = weight8.to(dt) * scale.to(dt).view(-1, 1, 1, 1)
        ctx.save_for_backward(weight8, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            return F.conv2d(x.to(dt), w, None if bias is None else bias.to(dt), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight8, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        w = weight8.to(grad.dtype) * scale.to(grad.dtype).view(-1, 1, 1, 1)
        gx = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return gx, None, None, None, None, None, None, None


class Fp8Conv2d(nn.Module):
    """Drop-in frozen replacement for an nn.Conv2d with zero or 'same'-free integer padding."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        _store_quantized(self, conv)
        self.scale = self.scale.view(-1)  # per output channel, broadcast by the conv function

    @property
    def weight(self) -> torch.Tensor:
        return (self.weight8.to(self._orig_dtype) * self.scale.to(self._orig_dtype).view(-1, 1, 1, 1)).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Conv2dFn.apply(x, self.weight8, self.scale, self.bias, self.stride, self.padding, self.dilation,
                                  self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, fp8"


def _frozen(m: nn.Module) -> bool:
    return all(not p.requires_grad for p in m.parameters(recurse=False))


def _convertible(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return _frozen(m)
    return (type(m) is nn.Conv2d and _frozen(m) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str) and m.weight.shape[0] >= 16)


def quantize_linears_fp8(model: nn.Module) -> int:
    """Replace every frozen nn.Linear and nn.Conv2d in `model` (peft base layers included) by its
    fp8 counterpart; returns how many. Trainable layers (LoRA A/B) are left alone.

    Destructive by design, for models the engine loaded itself: the original weights' storage is
    released at once (other holders of those Parameter objects, such as saved requires_grad flags,
    would otherwise keep the bf16 copy alive beside the fp8 one), one layer at a time so the peak
    stays at the bf16 model plus one layer.
    """
    if FP8 is None:
        return 0
    names = [(parent_name, name) for parent_name, parent in model.named_modules()
             for name, child in parent.named_children() if _convertible(child)]
    for parent_name, name in names:
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, name)
        setattr(parent, name, Fp8Linear(child) if type(child) is nn.Linear else Fp8Conv2d(child))
        with torch.no_grad():
            child.weight.data = torch.empty(0, dtype=child.weight.dtype, device=child.weight.device)
    return len(names)


def use_fp8_products(model: nn.Module, backward: bool = False) -> int:
    """Turn on fp8 forward products (`backward`: the input-gradient products too) for every fp8 e4m3 frozen
    Linear in `model` (accel's Fp8Linear, quant's QuantLinear over an Fp8Weight, e.g. Flux's fp8 base) whose
    dimensions suit them; returns how many."""
    from ..quant import Fp8Weight, QuantLinear

    layers = [m for m in model.modules()
              if (isinstance(m, Fp8Linear) or (isinstance(m, QuantLinear) and isinstance(m.frozen, Fp8Weight)
                                               and m.frozen.data.dtype == FP8))
              and m.in_features % 16 == 0 and m.out_features % 16 == 0]
    for m in layers:
        m.compute8 = 2 if backward else 1
    return len(layers)
