"""`QuantLinear`: a frozen Linear whose weight stays in its stored form, for LoRA training over it.

The weight is dequantised to the compute dtype for the forward product and again in backward (for
the input gradient; a frozen weight has no gradient of its own), and the dequantised copy is not
kept: peak memory grows by one layer's weight at a time, whatever the format (QLoRA's recipe). In a
checkpointed block's recomputation (`weights_kept_for_backward`) the copies are kept until the block's
backward, which follows at once: one block's weights, one dequantisation fewer.
peft wraps it like any `nn.Linear` (it is a subclass), so adapters, kohya export and removal work
unchanged, and the base bytes are only ever read.

Placement: `module.to(dtype)` sets the compute dtype and never casts the stored weight;
`module.to(device)` sets the compute device and moves the stored form only when the layer owns it
(`movable=True`, a model the trainer loaded). A host's weights (`movable=False`) stay where the host
keeps them; a layer whose weight is on another device than its input dequantises onto the input's
device per use, as the host's own swapped layers do.

`weight` is a stand-in that carries shape, dtype and device only (its values are NaN): code that
checks `layer.weight.dtype` (transformers' T5, peft) sees the compute dtype. Use
`dequantized_weight()` for the values.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Fp8Weight, FrozenWeight
from .fp8_products import fp8_input_grad, fp8_product, fp8_product_fits, row_scale


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype on `device_type` where autocast is on there, else None (torch 2.1 to the newest)."""
    try:  # torch >= 2.4 takes the device type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def _base_product(x2: torch.Tensor, frozen: FrozenWeight, bias: torch.Tensor | None, dtype: torch.dtype,
                  compute8: int, fused: bool) -> torch.Tensor:
    """x2 @ W.T + bias for a 2-D x2 in `dtype`: on fp8 tensor cores (`compute8`, fp8_products.py), else over W
    dequantised (by one compiled kernel where `fused`)."""
    if compute8:
        return fp8_product(x2, frozen.data, row_scale(frozen.scale, frozen.shape[0], x2.device), bias, dtype)
    return F.linear(x2, frozen.dequantize(dtype, x2.device, fused=fused), bias)


