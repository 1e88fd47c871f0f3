"""The Flux.1 transformer in Black Forest Labs' layout.

Parameter names are exactly the keys of BFL's checkpoints (`double_blocks.0.img_attn.qkv.weight`,
`single_blocks.3.linear1.weight`, ...), so a BFL file loads without renaming and a host that holds
Flux in this layout can hand its tensors over by name. Written from BFL's reference architecture
(github.com/black-forest-labs/flux, Apache-2.0).

Why not diffusers' FluxTransformer2DModel: kohya's `lora_flux` puts one adapter on every Linear of
the double and single blocks, including the fused `img_attn.qkv` and single-block `linear1`; here
those are single `nn.Linear`s, so peft adapters land exactly where kohya's do and the exported file
needs no rank-changing split.

Training hooks: `double_blocks`/`single_blocks` are ModuleLists (a block-swapping trainer moves
them), every projection is a plain `nn.Linear` (peft wraps it), and gradient checkpointing runs per
block through `_gradient_checkpointing_func` (the attribute diffusers models use, so
`accel.graph_safe_checkpointing` can swap it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.utils.checkpoint  # not imported by `import torch` on older releases (2.1)
from torch import Tensor, nn

from .block_math import EAGER_MATH, BlockMath, attend, rms_norm, rope


@dataclass(frozen=True)
class FluxParams:
    """Shape of a Flux transformer (BFL's FluxParams)."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True (guidance distilled); schnell: False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **changes: Any) -> FluxParams:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["axes_dim"] = list(self.axes_dim)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FluxParams:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        if "axes_dim" in values:
            values["axes_dim"] = tuple(int(a) for a in values["axes_dim"])
        return cls(**values)


FLUX_DEV = FluxParams()
FLUX_SCHNELL = FluxParams(guidance_embed=False)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as BFL does)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


# ---------------------------------------------------------------- building blocks
class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)

    def scales(self) -> tuple[Tensor, Tensor]:
        return self.query_norm.scale, self.key_norm.scale


