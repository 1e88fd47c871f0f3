"""Frozen Linear weights stored in float8 (e4m3) with one scale per output row, for low-VRAM runs.

The base model is frozen while a LoRA trains, so its weights only need to be read. Stored in fp8
they take half the memory of bf16 (SDXL's UNet: ~2 GiB saved). Each layer dequantises its weight
to the compute dtype for the forward GEMM and again in backward (the dequantised copy is never
kept), so peak memory grows by one layer's weight at a time. Per-row scales keep the relative
error of each weight row at fp8's ~3 significant bits over that row's range, better than a plain
cast to fp8 (what other trainers do). Never saved: only LoRA weights are exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0


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
    def forward(ctx, x, weight8, scale, bias):  # type: ignore[override]
        dt = _compute_dtype(x)
        w = weight8.to(dt) * scale.to(dt)
        ctx.save_for_backward(weight8, scale)
        ctx.dt = dt
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dt), w, None if bias is None else bias.to(dt))

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight8, scale = ctx.saved_tensors
        w = weight8.to(grad.dtype) * scale.to(grad.dtype)
        return grad @ w, None, None, None


class Fp8Linear(nn.Module):
    """Drop-in frozen replacement for an nn.Linear (no weight gradient)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if FP8 is None:
            raise RuntimeError("this torch has no float8 dtype")
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = (w.float().abs().amax(dim=1, keepdim=True) / _FP8_MAX).clamp(min=1e-12)
        self.register_buffer("weight8", (w.float() / scale).to(FP8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self._orig_dtype = w.dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (a temporary), for code that inspects `layer.weight`."""
        return (self.weight8.to(self._orig_dtype) * self.scale.to(self._orig_dtype)).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFn.apply(x, self.weight8, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8"


def quantize_linears_fp8(model: nn.Module) -> int:
    """Replace every frozen nn.Linear in `model` (peft base layers included) by an Fp8Linear.

    Returns how many were replaced. Layers with trainable weights (LoRA A/B) are left alone.
    """
    if FP8 is None:
        return 0
    todo = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and not child.weight.requires_grad and (
                    child.bias is None or not child.bias.requires_grad):
                todo.append((parent, name, child))
    for parent, name, child in todo:
        setattr(parent, name, Fp8Linear(child))
    return len(todo)