def _base_input_grad(g2: torch.Tensor, frozen: FrozenWeight, grad8: bool, fused: bool,
                     kept: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> torch.Tensor:
    """g2 @ W for a 2-D output gradient: over the W kept from forward where there is one (`_product_keeping`), on
    fp8 tensor cores where `grad8` and it fits, else over W dequantised."""
    if kept:
        return g2 @ kept[0]
    if grad8 and fp8_product_fits(g2, frozen.data.t(), g2.dtype):
        return fp8_input_grad(g2, frozen.data, row_scale(frozen.scale, frozen.shape[0], g2.device))
    return g2 @ frozen.dequantize(g2.dtype, g2.device, fused=fused)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


_checkpointed = threading.local()


@contextlib.contextmanager
def weights_kept_for_backward() -> Iterator[None]:
    """Inside it the products save the weight they dequantise and reuse it for their input gradient instead of
    dequantising it again in backward. Only for a non-reentrant checkpoint's two passes (accel passes it as the
    checkpoint's context for both: they must save the same tensors): the checkpoint holds nothing its first
    forward saves, and what its recomputation saves only until the block's backward, which follows at once. So
    one block's weights in the compute dtype live a little longer and a third of the dequantisation of an fp8
    Flux base goes (+3.3 % a step, bench/results/flux_vs_kohya_h200_keep.md). Outside a checkpoint it would keep
    every weight."""
    before = getattr(_checkpointed, "on", False)
    _checkpointed.on = True
    try:
        yield
    finally:
        _checkpointed.on = before


def _keeps_weight(compute8: int) -> bool:
    return not compute8 and getattr(_checkpointed, "on", False)


def _product_keeping(x2: torch.Tensor, frozen: FrozenWeight, bias: torch.Tensor | None, dtype: torch.dtype,
                     compute8: int, fused: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """`_base_product`, and the dequantised W to save for backward where `weights_kept_for_backward` asks for it
    (else nothing)."""
    if _keeps_weight(compute8):
        w = frozen.dequantize(dtype, x2.device, fused=fused)
        return F.linear(x2, w, bias), (w,)
    return _base_product(x2, frozen, bias, dtype, compute8, fused), ()


class _BaseProductFn(torch.autograd.Function):
    """y = x @ W.T + b with W not saved (but inside `weights_kept_for_backward`): dequantised in forward and again in
    backward (for the input gradient; a frozen weight has none of its own), or on fp8 tensor cores (`compute8` 1:
    forward, 2: the input gradient too)."""

    @staticmethod
    def forward(ctx, x, frozen, bias, dtype, compute8, fused):  # type: ignore[override]
        ctx.frozen, ctx.grad8, ctx.fused = frozen, compute8 >= 2, fused
        with torch.autocast(x.device.type, enabled=False):
            y, kept = _product_keeping(_rows(x).to(dtype), frozen, bias, dtype, compute8, fused)
        ctx.save_for_backward(*kept)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dx = _base_input_grad(_rows(grad), ctx.frozen, ctx.grad8, ctx.fused, ctx.saved_tensors)
        return dx.view(*grad.shape[:-1], dx.shape[-1]), None, None, None, None, None


def _scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · m1 @ m2 with the scale as the GEMM's alpha: no multiply kernel on either side (one per LoRA layer
    and pass in a CUDA graph otherwise). There is no mm with an alpha: addmm with beta = 0 ignores its input
    (torch's docs: NaN/inf in it are not propagated) and neither reads nor copies it (torch's CPU and CUDA addmm copy
    their input into the result only where beta != 0; tests/test_lora_alpha.py checks the CPU's), so the input is a
    0-dim empty tensor (no fill kernel) that broadcasts as a view."""
    if scale == 1.0:
        return m1 @ m2
    return torch.addmm(m1.new_empty(()), m1, m2, beta=0, alpha=scale)


class _LoraProductFn(torch.autograd.Function):
    """y = x @ W.T + bias + scale · (x @ A.T) @ B.T: the frozen layer's product with its LoRA's, the low-rank term
    accumulated into the base product in place by the GEMM (beta = 1, alpha = the LoRA scale), forward and
    backward. The same math as the base layer followed by accel's addmm, without what autograd and an out-of-place
    addmm add around it: a copy of the base output per call (torch's addmm copies its input into its result first)
    and an add of two input gradients per call in backward (17 + 15 of a Flux 24 GB step's 624 ms on an H100,
    bench/results/flux_profile_h100.md); and without a multiply of B by the scale and its backward's (the GEMMs'
    alpha applies it)."""

    @staticmethod
    def forward(ctx, x, a, b, frozen, bias, dtype, compute8, fused, scale):  # type: ignore[override]
        ctx.frozen, ctx.grad8, ctx.fused, ctx.scale = frozen, compute8 >= 2, fused, scale
        x2 = _rows(x).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            h = x2 @ a.t()
            y, kept = _product_keeping(x2, frozen, bias, dtype, compute8, fused)
            y.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, a, b, *kept)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x2, h, a, b, *kept = ctx.saved_tensors
        g2 = _rows(grad)
        gh = _scaled_mm(g2, b, ctx.scale)  # the gradient of h, scaled: the input gradient and A's need no alpha
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _base_input_grad(g2, ctx.frozen, ctx.grad8, ctx.fused, kept).addmm_(gh, a).view(ctx.shape)
        return dx, gh.t() @ x2, _scaled_mm(g2.t(), h, ctx.scale), None, None, None, None, None, None


def linear_with_lora(x: torch.Tensor, frozen: FrozenWeight, bias: torch.Tensor | None, a: torch.Tensor,
                     b: torch.Tensor, dtype: torch.dtype, compute8: int = 0, fused: bool = False,
                     scale: float = 1.0) -> torch.Tensor:
    """x @ W.T + bias + scale · (x @ a.T) @ b.T in `dtype` (`bias` in it already; `scale` is the LoRA's, applied as
    the GEMMs' alpha, 1 for a `b` scaled already) as one autograd function (`_LoraProductFn`): QuantLinear's lean
    LoRA forward, and accel's over a plain frozen Linear (its weight as a `PlainWeight`: no copy where the dtype
    matches)."""
    return _LoraProductFn.apply(x, a.to(dtype), b.to(dtype), frozen, bias, dtype, compute8, fused, float(scale))


class QuantLinear(nn.Linear):
    """A frozen Linear over a `FrozenWeight` (and an optional frozen bias)."""

    def __init__(self, frozen: FrozenWeight, bias: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 movable: bool = True):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight
        if len(frozen.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {tuple(frozen.shape)}")
        self.out_features, self.in_features = int(frozen.shape[0]), int(frozen.shape[1])
        self.frozen: FrozenWeight | None = frozen  # not a parameter or buffer: Module.to never casts it
        self.movable = movable
        # The bias is small and plain: an ordinary frozen parameter, placed and cast like a norm's weight.
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        device = frozen.device if device is None else torch.device(device)
        # accel's fp8_matmul (`use_fp8_products`): 1: the forward product of an fp8 e4m3fn weight on fp8 tensor
        # cores, 2: the input-gradient product too
        self.compute8 = 0
        # accel's fused_math (`use_fused_dequant`): the weight dequantised by one compiled kernel where it has one
        self.fused_cast = False
        # The compute dtype/device, as a tiny buffer so that Module.to/.cuda/.half keep it current.
        self.register_buffer("_anchor", torch.full((1, 1), float("nan"), dtype=dtype, device=device),
                             persistent=False)

    # -- what code that inspects nn.Linear sees ---------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._anchor.expand(self.out_features, self.in_features)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def compute_device(self) -> torch.device:
        return self._anchor.device

    @property
    def format(self) -> str:
        return "dropped" if self.frozen is None else self.frozen.format

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight's values (a temporary) in `dtype` (default: the compute dtype) on the compute device."""
        return self._frozen().dequantize(dtype or self.compute_dtype, self.compute_device)

    def _frozen(self) -> FrozenWeight:
        if self.frozen is None:
            raise RuntimeError("this QuantLinear's weight was dropped (moved to the meta device)")
        return self.frozen

    # -- placement ---------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        target = self._anchor.device
        if self.movable and self.frozen is not None and self.frozen.device != target:
            # the owner drops the model (meta): release the stored form; else move it (our own copy)
            self.frozen = None if target.type == "meta" else self.frozen.to(target)
        return self

    # -- compute -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen, dtype, bias, compute8 = self._operands(x)
        if compute8 or (torch.is_grad_enabled() and x.requires_grad):
            return _BaseProductFn.apply(x, frozen, bias, dtype, compute8, self.fused_cast)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), frozen.dequantize(dtype, x.device, fused=self.fused_cast), bias)

    def forward_with_lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                          scale: float = 1.0) -> torch.Tensor:
        """x @ W.T + bias + scale · (x @ a.T) @ b.T in the compute (or autocast) dtype, the LoRA scale applied as the
        GEMMs' alpha: accel's lean LoRA forward (lora_fast.py) over this layer, in one autograd function
        (`_LoraProductFn`)."""
        frozen, dtype, bias, compute8 = self._operands(x)
        return linear_with_lora(x, frozen, bias, a, b, dtype, compute8, self.fused_cast, scale)

    def _operands(self, x: torch.Tensor) -> tuple[FrozenWeight, torch.dtype, torch.Tensor | None, int]:
        """The stored weight, the compute dtype (autocast's where on), the bias in it, and the fp8 products' level
        for this input (0 where the weight or the shapes do not suit them)."""
        frozen = self._frozen()
        dtype = autocast_dtype(x.device.type) or self.compute_dtype
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=dtype)
        fits = self.compute8 and isinstance(frozen, Fp8Weight) and fp8_product_fits(x, frozen.data, dtype)
        return frozen, dtype, bias, self.compute8 if fits else 0

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.format}, compute={str(self.compute_dtype).replace('torch.', '')}")


