"""The Flux blocks' weightless math: rotary position embedding, q/k RMS norms, attention over rotated heads, and
`BlockMath`, the functions of tensors only that the blocks call between their projections (accel/fused_math.py
compiles them on CUDA). Written from BFL's reference architecture (github.com/black-forest-labs/flux, Apache-2.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


# ---------------------------------------------------------------- positional embedding (RoPE)
def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """2x2 rotation matrices for each position and frequency: (..., n, dim/2, 2, 2), float32."""
    # float64 like kohya's and diffusers' Flux (MPS has no float64)
    wide = torch.float32 if pos.device.type == "mps" else torch.float64
    scale = torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    out = pos.to(wide).unsqueeze(-1) * omega  # (..., n, dim/2)
    cos, sin = torch.cos(out), torch.sin(out)
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(*out.shape, 2, 2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention over q, k, v (B, H, L, D) that already carry their positions -> (B, L, H*D). cuDNN's attention
    writes its output in q's memory layout: with q laid out (B, L, H, D) as the qkv functions below give it, the
    (B, L, H*D) result is a view, not a transposing copy (forward, and its gradient's in backward)."""
    x = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return x.transpose(1, 2).flatten(2)


def rms_norm(x: Tensor, scale: Tensor) -> Tensor:
    """x / RMS(x) over the last dimension, in fp32, times `scale`, in x's dtype."""
    dtype = x.dtype
    x = x.float()
    rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
    return (x * rrms).to(dtype=dtype) * scale.to(dtype)


def _split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, L, 3*H*D) -> three (B, L, H, D) views (tokens before heads: see `_heads_first`)."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).unbind(2)
    return q, k, v


def _heads_first(*xs: Tensor) -> tuple[Tensor, ...]:
    """(B, L, H, D) -> (B, H, L, D) as views: attention's shapes over a tokens-first memory layout, which cuDNN
    reads as it is and gives its output in (`attend`)."""
    return tuple(x.transpose(1, 2) for x in xs)


# ---------------------------------------------------------------- the blocks' weightless math
# Between a block's qkv projection and its attention: split into heads, RMS-norm q and k in fp32, rotate them in
# fp32 (RoPE); around the projections: the norms with their modulation, the gated residual adds, the single
# block's GELU beside the attention output. Eager, each is several full-size passes over memory, forward and
# backward; as functions of tensors only (the norms' scales are arguments) they can be fused by torch.compile,
# which `accel.fused_math` puts into a model's `BlockMath` on CUDA. Both compute the same function (the fused
# modulated norm rounds once where the eager one may round its norm's output first).
def single_qkv(qkv: Tensor, num_heads: int, q_scale: Tensor, k_scale: Tensor,
               pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A single block's attention inputs: (B, L, 3*H*D) -> q, k, v (B, H, L, D), q and k normed and rotated
    (pe: (B, 1, L, D/2, 2, 2) as `EmbedND` gives it)."""
    q, k, v = _split_heads(qkv, num_heads)
    q, k = apply_rope(rms_norm(q, q_scale).to(v), rms_norm(k, k_scale).to(v), pe.transpose(1, 2))
    return _heads_first(q, k, v)


def double_qkv(img_qkv: Tensor, txt_qkv: Tensor, num_heads: int, img_scales: tuple[Tensor, Tensor],
               txt_scales: tuple[Tensor, Tensor], pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A double block's joint attention inputs: each stream split and normed with its own scales, text first."""
    img_q, img_k, img_v = _split_heads(img_qkv, num_heads)
    txt_q, txt_k, txt_v = _split_heads(txt_qkv, num_heads)
    img_q, img_k = rms_norm(img_q, img_scales[0]).to(img_v), rms_norm(img_k, img_scales[1]).to(img_v)
    txt_q, txt_k = rms_norm(txt_q, txt_scales[0]).to(txt_v), rms_norm(txt_k, txt_scales[1]).to(txt_v)
    q, k = apply_rope(torch.cat((txt_q, img_q), dim=1), torch.cat((txt_k, img_k), dim=1), pe.transpose(1, 2))
    return _heads_first(q, k, torch.cat((txt_v, img_v), dim=1))


def mod_norm(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift (no affine, eps 1e-6) in fp32, rounded once to x's dtype: the fused
    form of the block's norm module and modulation (eagerly the blocks keep those: `BlockMath.mod_norm` None)."""
    y = nn.functional.layer_norm(x.float(), x.shape[-1:], eps=1e-6)
    return ((1 + scale.float()) * y + shift.float()).to(x.dtype)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """The residual stream plus a gated branch."""
    return x + gate * y


def single_out(attn: Tensor, mlp: Tensor) -> Tensor:
    """A single block's linear2 input: attention's output (B, H, L, D) as (B, L, H*D) beside GELU(mlp)."""
    return torch.cat((attn.transpose(1, 2).flatten(2), nn.functional.gelu(mlp, approximate="tanh")), 2)


@dataclass(frozen=True)
class BlockMath:
    """What the blocks call for their weightless math (eager by default; see `accel.fused_math`)."""

    single_qkv: Callable[..., tuple[Tensor, Tensor, Tensor]] = single_qkv
    double_qkv: Callable[..., tuple[Tensor, Tensor, Tensor]] = double_qkv
    mod_norm: Callable[..., Tensor] | None = None  # None: the block's LayerNorm module, then the modulation
    gated_add: Callable[..., Tensor] = gated_add
    single_out: Callable[..., Tensor] = single_out


EAGER_MATH = BlockMath()
