"""Chroma (lodestones/Chroma): a FLUX.1-schnell derivative conditioned on T5 only, whose per-block
modulation vectors come from one small network (the "distilled guidance layer", an approximator)
instead of Linears in every block. Same BFL key layout otherwise, so the same blocks and LoRA names
(without the modulation Linears). Written from Chroma's reference (Apache-2.0) as kohya ports it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .model import (
    DoubleStreamBlock,
    FluxParams,
    FluxTransformer,
    LastLayer,
    MLPEmbedder,
    ModulationOut,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)


@dataclass(frozen=True)
class ChromaParams(FluxParams):
    vec_in_dim: int = 0  # no CLIP
    guidance_embed: bool = False
    approximator_in_dim: int = 64  # 16 timestep + 16 guidance + 32 modulation-index channels
    approximator_depth: int = 5
    approximator_hidden_size: int = 5120


CHROMA = ChromaParams()


class Approximator(nn.Module):
    """Maps (timestep, guidance, modulation index) embeddings to every modulation vector of the model."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, n_layers: int):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList(MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.norms = nn.ModuleList(RMSNorm(hidden_dim) for _ in range(n_layers))
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms):
            x = x + layer(norm(x))
        return self.out_proj(x)


class ChromaTransformer(FluxTransformer):
    """forward(img, img_ids, txt, txt_ids, timesteps, guidance=None, txt_mask=None, attn_padding=1):
    as Flux without `y`; `txt_mask` (B, T) is T5's attention mask: text tokens past each caption's
    length + `attn_padding` are not attended (Chroma trains with the T5 mask applied)."""

    def __init__(self, params: ChromaParams = CHROMA):
        nn.Module.__init__(self)
        self._init_input(params)
        self.distilled_guidance_layer = Approximator(params.approximator_in_dim, params.hidden_size,
                                                     params.approximator_hidden_size, params.approximator_depth)
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias, modulation=False)
            for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, modulation=False)
            for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(params.hidden_size, 1, params.out_channels, modulation=False)
        # single blocks 3 vectors, double blocks 6 per stream, final layer 2
        self.mod_index_length = 3 * params.depth_single_blocks + 12 * params.depth + 2
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

    def modulation_vectors(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        """(B, mod_index_length, hidden): every block's shift/scale/gate, from the approximator."""
        quarter = self.params.approximator_in_dim // 4
        b = timesteps.shape[0]
        if guidance is None:
            guidance = torch.zeros_like(timesteps)
        index = torch.arange(self.mod_index_length, device=timesteps.device)
        index_emb = timestep_embedding(index, 2 * quarter).unsqueeze(0).expand(b, -1, -1)
        tg = torch.cat([timestep_embedding(timesteps, quarter), timestep_embedding(guidance, quarter)], dim=1)
        x = torch.cat([tg.unsqueeze(1).expand(-1, self.mod_index_length, -1), index_emb.to(tg)], dim=-1)
        return self.distilled_guidance_layer(x)

    def _distribute(self, vectors: Tensor) -> tuple[list[Any], list[Any], tuple[Tensor, Tensor]]:
        """Chroma's fixed layout of the vectors: singles, double img streams, double txt streams, final."""
        def mod(i: int) -> ModulationOut:
            return ModulationOut(vectors[:, i:i + 1], vectors[:, i + 1:i + 2], vectors[:, i + 2:i + 3])

        depth, single = self.params.depth, self.params.depth_single_blocks
        singles = [mod(3 * i) for i in range(single)]
        img0, txt0 = 3 * single, 3 * single + 6 * depth
        doubles = [((mod(img0 + 6 * i), mod(img0 + 6 * i + 3)), (mod(txt0 + 6 * i), mod(txt0 + 6 * i + 3)))
                   for i in range(depth)]
        last = txt0 + 6 * depth
        return singles, doubles, (vectors[:, last:last + 1], vectors[:, last + 1:last + 2])

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                y: Tensor | None = None, guidance: Tensor | None = None, txt_mask: Tensor | None = None,
                attn_padding: int = 1) -> Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (batch, tokens, channels) tensors")
        img = self.img_in(img)
        txt = self.txt_in(txt)
        with torch.no_grad():  # as Chroma trains: the approximator is not trained through the blocks
            vectors = self.modulation_vectors(timesteps, guidance)
        singles, doubles, last = self._distribute(vectors.to(img.dtype))
        mask = None
        if txt_mask is not None:
            lengths = (txt_mask[:, : txt.shape[1]].sum(dim=-1) + attn_padding).clamp(max=txt.shape[1])
            keep_txt = torch.arange(txt.shape[1], device=txt.device)[None, :] < lengths[:, None]
            keep = torch.cat([keep_txt, torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)], dim=1)
            mask = keep[:, None, None, :]
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block, vec in zip(self.double_blocks, doubles):
            img, txt = self._block(block, img, txt, vec, pe, mask)
        x = torch.cat((txt, img), 1)
        for block, vec in zip(self.single_blocks, singles):
            x = self._block(block, x, vec, pe, mask)
        return self.final_layer(x[:, txt.shape[1]:, ...], last)
