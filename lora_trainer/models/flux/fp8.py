"""fp8 weights as Flux files store them: plain `float8_e4m3fn` / `float8_e5m2`, or "scaled fp8"
(ComfyUI's `*_fp8_scaled` files: each Linear has a `scale_weight` beside its weight, real weight =
fp8 weight x scale_weight, per tensor ([] or [1]) or per output row ([out, 1])).

Loading with `dtype=None` keeps fp8 weights (and `scale_weight` buffers) as stored: a forward pass
needs them dequantised, which the trainer does per block where it runs them (`dequantize_linears`)
or through its fp8 base path; casting such a module with `.to(dtype)` would drop the scales.
"""

from __future__ import annotations

import torch
from torch import nn

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
SCALE = "scale_weight"


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The real weight of an fp8 (optionally scaled) tensor, in `dtype` (float32 math in between)."""
    if not is_fp8(weight) and scale is None:
        return weight.to(dtype)
    w = weight.to(torch.float32)
    if scale is not None:
        s = scale.to(device=w.device, dtype=torch.float32)
        # per tensor ([] / [1]) or per output row ([out, 1])
        w = w * (s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (w.dim() - 1))))
    return w.to(dtype)


def dequantize_linears(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every fp8 Linear weight under `module` by its real value in `dtype` (dropping the
    `scale_weight` buffers). Returns how many layers changed. Only for modules whose weights
    this process owns (never a host's tensors)."""
    done = 0
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if not isinstance(weight, torch.Tensor) or not is_fp8(weight):
            continue
        scale = sub._buffers.pop(SCALE, None)
        sub.weight = nn.Parameter(dequantize(weight.data, scale, dtype), requires_grad=weight.requires_grad)
        done += 1
    return done


def has_fp8(module: nn.Module) -> bool:
    return any(is_fp8(p) for p in module.parameters())
