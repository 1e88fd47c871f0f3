"""A leaner forward for peft's LoRA Linear/Conv2d layers.

peft stays the source of truth: the same `lora_A`/`lora_B` parameters are used, so state dicts,
kohya export and loading are untouched. Only the forward is replaced (per instance, reversibly) by
one that
- skips peft's per-call bookkeeping (adapter loops, dtype round trips: peft casts a bf16 input to
  the fp32 LoRA dtype and autocast casts it straight back),
- adds the low-rank product into the base output inside the GEMM epilogue (`addmm`), instead of
  separate mul/add/cast kernels;
- for a plain frozen Linear (`lean_product`), runs base and LoRA as one autograd function
  (quant's `linear_with_lora`, as over a quantised base) that accumulates the low-rank terms into the base's output and input gradient in
  place: no copy of the base output (an out-of-place addmm copies its input first) and no add of two
  input gradients in backward; the same for a frozen 1×1 convolution on a channels_last input (SD1's
  transformers' proj_in/proj_out), whose NHWC memory is the Linear's rows already. These products take
  the LoRA scale as their GEMMs' alpha: no multiply of B by it and none in backward (two kernels per
  layer and step, ~1,400 on SDXL). Where autograd runs the products (the convolution and out-of-place
  addmm paths), B is scaled first, as before.
Anything unusual (several active adapters, DoRA/variants, lora bias, merged or disabled adapters)
falls back to peft's own forward, so the result is always what peft would compute.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.formats import PlainWeight
from ..quant.linear import QuantLinear, autocast_dtype, linear_with_lora
from .forwards import replace_forwards, restore_forwards
from .group_norm_nhwc import is_nhwc

_FUSED_ATTR = "_lora_trainer_fused"
_LEAN_ATTR = "_lora_trainer_lean_product"


def _autocast_on(x: torch.Tensor) -> bool:
    kind = x.device.type
    try:  # torch >= 2.4 takes the device type
        return torch.is_autocast_enabled(kind)
    except TypeError:
        return torch.is_autocast_enabled() if kind == "cuda" else torch.is_autocast_cpu_enabled()


def _adapter(layer: Any) -> str | None:
    """The single plain LoRA adapter this layer runs, or None when peft's own forward is needed."""
    if layer._disable_adapters or layer.merged_adapters:
        return None
    active = layer._active_adapter
    if not isinstance(active, str):
        if len(active) != 1:
            return None
        active = active[0]
    if active not in layer.lora_A:
        return None
    if layer.use_dora.get(active, False):
        return None
    if getattr(layer, "lora_variant", None) and active in layer.lora_variant:
        return None
    if getattr(layer, "lora_bias", {}).get(active, False):
        return None
    return active


