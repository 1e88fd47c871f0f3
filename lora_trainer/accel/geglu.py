"""GEGLU (the feed-forward gate of SD UNets' transformer blocks) in one Triton kernel each way.

diffusers' `GEGLU.forward` is `h, gate = self.proj(x).chunk(2, -1); return h * F.gelu(gate)`: eager, a GELU kernel
and a multiply in the forward (the GELU's output written and kept for the backward), a GELU backward and two
multiplies in the backward, each a full pass over memory; part of the ~5.4 ms of elementwise kernels in SD1.5
batch 8's 63 ms step on an H100 (bench/results/speed_cl_h100.md). Here the forward reads h and g (the two halves of
each row of the projection's output) and writes y = h·gelu(g); the backward reads dy, h and g and writes d(hg), both
halves, as one contiguous tensor (what the projection's backward takes): dh = dy·gelu(g), dg = dy·h·gelu'(g). Only
the projection's output is kept (gelu(g) is recomputed), the math in fp32, one rounding to the input's dtype.

On CUDA where Triton (>= 3) is, after a self-check per device and dtype (`check_kernels`); anywhere else, diffusers'
own math runs: the same function.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .forwards import replace_forwards, restore_forwards
from .triton_check import checked_once, interpreting

BLOCK_R = 8  # rows per program
BLOCK_D = 128  # columns per program: SD's half widths (640 to 5120) are multiples of it
_ATTR = "_lora_trainer_fused_geglu"
APPROXIMATE = "none"  # diffusers' GEGLU.gelu is F.gelu(gate): the exact (erf) GELU


@functools.cache
def _kernels(interpret: bool) -> Any:
    """The Triton kernels, built at first use, one set per interpreter mode (as group_norm_nhwc's)."""
    import triton
    import triton.language as tl

    if int(triton.__version__.split(".")[0]) < 3:
        raise RuntimeError(f"Triton {triton.__version__} (3.0 or later needed)")

    # do_not_specialize: Triton compiles again for each integer argument that is 1 or divisible by 16 where it was
    # not before; SD's token counts vary with the picture size and gain nothing from it
    @triton.jit(do_not_specialize=["R", "D"])
    def forward(hg_ptr, y_ptr, R, D, BR: tl.constexpr, BD: tl.constexpr, TANH: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        m = (r < R)[:, None] & (c < D)[None, :]
        h_off = r[:, None] * (2 * D) + c[None, :]
        h = tl.load(hg_ptr + h_off, mask=m, other=0.0).to(tl.float32)
        g = tl.load(hg_ptr + h_off + D, mask=m, other=0.0).to(tl.float32)
        # gelu(g) = g·cdf(g), cdf as torch's (tanh: its approximation); Triton's interpreter resolves no helper
        # jit function from a closure, so the backward repeats this
        if TANH:  # tanh(k), k = sqrt(2/pi)·(g + 0.044715·g³), from e = exp(-2|k|): no overflow, no cancellation
            k = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(k))
            t = (1.0 - e) / (1.0 + e)
            cdf = 0.5 * (1.0 + tl.where(k >= 0, t, -t))
        else:
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        tl.store(y_ptr + r[:, None] * D + c[None, :], (h * g * cdf).to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["R", "D"])
    def backward(dy_ptr, hg_ptr, dhg_ptr, R, D, BR: tl.constexpr, BD: tl.constexpr, TANH: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        m = (r < R)[:, None] & (c < D)[None, :]
        h_off = r[:, None] * (2 * D) + c[None, :]
        dy = tl.load(dy_ptr + r[:, None] * D + c[None, :], mask=m, other=0.0).to(tl.float32)
        h = tl.load(hg_ptr + h_off, mask=m, other=0.0).to(tl.float32)
        g = tl.load(hg_ptr + h_off + D, mask=m, other=0.0).to(tl.float32)
        if TANH:  # as the forward's; gelu' = cdf + g/2·(1 - tanh²(k))·dk/dg, 1 - tanh²(k) = 4e/(1 + e)²
            k = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            e = tl.exp(-2.0 * tl.abs(k))
            t = (1.0 - e) / (1.0 + e)
            cdf = 0.5 * (1.0 + tl.where(k >= 0, t, -t))
            sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
            slope = cdf + 0.5 * g * sech2 * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        else:  # gelu' = cdf(g) + g·φ(g)
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            slope = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        tl.store(dhg_ptr + h_off, (dy * g * cdf).to(dhg_ptr.dtype.element_ty), mask=m)
        tl.store(dhg_ptr + h_off + D, (dy * h * slope).to(dhg_ptr.dtype.element_ty), mask=m)

    return SimpleNamespace(forward=forward, backward=backward)


def _grid(rows: int, d: int) -> tuple[int, int]:
    return -(-rows // BLOCK_R), -(-d // BLOCK_D)


def _forward(hg: torch.Tensor, approximate: str) -> torch.Tensor:
    d = hg.shape[-1] // 2
    rows = hg.numel() // max(2 * d, 1)
    y = torch.empty(*hg.shape[:-1], d, device=hg.device, dtype=hg.dtype)
    if y.numel():
        _kernels(interpreting()).forward[_grid(rows, d)](hg, y, rows, d, BR=BLOCK_R, BD=BLOCK_D,
                                                          TANH=approximate == "tanh")
    return y


def _backward(dy: torch.Tensor, hg: torch.Tensor, approximate: str) -> torch.Tensor:
    d = hg.shape[-1] // 2
    rows = hg.numel() // max(2 * d, 1)
    dhg = torch.empty_like(hg, memory_format=torch.contiguous_format)
    if dhg.numel():
        _kernels(interpreting()).backward[_grid(rows, d)](dy, hg, dhg, rows, d, BR=BLOCK_R, BD=BLOCK_D,
                                                           TANH=approximate == "tanh")
    return dhg


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hg: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.save_for_backward(hg)  # gelu(g) is recomputed: nothing else kept
        ctx.approximate = approximate
        return _forward(hg, approximate)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        (hg,) = ctx.saved_tensors
        return _backward(dy.contiguous(), hg, ctx.approximate), None


def torch_geglu(hg: torch.Tensor, approximate: str = APPROXIMATE) -> torch.Tensor:
    """The eager expression (diffusers' GEGLU after its projection)."""
    h, g = hg.chunk(2, dim=-1)
    return h * F.gelu(g, approximate=approximate)


_checked: dict[tuple[torch.device, torch.dtype, str], bool] = {}


def check_kernels(device: torch.device | str, dtype: torch.dtype, approximate: str = APPROXIMATE) -> bool:
    """Whether the kernels serve this device and dtype, checked once (`_self_check`); `use_fused_geglu` asks before
    training. A first ask inside a CUDA-graph capture says False (no compiling inside one)."""
    return checked_once(_checked, device, (dtype, approximate), "The GEGLU",
                        lambda dev: _self_check(dev, dtype, approximate))


def _self_check(device: torch.device, dtype: torch.dtype, approximate: str) -> bool:
    """The kernels compile, run forward and backward and agree with torch's GELU and its backward (called as ops,
    no autograd: safe inside a checkpointed forward); an old Triton, or a GPU it cannot compile for, raises (the
    eager math then runs)."""
    g = torch.Generator(device=device).manual_seed(0)
    # 2×8 rows of 2×128 (SD's widths are multiples of 16, as is this: what compiles here is what runs)
    hg = (torch.randn(2, 8, 256, device=device, generator=g) * 2).to(dtype)
    dy = torch.randn(2, 8, 128, device=device, generator=g).to(dtype)
    y, dhg = _forward(hg, approximate), _backward(dy, hg, approximate)
    h, gate = hg.float().chunk(2, dim=-1)
    ref_y = h * F.gelu(gate, approximate=approximate)
    ref_dh = dy.float() * F.gelu(gate, approximate=approximate)
    ref_dg = torch.ops.aten.gelu_backward(dy.float() * h, gate, approximate=approximate)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return all(torch.allclose(ours.float(), ref, atol=tol, rtol=tol)
               for ours, ref in ((y, ref_y), (dhg, torch.cat([ref_dh, ref_dg], dim=-1))))


def _runs_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


def geglu(hg: torch.Tensor, approximate: str = APPROXIMATE) -> torch.Tensor:
    """`h * gelu(g)` for `h, g = hg.chunk(2, -1)`: the Triton kernels where `hg` is on CUDA (or the interpreter is
    on) and they passed their check for its device and dtype; the eager expression anywhere else."""
    if approximate not in ("none", "tanh") or not _runs_triton(hg) or hg.shape[-1] % 2 \
            or hg.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or not check_kernels(hg.device, hg.dtype, approximate):
        return torch_geglu(hg, approximate)
    return _GEGLU.apply(hg.contiguous(), approximate)


def _geglu_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """diffusers' GEGLU.forward with the gate in one kernel each way; its projection (perhaps a peft LoRA Linear)
    called as it is."""
    if args or kwargs:  # the deprecated `scale`: diffusers' own forward says so
        return type(self).forward(self, hidden_states, *args, **kwargs)
    hg = self.proj(hidden_states)
    if not _runs_triton(hg):
        h, gate = hg.chunk(2, dim=-1)
        return h * self.gelu(gate)
    return geglu(hg, APPROXIMATE)


def _geglu_class() -> type | None:
    try:  # lazily: diffusers may be absent (A1111's stack has none)
        from diffusers.models.activations import GEGLU
    except ImportError:
        return None
    return GEGLU


def use_fused_geglu(model: nn.Module) -> int:
    """Give `model`'s diffusers GEGLU modules (that exact type) the fused forward where their projection's weight is
    on CUDA (or the interpreter is on) and the kernels pass their check for its dtype; returns how many."""
    cls = _geglu_class()
    if cls is None:
        return 0

    def choose(m: nn.Module) -> Any:
        w = getattr(getattr(m, "proj", None), "weight", None)
        if type(m) is not cls or not isinstance(w, torch.Tensor) or not _runs_triton(w):
            return None
        return _geglu_forward if check_kernels(w.device, w.dtype) else None

    return replace_forwards(model, choose, _ATTR)


def restore_geglu(model: nn.Module) -> int:
    """Undo `use_fused_geglu`: diffusers' own forward back; returns how many."""
    return restore_forwards(model, _ATTR)
