"""GroupNorm of a channels_last (NHWC in memory) tensor that keeps that layout, in three Triton kernels a pass.

torch's CUDA GroupNorm computes on NCHW: a channels_last activation is copied to NCHW before the norm and the norm's
output is NCHW, which the next convolution (NHWC weights) copies back; the same again in the backward. That is why
channels_last lost at SDXL batch 1 and SD1.5 batch 8 (bench/results/speed_lean_h100.md) although cuDNN's
convolutions want NHWC. Here the norm reads and writes NHWC: a kernel sums each channel over a chunk of pixels
(coalesced rows of channels), a kernel per (sample, group) combines the chunks into the group's mean and 1/std
(Chan's parallel variance: no cancellation) and each channel's scale and shift, and a third writes x·a + k. The
backward of a frozen-affine norm (the input's gradient only) is the same three kernels with aten's formula
(dx = rstd·γ·dy + c2·x + c3). Statistics in fp32 whatever the input's dtype, as torch's.

Only for the frozen norms of a channels_last model on CUDA where Triton is (accel.norms chooses); anywhere else
F.group_norm runs: the same function.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from .triton_check import checked_once, interpreting

BLOCK_P = 64  # pixels per program
BLOCK_C = 64  # channels per program (a row of 64 bf16 values: 128 bytes)


@functools.cache
def _kernels(interpret: bool) -> Any:
    """The Triton kernels, built at first use (Triton is imported only where it is used); Triton decides at the
    decoration whether they compile or run in its interpreter, so each way has its own."""
    import triton
    import triton.language as tl

    # do_not_specialize: Triton compiles a kernel again for each integer argument that is 1 or divisible by 16 where
    # it was not before; the chunk and group counts vary with the picture size and gain nothing from it
    @triton.jit(do_not_specialize=["S"])
    def channel_sums(x_ptr, dy_ptr, af_ptr, kf_ptr, out1_ptr, out2_ptr, HW, C, S,
                     BP: tl.constexpr, BC: tl.constexpr, GRAD: tl.constexpr, ACT: tl.constexpr):
        # forward: each channel's mean and sum of squared deviations over this chunk of pixels;
        # backward: each channel's sum of dz·x and of dz over the chunk, dz the norm output's gradient (dy, or
        # with SiLU after the norm dy·silu'(z), z = x·af + kf recomputed from the forward's coefficients)
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
            if ACT:  # dy·silu'(z), z = x·af + kf: the norm's output, recomputed (the forward keeps x, not z)
                z = (x * tl.load(af_ptr + n * C + c, mask=cm, other=0.0)[None, :]
                     + tl.load(kf_ptr + n * C + c, mask=cm, other=0.0)[None, :])
                sig = 1.0 / (1.0 + tl.exp(-z))
                dy = dy * sig * (1.0 + z * (1.0 - sig))
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

    @triton.jit(do_not_specialize=["HW", "S", "CG", "G"])
    def group_coefficients(r1_ptr, r2_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, a_ptr, k_ptr, q_ptr, HW, C, S, CG, G,
                           eps, BP: tl.constexpr, BS: tl.constexpr, BCG: tl.constexpr, HAS_W: tl.constexpr,
                           HAS_B: tl.constexpr, GRAD: tl.constexpr):
        # one (sample, group): the chunks' per-channel results combined into the per-channel coefficients of the
        # affine kernel. Forward (r1, r2 = chunk means, squared deviations; Chan's combination): mean and 1/std
        # (kept for the backward), a = rstd·γ, k = β - mean·a. Backward (r1, r2 = Σ dy·x, Σ dy; aten's GroupNorm
        # backward): a = rstd·γ, q = c2, k = c3 for dx = a·dy + q·x + k
        n = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        j = tl.arange(0, BCG)
        cm = j < CG
        c = g * CG + j
        if HAS_W:
            gamma = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        else:
            gamma = tl.where(cm, 1.0, 0.0)
        acc1 = tl.zeros([BS, BCG], dtype=tl.float32)
        acc2 = tl.zeros([BS, BCG], dtype=tl.float32)
        for s0 in range(0, S, BS):
            s = s0 + tl.arange(0, BS)
            m = (s < S)[:, None] & cm[None, :]
            o = (n * S + s)[:, None] * C + c[None, :]
            v1 = tl.load(r1_ptr + o, mask=m, other=0.0)
            v2 = tl.load(r2_ptr + o, mask=m, other=0.0)
            if GRAD:
                acc1 += v1
                acc2 += v2
            else:
                cnt = tl.minimum(HW - s * BP, BP).to(tl.float32)
                acc1 += v1 * cnt[:, None]
                acc2 += v2
        total = (HW * CG).to(tl.float32)
        if GRAD:
            mean = tl.load(mean_ptr + n * G + g)
            rstd = tl.load(rstd_ptr + n * G + g)
            ds = tl.sum(tl.sum(acc1, axis=0) * gamma, axis=0)
            db = tl.sum(tl.sum(acc2, axis=0) * gamma, axis=0)
            c2 = (db * mean - ds) * rstd * rstd * rstd / total
            c3 = -c2 * mean - db * rstd / total
            tl.store(q_ptr + n * C + c, tl.zeros([BCG], dtype=tl.float32) + c2, mask=cm)
            tl.store(k_ptr + n * C + c, tl.zeros([BCG], dtype=tl.float32) + c3, mask=cm)
        else:
            mean = tl.sum(tl.sum(acc1, axis=1), axis=0) / total
            sq = tl.zeros([BS, BCG], dtype=tl.float32)
            for s0 in range(0, S, BS):
                s = s0 + tl.arange(0, BS)
                m = (s < S)[:, None] & cm[None, :]
                v1 = tl.load(r1_ptr + (n * S + s)[:, None] * C + c[None, :], mask=m, other=0.0)
                cnt = tl.minimum(HW - s * BP, BP).to(tl.float32)
                d = tl.where(m, v1 - mean, 0.0)
                sq += d * d * cnt[:, None]
            var = (tl.sum(tl.sum(acc2, axis=1), axis=0) + tl.sum(tl.sum(sq, axis=1), axis=0)) / total
            rstd = 1.0 / tl.sqrt(var + eps)
            tl.store(mean_ptr + n * G + g, mean)
            tl.store(rstd_ptr + n * G + g, rstd)
            beta = tl.zeros([BCG], dtype=tl.float32)
            if HAS_B:
                beta = tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
            tl.store(k_ptr + n * C + c, beta - mean * rstd * gamma, mask=cm)
        tl.store(a_ptr + n * C + c, rstd * gamma, mask=cm)

    @triton.jit
    def affine(p_ptr, q_ptr, a_ptr, b_ptr, c_ptr, af_ptr, kf_ptr, out_ptr, HW, C,
               BP: tl.constexpr, BC: tl.constexpr, HAS_Q: tl.constexpr, ACT: tl.constexpr):
        # out = p·a + q·b + c, with a, b, c per (sample, channel): the norm (p = x; ACT: then SiLU) and its backward
        # (p = dy, q = x; ACT: dy·silu'(z) first, z from the forward's coefficients af, kf)
        n = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BP + tl.arange(0, BP)
        c = tl.program_id(2) * BC + tl.arange(0, BC)
        cm = c < C
        m = (p < HW)[:, None] & cm[None, :]
        off = n * HW * C + p[:, None] * C + c[None, :]
        nc = n * C + c
        a = tl.load(a_ptr + nc, mask=cm, other=0.0)
        k = tl.load(c_ptr + nc, mask=cm, other=0.0)
        pv = tl.load(p_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_Q:
            q = tl.load(q_ptr + off, mask=m, other=0.0).to(tl.float32)
            if ACT:  # as in channel_sums
                z = (q * tl.load(af_ptr + nc, mask=cm, other=0.0)[None, :]
                     + tl.load(kf_ptr + nc, mask=cm, other=0.0)[None, :])
                sig = 1.0 / (1.0 + tl.exp(-z))
                pv = pv * sig * (1.0 + z * (1.0 - sig))
            y = pv * a[None, :] + k[None, :] + q * tl.load(b_ptr + nc, mask=cm, other=0.0)[None, :]
        else:
            y = pv * a[None, :] + k[None, :]
            if ACT:
                y = y / (1.0 + tl.exp(-y))
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=m)

    return SimpleNamespace(channel_sums=channel_sums, group_coefficients=group_coefficients, affine=affine)


def _norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
          act: bool = False, dy: torch.Tensor | None = None,
          saved: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The norm, then SiLU where `act` (dy None): (y, (mean, rstd, a, k): what its backward needs); its input
    gradient (dy, with the forward's `saved`): (dx, saved)."""
    kernels = _kernels(interpreting())
    n, c, h, w = x.shape
    hw, cg = h * w, c // groups
    grid = (n, -(-hw // BLOCK_P), -(-c // BLOCK_C))
    s = grid[1]
    f32 = {"device": x.device, "dtype": torch.float32}
    r1, r2 = torch.empty(n, s, c, **f32), torch.empty(n, s, c, **f32)
    if dy is None:
        mean, rstd = torch.empty(n, groups, **f32), torch.empty(n, groups, **f32)
        a_f = k_f = r1  # unused
    else:
        assert saved is not None
        mean, rstd, a_f, k_f = saved
    kernels.channel_sums[grid](x, x if dy is None else dy, a_f, k_f, r1, r2, hw, c, s, BP=BLOCK_P, BC=BLOCK_C,
                               GRAD=dy is not None, ACT=act)
    a, k = torch.empty(n, c, **f32), torch.empty(n, c, **f32)
    q = torch.empty(n, c, **f32) if dy is not None else a
    bcg = max(16, 1 << (cg - 1).bit_length())  # a group's channels, padded to a power of two
    kernels.group_coefficients[(n, groups)](
        r1, r2, x if weight is None else weight, x if bias is None else bias, mean, rstd, a, k, q, hw, c, s, cg,
        groups, eps, BP=BLOCK_P, BS=max(8, 2048 // bcg), BCG=bcg, HAS_W=weight is not None, HAS_B=bias is not None,
        GRAD=dy is not None)  # chunks × channels held at once: 2,048 (few registers a thread)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    p = x if dy is None else dy
    kernels.affine[grid](p, x, a, q, k, a_f, k_f, out, hw, c, BP=BLOCK_P, BC=BLOCK_C, HAS_Q=dy is not None, ACT=act)
    return out, (mean, rstd, a, k) if dy is None else saved


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float, act: bool) -> torch.Tensor:
        y, saved = _norm(x, groups, weight, bias, eps, act)
        ctx.save_for_backward(x, weight, *saved)
        ctx.groups, ctx.act = groups, act
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, *saved = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _norm(x, ctx.groups, weight, None, 0.0, ctx.act, dy.contiguous(memory_format=torch.channels_last),
                       tuple(saved))[0]
        return dx, None, None, None, None, None


def is_nhwc(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last (and not also NCHW-contiguous, as a 1×1 or 1-channel one is)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


_checked: dict[tuple[torch.device, torch.dtype], bool] = {}


def check_kernels(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the kernels serve this device and dtype, checked once (`_self_check`). accel.norms asks before
    training, outside any forward; a first ask inside a CUDA-graph capture says False (no compile inside one)."""
    return checked_once(_checked, device, (dtype,), "The NHWC GroupNorm's", lambda dev: _self_check(dev, dtype))


def _self_check(device: torch.device, dtype: torch.dtype) -> bool:
    """The kernels compile, run forward and backward, and agree with F.group_norm (an old Triton, or a GPU it cannot
    compile for, raises: torch's norm then runs)."""
    g = torch.Generator(device=device).manual_seed(0)
    # 8×8 pixels and 64 channels: the kernels specialised as for SD's sizes (multiples of 16), so that what
    # compiles here is what the run uses, before its first step; with and without SiLU
    x = torch.randn(2, 64, 8, 8, device=device, generator=g).to(dtype)
    w, b = torch.randn(64, device=device, generator=g).to(dtype), torch.randn(64, device=device, generator=g)
    ok = True
    for act in (False, True):
        xi = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        y = _GroupNormNHWC.apply(xi, 32, w, b.to(dtype), 1e-5, act)
        y.float().sum().backward()
        ref_x = x.detach().float().requires_grad_()
        ref = F.group_norm(ref_x, 32, w.float(), b, 1e-5)
        (F.silu(ref) if act else ref).sum().backward()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        ok = ok and bool(torch.allclose(y.float(), F.silu(ref) if act else ref, atol=tol, rtol=tol)
                         and torch.allclose(xi.grad.float(), ref_x.grad, atol=tol, rtol=tol))
    return ok


def group_norm_nhwc(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5, *, silu: bool = False) -> torch.Tensor:
    """F.group_norm (then F.silu where `silu`) for a channels_last `x` with a frozen weight and bias (no gradients
    for them); the output is channels_last. Needs Triton where `x` is (accel.norms uses it where
    fused_math_available says so). Other inputs, or trainable weights, take torch's functions."""
    trains_affine = any(t is not None and t.requires_grad for t in (weight, bias))
    runs_triton = x.is_cuda or interpreting()
    if (not runs_triton or not is_nhwc(x) or trains_affine or x.shape[1] % groups
            or not check_kernels(x.device, x.dtype)):
        y = F.group_norm(x, groups, weight, bias, eps)
        return F.silu(y) if silu else y
    return _GroupNormNHWC.apply(x, groups, weight, bias, eps, silu)