class SelfAttention(nn.Module):
    """Holds the fused qkv projection, the q/k RMS norms and the output projection of one stream."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), (ModulationOut(*out[3:]) if self.is_double else None)


def _modulated(math: BlockMath, norm: nn.Module, x: Tensor, mod: ModulationOut) -> Tensor:
    if math.mod_norm is None:  # eager: the norm module (accel's lowp_norms may run it in bf16), then modulation
        return (1 + mod.scale) * norm(x) + mod.shift
    return math.mod_norm(x, mod.shift, mod.scale)


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined in one attention."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False,
                 modulation: bool = True):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.math = EAGER_MATH  # a plain attribute: no parameters, no state_dict keys
        self.modulated = modulation  # Chroma: no modulation Linears, the vectors come from its approximator
        # Definition order = kohya's module order (named_modules) for the LoRA targets.
        if modulation:
            self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size, bias=True))
        if modulation:
            self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"),
                                     nn.Linear(mlp_hidden_dim, hidden_size, bias=True))

    def modulations(self, vec: Tensor) -> tuple[tuple[ModulationOut, ModulationOut], tuple[ModulationOut, ...]]:
        """The block's modulation vectors from the conditioning vector (B, D), in the form forward also takes."""
        return self.img_mod(vec), self.txt_mod(vec)

    def forward(self, img: Tensor, txt: Tensor, vec: Any, pe: Tensor,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """vec: the conditioning vector (B, D), or the modulation vectors ((img_mod1, img_mod2), (txt_mod1,
        txt_mod2)) (Chroma's, or `modulations(vec)` worked out before the call)."""
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = self.modulations(vec) if isinstance(vec, Tensor) else vec

        m = self.math
        img_qkv = self.img_attn.qkv(_modulated(m, self.img_norm1, img, img_mod1))
        txt_qkv = self.txt_attn.qkv(_modulated(m, self.txt_norm1, txt, txt_mod1))
        q, k, v = m.double_qkv(img_qkv, txt_qkv, self.num_heads, self.img_attn.norm.scales(),
                               self.txt_attn.norm.scales(), pe)
        attn = attend(q, k, v, mask)
        # split, not two slices: its backward writes the joint gradient once (a slice's backward fills a zero
        # tensor of the whole size, and the two are then added)
        txt_attn, img_attn = torch.split(attn, [txt.shape[1], attn.shape[1] - txt.shape[1]], dim=1)

        img = m.gated_add(img, img_mod1.gate, self.img_attn.proj(img_attn))
        img = m.gated_add(img, img_mod2.gate, self.img_mlp(_modulated(m, self.img_norm2, img, img_mod2)))
        txt = m.gated_add(txt, txt_mod1.gate, self.txt_attn.proj(txt_attn))
        txt = m.gated_add(txt, txt_mod2.gate, self.txt_mlp(_modulated(m, self.txt_norm2, txt, txt_mod2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over text+image tokens; attention and MLP in parallel (fused linear1/linear2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, modulation: bool = True):
        super().__init__()
        self.modulated = modulation
        self.math = EAGER_MATH
        self.hidden_dim = hidden_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)  # qkv + mlp in
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)  # proj + mlp out
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if modulation:
            self.modulation = Modulation(hidden_size, double=False)

    def modulations(self, vec: Tensor) -> ModulationOut:
        """The block's modulation vectors from the conditioning vector (B, D), in the form forward also takes."""
        return self.modulation(vec)[0]

    def forward(self, x: Tensor, vec: Any, pe: Tensor, mask: Tensor | None = None) -> Tensor:
        """vec: the conditioning vector (B, D), or the modulation vectors (Chroma's, or `modulations(vec)`)."""
        mod = self.modulations(vec) if isinstance(vec, Tensor) else vec
        m = self.math
        qkv, mlp = torch.split(self.linear1(_modulated(m, self.pre_norm, x, mod)),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = m.single_qkv(qkv, self.num_heads, *self.norm.scales(), pe)
        attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return m.gated_add(x, mod.gate, self.linear2(m.single_out(attn, mlp)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, modulation: bool = True):
        super().__init__()
        self.modulated = modulation
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Any) -> Tensor:
        """vec: the conditioning vector (B, D), or for Chroma (shift, scale), each (B, 1, D)."""
        if self.modulated:
            shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
            shift, scale = shift[:, None, :], scale[:, None, :]
        else:
            shift, scale = vec
        return self.linear((1 + scale) * self.norm_final(x) + shift)


# ---------------------------------------------------------------- the model
class FluxTransformer(nn.Module):
    """Flux.1 (dev/schnell) transformer for flow matching on packed latent sequences.

    forward(img (B, L, 64), img_ids (B, L, 3), txt (B, T, 4096), txt_ids (B, T, 3), timesteps (B,) in
    [0, 1], y (B, 768) CLIP pooled, guidance (B,) for dev) -> (B, L, 64), as BFL's `Flux.forward`.
    """

    def __init__(self, params: FluxParams = FLUX_DEV):
        super().__init__()
        self._init_input(params)
        self.time_in = MLPEmbedder(256, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels)
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    # -- what the engine and hosts ask of a model -----------------------------------------------
    @property
    def config(self) -> FluxParams:
        return self.params

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _block(self, block: nn.Module, *args: Tensor):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _block_vec(self, block: nn.Module, vec: Tensor) -> Any:
        """What a block gets as its conditioning. Under gradient checkpointing its modulation is worked out here,
        outside the checkpoint: a product of the step's one conditioning vector with a quarter of Flux's weights
        that backward would otherwise compute again (and dequantise again over an fp8 base); the vectors it gives
        are a few KiB. A block whose weights arrive only inside its own call (block swap's hooks bring them in and
        set `weights_arrive_in_call`) keeps it inside that call."""
        if (self.gradient_checkpointing and torch.is_grad_enabled() and getattr(block, "modulated", False)
                and not getattr(block, "weights_arrive_in_call", False)):
            return block.modulations(vec)
        return vec

    def _init_input(self, params: Any) -> None:
        """The checks, sizes, position embedder and image input layer Flux and Chroma share (in this order:
        it is the order of the modules' parameters)."""
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}")
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"axes_dim {params.axes_dim} does not add up to the head size {params.head_dim}")
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(params.head_dim, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor, guidance: Tensor | None = None) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (batch, tokens, channels) tensors")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled (dev): pass `guidance`")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for block in self.double_blocks:
            img, txt = self._block(block, img, txt, self._block_vec(block, vec), pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = self._block(block, x, self._block_vec(block, vec), pe)
        return self.final_layer(x[:, txt.shape[1]:, ...], vec)


# ---------------------------------------------------------------- latents <-> token sequences
def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2*W/2, C*4) tokens (2x2 patches)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_latents; height/width are the latent's (not the packed grid's)."""
    b, _, d = x.shape
    c = d // 4
    return x.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> Tensor:
    """Position ids (B, H/2*W/2, 3) of the packed latent tokens: (0, row, column)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def text_ids(batch: int, length: int, device=None, dtype=torch.float32) -> Tensor:
    """Text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(batch, length, 3, device=device, dtype=dtype)
