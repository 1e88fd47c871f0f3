"""GroupNorm/LayerNorm in the autocast dtype instead of fp32.

Under autocast PyTorch runs every norm in fp32: the bf16 activation is upcast, the fp32 output
flows through SiLU in fp32 and is cast back to bf16 by the next conv/linear, and the fp32
copies are what backward keeps. The norm kernels accumulate their statistics in fp32 for bf16
inputs anyway, so running them on the bf16 tensor gives the same statistics and rounds the output
once, where the fp32 path rounds it at the next layer's cast: the same numbers to bf16 precision,
with a third of the memory traffic. Only the CUDA autocast path changes; CPU and fp32 runs keep
the stock forward.

On a channels_last model (where Triton is) the GroupNorms read and write NHWC (group_norm_nhwc.py) instead of
torch's kernel, which computes on NCHW copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .forwards import replace_forwards, restore_forwards
from .group_norm_nhwc import check_kernels, group_norm_nhwc, is_nhwc

_ATTR = "_lora_trainer_lowp_norm"
_NHWC_ATTR = "_lora_trainer_nhwc_norm"  # set on the GroupNorms that may take NHWC inputs their own way


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    if x.device.type != "cuda" or not torch.is_autocast_enabled():
        return None
    try:
        dt = torch.get_autocast_dtype("cuda")
    except AttributeError:  # torch < 2.4
        dt = torch.get_autocast_gpu_dtype()
    return dt if dt in (torch.bfloat16, torch.float16) else None


def _cast(t: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dt)


def _group_norm(self: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    dt = _autocast_dtype(x)
    if dt is None:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    return _lowp_group_norm(self, x, dt)


def _lowp_group_norm(norm: nn.GroupNorm, x: torch.Tensor, dt: torch.dtype, silu: bool = False) -> torch.Tensor:
    """The frozen norm (then SiLU) on `x` in `dt`, autocast off; NHWC-marked norms take group_norm_nhwc (which
    itself runs torch's functions for inputs that are not channels_last)."""
    with torch.autocast("cuda", enabled=False):
        args = (x.to(dt), norm.num_groups, _cast(norm.weight, dt), _cast(norm.bias, dt), norm.eps)
        if keeps_nhwc(norm):
            return group_norm_nhwc(*args, silu=silu)
        y = F.group_norm(*args)
        return F.silu(y) if silu else y


def _layer_norm(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    dt = _autocast_dtype(x)
    if dt is None:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    with torch.autocast("cuda", enabled=False):
        return F.layer_norm(x.to(dt), self.normalized_shape, _cast(self.weight, dt), _cast(self.bias, dt), self.eps)


def _norm_forward(m: nn.Module):
    fwd = _group_norm if type(m) is nn.GroupNorm else _layer_norm if type(m) is nn.LayerNorm else None
    if fwd is None or any(p.requires_grad for p in m.parameters(recurse=False)):
        return None
    return fwd


def lowp_norms(model: nn.Module, *, nhwc: bool = False) -> int:
    """Run the frozen GroupNorm/LayerNorm modules of `model` in the autocast dtype; returns how many. `nhwc`: the
    GroupNorms keep channels_last inputs in that layout (group_norm_nhwc; needs Triton on the device)."""
    n = replace_forwards(model, _norm_forward, _ATTR)
    for m in model.modules():
        if getattr(m, _ATTR, False) and type(m) is nn.GroupNorm:
            # the kernels checked here for the norm's device and dtype, before any forward (compiled once)
            if nhwc and m.weight is not None and check_kernels(m.weight.device, m.weight.dtype):
                setattr(m, _NHWC_ATTR, True)
            else:
                m.__dict__.pop(_NHWC_ATTR, None)
    return n


def keeps_nhwc(norm: nn.Module) -> bool:
    """A GroupNorm `lowp_norms(nhwc=True)` marked to keep channels_last inputs in that layout."""
    return bool(getattr(norm, _NHWC_ATTR, False))


def group_norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """SiLU(norm(x)) in one pass each way for an NHWC-marked frozen GroupNorm on a channels_last input under CUDA
    autocast (the lowp norm's dtype, SiLU before the one rounding); None where that does not apply."""
    dt = _autocast_dtype(x)
    if dt is None or not keeps_nhwc(norm) or not is_nhwc(x):
        return None
    return _lowp_group_norm(norm, x, dt, silu=True)


def nhwc_group_norms(model: nn.Module) -> int:
    """How many GroupNorms of `model` keep channels_last inputs in that layout."""
    return sum(1 for m in model.modules() if keeps_nhwc(m))


def restore_norms(model: nn.Module) -> int:
    for m in model.modules():
        m.__dict__.pop(_NHWC_ATTR, None)
    return restore_forwards(model, _ATTR)
