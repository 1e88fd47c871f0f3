"""GroupNorm of a channels_last (NHWC in memory) tensor that keeps that layout, in two Triton kernels a pass.

torch's CUDA GroupNorm computes on NCHW: a channels_last activation is copied to NCHW before the norm and the norm's
output is NCHW, which the next convolution (NHWC weights) copies back; the same again in the backward. That is why
channels_last lost at SDXL batch 1 and SD1.5 batch 8 (bench/results/speed_lean_h100.md) although cuDNN's
convolutions want NHWC. Here the norm reads and writes NHWC: a kernel sums each channel over a chunk of pixels
(coalesced rows of channels), torch combines the chunks into each group's mean and 1/std (Chan's parallel variance:
no cancellation), and a second kernel writes x * a + b with a per-(sample, channel) scale and shift. The backward
of a frozen-affine norm (the input's gradient only) is the same two kernels with torch's own formula
(aten's GroupNorm backward: dx = rstd·γ·dy + c2·x + c3). Statistics in fp32 whatever the input's dtype, as torch's.

Only for the frozen norms of a channels_last model on CUDA where Triton is (accel.norms chooses); anywhere else
F.group_norm runs: the same function.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F

BLOCK_P = 64  # pixels per program
BLOCK_C = 64  # channels per program (a row of 64 bf16 values: 128 bytes)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: the kernels on the CPU (tests)


@functools.cache
def _kernels(interpret: bool) -> tuple[Any, Any]:
    """The Triton kernels, built at first use (Triton is imported only where it is used); Triton decides at the
    decoration whether they compile or run in its interpreter, so each way has its own."""
    import triton
    import triton.language as tl

    @triton.jit
    def channel_sums(x_ptr, dy_ptr, out1_ptr, out2_ptr, HW, C, S,
                     BP: tl.constexpr, BC: tl.constexpr, GRAD: tl.constexpr):
        # forward: each channel's mean and sum of squared deviations over this chunk of pixels;
        # backward: each channel's sum of dy·x and of dy over the chunk
        n = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1)
        p = s * BP + tl.arange(0, BP)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        pm = p < HW
        cm = c < C
        m = pm[:, None] & cm[None, :]
        off = n * HW * C + p[:, None] * C + c[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if GRAD:
            dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
            r1 = tl.sum(dy * x, axis=0)
            r2 = tl.sum(dy, axis=0)
        else:
            count = tl.sum(pm.to(tl.float32), axis=0)
            r1 = tl.sum(x, axis=0) / count
            d = tl.where(m, x - r1[None, :], 0.0)
            r2 = tl.sum(d * d, axis=0)
        o = (n * S + s) * C + c
        tl.store(out1_ptr + o, r1, mask=cm)
        tl.store(out2_ptr + o, r2, mask=cm)

    @triton.jit
    def affine(p_ptr, q_ptr, a_ptr, b_ptr, c_ptr, out_ptr, HW, C,
               BP: tl.constexpr, BC: tl.constexpr, HAS_Q: tl.constexpr):
        # out = p·a + q·b + c, with a, b, c per (sample, channel): the norm (p = x) and its backward (p = dy, q = x)
        n = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BP + tl.arange(0, BP)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        cm = c < C
        m = (p < HW)[:, None] & cm[None, :]
        off = n * HW * C + p[:, None] * C + c[None, :]
        nc = n * C + c
        a = tl.load(a_ptr + nc, mask=cm, other=0.0)
        k = tl.load(c_ptr + nc, mask=cm, other=0.0)
        y = tl.load(p_ptr + off, mask=m, other=0.0).to(tl.float32) * a[None, :] + k[None, :]
        if HAS_Q:
            b = tl.load(b_ptr + nc, mask=cm, other=0.0)
            y += tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32) * b[None, :]
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)

    return channel_sums, affine


def _grid(n: int, hw: int, c: int) -> tuple[int, int, int]:
    return n, -(-hw // BLOCK_P), -(-c // BLOCK_C)


def _sums(x: torch.Tensor, dy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    grid = _grid(n, h * w, c)
    r1 = torch.empty(n, grid[1], c, device=x.device, dtype=torch.float32)
    r2 = torch.empty_like(r1)
    _kernels(_interpreting())[0][grid](x, x if dy is None else dy, r1, r2, h * w, c, grid[1],
                        BP=BLOCK_P, BC=BLOCK_C, GRAD=dy is not None)
    return r1, r2


def _affine(p: torch.Tensor, a: torch.Tensor, k: torch.Tensor, q: torch.Tensor | None = None,
            b: torch.Tensor | None = None) -> torch.Tensor:
    n, c, h, w = p.shape
    out = torch.empty_like(p, memory_format=torch.channels_last)
    _kernels(_interpreting())[1][_grid(n, h * w, c)](
        p, p if q is None else q, a.contiguous(), a if b is None else b.contiguous(), k.contiguous(), out, h * w, c,
        BP=BLOCK_P, BC=BLOCK_C, HAS_Q=q is not None)
    return out


def _per_channel(t: torch.Tensor, c: int) -> torch.Tensor:
    """(N, G) per group → (N, C) per channel."""
    n, g = t.shape
    return t[:, :, None].expand(n, g, c // g).reshape(n, c)


def _gamma(weight: torch.Tensor | None, c: int, like: torch.Tensor) -> torch.Tensor:
    return weight.float() if weight is not None else torch.ones(c, device=like.device, dtype=torch.float32)


def _forward(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    hw, cg = h * w, c // groups
    means, m2 = _sums(x, None)  # (N, S, C): each chunk's channel means and squared deviations
    s = means.shape[1]
    counts = (hw - torch.arange(s, device=x.device, dtype=torch.float32) * BLOCK_P).clamp_(max=BLOCK_P)
    counts = counts[None, :, None, None]
    means, m2 = means.view(n, s, groups, cg), m2.view(n, s, groups, cg)
    mean = (means * counts).sum((1, 3)) / (hw * cg)  # (N, G)
    var = (m2.sum((1, 3)) + ((means - mean[:, None, :, None]) ** 2 * counts).sum((1, 3))) / (hw * cg)
    rstd = torch.rsqrt(var + eps)
    a = _per_channel(rstd, c) * _gamma(weight, c, x)
    k = -_per_channel(mean, c) * a
    if bias is not None:
        k = k + bias.float()
    return _affine(x, a, k), mean, rstd


def _backward(dy: torch.Tensor, x: torch.Tensor, groups: int, weight: torch.Tensor | None, mean: torch.Tensor,
              rstd: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    dy = dy.contiguous(memory_format=torch.channels_last)
    ds, db = (t.sum(1) for t in _sums(x, dy))  # (N, C): Σ dy·x and Σ dy per channel
    gamma = _gamma(weight, c, x)
    ds_g = (ds * gamma).view(n, groups, -1).sum(2)
    db_g = (db * gamma).view(n, groups, -1).sum(2)
    scale = 1.0 / (h * w * (c // groups))
    c2 = (db_g * mean - ds_g) * rstd ** 3 * scale
    c3 = -c2 * mean - db_g * rstd * scale
    return _affine(dy, _per_channel(rstd, c) * gamma, _per_channel(c3, c), x, _per_channel(c2, c))


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        y, mean, rstd = _forward(x, groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        dx = _backward(dy, x, ctx.groups, weight, mean, rstd) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None


def is_nhwc(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also NCHW-contiguous, as a 1×1 or 1-channel one is)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """F.group_norm for a channels_last `x` with a frozen weight and bias (no gradients for them); the output is
    channels_last. Needs Triton where `x` is (accel.norms uses it where fused_math_available says so). Other
    inputs, or trainable weights, take F.group_norm."""
    trains_affine = any(t is not None and t.requires_grad for t in (weight, bias))
    runs_triton = x.is_cuda or _interpreting()
    if not runs_triton or not is_nhwc(x) or trains_affine or x.shape[1] % groups:
        return F.group_norm(x, groups, weight, bias, eps)
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps)