# ---------------------------------------------------------------------------------- model helpers
def replace_linear(root: nn.Module, name: str, frozen: FrozenWeight, bias: torch.Tensor | None = None,
                   **kwargs) -> QuantLinear:
    """Put a QuantLinear over `frozen` at `root.<name>` (the module there is dropped, not copied)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    layer = QuantLinear(frozen, bias, **kwargs)
    setattr(parent, leaf, layer)
    return layer


def quantize_linears(model: nn.Module, quantize: Callable[[str, nn.Linear], FrozenWeight | None], *,
                     dtype: torch.dtype | None = None, movable: bool = True) -> int:
    """Replace each frozen `nn.Linear` (exact type) for which `quantize(name, layer)` returns a FrozenWeight
    by a QuantLinear over it (bias kept as is); returns how many. Computes in `dtype` (default: the
    layer's own dtype). Layers with trainable weights (LoRA A/B) are never touched."""
    names = [name for name, m in model.named_modules()
             if type(m) is nn.Linear and not any(p.requires_grad for p in m.parameters(recurse=False))]
    done = 0
    for name in names:
        layer = model.get_submodule(name)
        frozen = quantize(name, layer)
        if frozen is None:
            continue
        bias = None if layer.bias is None else layer.bias.detach()
        replace_linear(model, name, frozen, bias, dtype=dtype or layer.weight.dtype, device=layer.weight.device,
                       movable=movable)
        done += 1
    return done


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Every QuantLinear in `model` (peft base layers included), with its name."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The stored form of every QuantLinear weight, by `<layer>.stored.<i>` (for hashing)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in quant_layers(model):
        for i, t in enumerate(layer.frozen.storage() if layer.frozen is not None else []):
            out[f"{name}.stored.{i}"] = t
    return out


def formats(model: nn.Module) -> Counter:
    """{format: number of layers} of the QuantLinear layers in `model`."""
    return Counter(layer.format for _, layer in quant_layers(model))