def _in_compute_dtype(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not _autocast_on(x) and a.dtype != x.dtype:
        # Pure low-precision training (no autocast): compute the LoRA path in the input's dtype;
        # the casts are differentiable, so gradients still reach the fp32 parameters.
        return a.to(x.dtype), b.to(x.dtype)
    return a, b


def _lora_weights(layer: Any, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A, B unscaled and the LoRA scale, for the GEMMs that take the scale as their alpha (no multiply of B)."""
    a, b = _in_compute_dtype(x, layer.lora_A[name].weight, layer.lora_B[name].weight)
    return a, b, float(layer.scaling[name])


def _scaled_lora_weights(layer: Any, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B · scale (in B's dtype, then cast), for the paths whose products take no alpha from us: F.conv2d, and
    the out-of-place addmm (its autograd backward multiplies by the alpha itself)."""
    return _in_compute_dtype(x, layer.lora_A[name].weight, layer.lora_B[name].weight * layer.scaling[name])


def _dropout(layer: Any, name: str, x: torch.Tensor) -> torch.Tensor:
    drop = layer.lora_dropout[name]
    return x if isinstance(drop, nn.Identity) else drop(x)


def _linear_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                 b: torch.Tensor, scale: float) -> torch.Tensor:
    """quant's one-function LoRA product over the plain (out, in) weight, in the autocast dtype where autocast is on
    (what F.linear and addmm would run in), else in the weight's; `b` unscaled, `scale` the GEMMs' alpha."""
    dt = autocast_dtype(x.device.type) or weight.dtype
    bias = None if bias is None else bias.to(dt)
    with torch.autocast(x.device.type, enabled=False):
        return linear_with_lora(x, PlainWeight(weight), bias, a, b, dt, scale=scale)


def _lean_product_fits(base: nn.Module, x: torch.Tensor, kind: type = nn.Linear) -> bool:
    """A plain layer of `kind` whose weight and bias are frozen, on an input of its dtype or under autocast."""
    return (type(base) is kind and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and (_autocast_on(x) or x.dtype == base.weight.dtype))


def _pointwise(conv: nn.Module) -> bool:
    """A 1×1 convolution that is a Linear over the channels: stride 1, no padding, dilation 1, one group."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1) and conv.groups == 1)


def _pointwise_conv_lora(x: torch.Tensor, base: nn.Conv2d, a: torch.Tensor, b: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """A 1×1 convolution and its LoRA on a channels_last input as the lean Linear product over the pixels' channel
    rows (NHWC memory is (N·H·W, C) rows already: no copy in or out); the output is channels_last too."""
    rows = x.permute(0, 2, 3, 1)  # a view: (N, H, W, C), contiguous
    y = _linear_lora(rows, base.weight.view(base.out_channels, -1), base.bias, a.view(a.shape[0], -1),
                     b.view(b.shape[0], -1), scale)
    return y.permute(0, 3, 1, 2)


def _linear_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if (args or kwargs) else _adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    plain_dropout = isinstance(self.lora_dropout[name], nn.Identity)
    if isinstance(base, QuantLinear) and plain_dropout:
        # one autograd function: no output copy, no gradient add, the scale as the GEMMs' alpha
        return base.forward_with_lora(x, *_lora_weights(self, name, x))
    if plain_dropout and getattr(self, _LEAN_ATTR, False) and _lean_product_fits(base, x):
        return _linear_lora(x, base.weight, base.bias, *_lora_weights(self, name, x))
    # B scaled here, not by addmm's alpha: autograd's addmm backward would multiply both its gradients by the alpha,
    # as many kernels as B's multiply and its backward's, and one of them over (rows, r)
    a, b = _scaled_lora_weights(self, name, x)
    if type(base) is nn.Linear:
        y = F.linear(x, base.weight, base.bias)
    else:  # e.g. accel.fp8.Fp8Linear
        y = base(x)
    h = F.linear(_dropout(self, name, x), a)
    out = y.shape[-1]
    # y + h @ b.T in one GEMM (cuBLAS beta=1 epilogue) instead of matmul, mul, add and a cast.
    fused = torch.addmm(y.reshape(-1, out), h.reshape(-1, h.shape[-1]), b.t())
    return fused.view(y.shape).to(y.dtype)


def _conv2d_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if (args or kwargs) else _adapter(self)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    la = self.lora_A[name]
    if (getattr(self, _LEAN_ATTR, False) and isinstance(self.lora_dropout[name], nn.Identity) and is_nhwc(x)
            and _pointwise(base) and _pointwise(la) and _lean_product_fits(base, x, nn.Conv2d)):
        return _pointwise_conv_lora(x, base, *_lora_weights(self, name, x))
    a, b = _scaled_lora_weights(self, name, x)
    y = base(x)
    h = F.conv2d(_dropout(self, name, x), a, None, la.stride, la.padding, la.dilation, la.groups)
    return (y + F.conv2d(h, b)).to(y.dtype)


def _fast_forward_for(module: nn.Module):
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return None
    # Exact types only: subclasses (bnb/gptq/...) have their own forward semantics.
    if type(module) is lora_layer.Linear:
        return _linear_forward
    if type(module) is lora_layer.Conv2d:
        return _conv2d_forward
    return None


def fuse_lora_layers(model: nn.Module, lean_product: bool = True) -> int:
    """Give every plain peft LoRA Linear/Conv2d in `model` the lean forward; returns how many. `lean_product`: a
    plain frozen Linear base and its LoRA run as one autograd function (`_linear_lora`)."""
    n = replace_forwards(model, _fast_forward_for, _FUSED_ATTR)
    for m in model.modules():
        if m.__dict__.get(_FUSED_ATTR):
            setattr(m, _LEAN_ATTR, lean_product)
    return n


def unfuse_lora_layers(model: nn.Module) -> int:
    """Restore peft's forward everywhere `fuse_lora_layers` replaced it."""
    for m in model.modules():
        m.__dict__.pop(_LEAN_ATTR, None)
    return restore_forwards(model, _FUSED_ATTR)
