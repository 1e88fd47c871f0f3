"""Key layouts of Flux files: prefixes users' files carry, diffusers <-> BFL transformer keys,
and the separate CLIP-L / T5-XXL / VAE files.

Renaming returns the same tensor objects. The diffusers transformer keeps q, k, v (and the
single blocks' MLP input) apart where BFL fuses them, so diffusers -> BFL concatenates (a copy;
diffusers-layout Flux files are rare) and BFL -> diffusers slices (views).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

# Prefixes seen in front of the transformer keys: BFL/ComfyUI UNet files have none, Forge and
# ComfyUI all-in-one checkpoints use `model.diffusion_model.`.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "")
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "clip_l.transformer.",
                 "conditioner.embedders.0.transformer.", "transformer.", "")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.", "")
VAE_PREFIXES = ("vae.", "first_stage_model.", "ae.", "")

_BFL_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
_DIFFUSERS_MARKERS = ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_q.weight",
                      "x_embedder.weight")


def find_prefix(keys: Iterable[str], markers: Iterable[str], prefixes: Iterable[str]) -> str | None:
    """The first prefix p such that p + marker is a key, for any marker; None when none matches."""
    keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    markers = tuple(markers)
    for p in prefixes:
        if any(p + m in keyset for m in markers):
            return p
    return None


def transformer_prefix(keys: Iterable[str]) -> tuple[str, str] | None:
    """(prefix, layout "bfl" | "diffusers") of the Flux transformer keys, or None."""
    keys = set(keys)
    p = find_prefix(keys, _BFL_MARKERS, TRANSFORMER_PREFIXES)
    if p is not None:
        return p, "bfl"
    p = find_prefix(keys, _DIFFUSERS_MARKERS, TRANSFORMER_PREFIXES)
    if p is not None:
        return p, "diffusers"
    return None


def strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def count_blocks(keys: Iterable[str], layout: str = "bfl") -> tuple[int, int]:
    """(double, single) block counts from the key names."""
    double, single = ("double_blocks.", "single_blocks.") if layout == "bfl" else \
        ("transformer_blocks.", "single_transformer_blocks.")
    nd = ns = 0
    for k in keys:
        if k.startswith(double):
            nd = max(nd, int(k.split(".")[1]) + 1)
        elif k.startswith(single):
            ns = max(ns, int(k.split(".")[1]) + 1)
    return nd, ns


# ---------------------------------------------------------------- diffusers <-> BFL transformer
# BFL name -> diffusers names whose tensors are concatenated along dim 0 (one name: a rename).
_TOP = {
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.adaLN_modulation.1": ["norm_out.linear"],  # halves swapped: BFL shift|scale, diffusers scale|shift
}
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_attn.norm.query_norm": ["attn.norm_q"],
    "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"],
    "txt_attn.norm.key_norm": ["attn.norm_added_k"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_SINGLE = {
    "modulation.lin": ["norm.linear"],
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "norm.query_norm": ["attn.norm_q"],
    "norm.key_norm": ["attn.norm_k"],
}


def _approximator_layers(keys: Iterable[str]) -> int:
    """Chroma's approximator depth (0 for Flux.1)."""
    return max((int(k.split(".")[2]) + 1 for k in keys if k.startswith("distilled_guidance_layer.layers.")),
               default=0)


def _leaf_pairs(double: int, single: int, approximator: int = 0) -> list[tuple[str, list[str]]]:
    """(BFL module path, diffusers module paths) for every module of the model (Chroma: with its
    approximator, whose MLP layers diffusers names linear_1/linear_2)."""
    pairs = [(k, v) for k, v in _TOP.items()]
    if approximator:
        pairs += [(f"distilled_guidance_layer.{n}", [f"distilled_guidance_layer.{n}"]) for n in ("in_proj", "out_proj")]
        for i in range(approximator):
            a = f"distilled_guidance_layer.layers.{i}"
            pairs += [(f"{a}.in_layer", [f"{a}.linear_1"]), (f"{a}.out_layer", [f"{a}.linear_2"]),
                      (f"distilled_guidance_layer.norms.{i}", [f"distilled_guidance_layer.norms.{i}"])]
    for i in range(double):
        pairs += [(f"double_blocks.{i}.{k}", [f"transformer_blocks.{i}.{n}" for n in v]) for k, v in _DOUBLE.items()]
    for i in range(single):
        pairs += [(f"single_blocks.{i}.{k}", [f"single_transformer_blocks.{i}.{n}" for n in v])
                  for k, v in _SINGLE.items()]
    return pairs


def _param_names(bfl_module: str) -> tuple[tuple[str, str], ...]:
    """(BFL parameter suffix, diffusers parameter suffix): RMSNorm `scale` is diffusers' `weight`."""
    if bfl_module.endswith(("query_norm", "key_norm")) or ".norms." in bfl_module:
        return (("scale", "weight"),)
    return (("weight", "weight"), ("bias", "bias"))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> BFL keys. Unknown keys raise KeyError.

    Scaled fp8 (`scale_weight` beside a weight) carries over; q/k/v parts with different scales
    are dequantised to float32 before they are fused."""
    from .fp8 import dequantize

    double, single = count_blocks(state_dict, "diffusers")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = {"scaled_fp8"}
    for bfl, names in _leaf_pairs(double, single, _approximator_layers(state_dict)):
        for bsuf, dsuf in _param_names(bfl):
            keys = [f"{n}.{dsuf}" for n in names]
            if not all(k in state_dict for k in keys):
                continue
            tensors = [state_dict[k] for k in keys]
            scales = [state_dict.get(f"{n}.scale_weight") for n in names] if dsuf == "weight" else [None]
            used.update(f"{n}.scale_weight" for n in names)
            scale = scales[0]
            if len(tensors) > 1 and scale is not None and not all(
                    s is not None and torch.equal(s, scale) for s in scales):
                tensors = [dequantize(t, s, torch.float32) for t, s in zip(tensors, scales)]
                scale = None
            value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            if bfl == "final_layer.adaLN_modulation.1":
                value = _swap_halves(value)
            out[f"{bfl}.{bsuf}"] = value
            if scale is not None:
                out[f"{bfl}.scale_weight"] = scale
            used.update(keys)
    left = [k for k in state_dict if k not in used]
    if left:
        raise KeyError(left[0])
    return out


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], hidden_size: int) -> dict[str, torch.Tensor]:
    """BFL keys -> diffusers FluxTransformer2DModel keys (fused projections sliced as views)."""
    double, single = count_blocks(state_dict, "bfl")
    out: dict[str, torch.Tensor] = {}
    for bfl, names in _leaf_pairs(double, single, _approximator_layers(state_dict)):
        for bsuf, dsuf in _param_names(bfl):
            key = f"{bfl}.{bsuf}"
            if key not in state_dict:
                continue
            value = state_dict[key]
            scale = state_dict.get(f"{bfl}.scale_weight") if bsuf == "weight" else None
            if scale is not None:  # scaled fp8: every part keeps the fused tensor's scale
                out.update({f"{n}.scale_weight": scale for n in names})
            if bfl == "final_layer.adaLN_modulation.1":
                value = _swap_halves(value)
            if len(names) == 1:
                out[f"{names[0]}.{dsuf}"] = value
                continue
            sizes = [hidden_size] * 3 + ([value.shape[0] - 3 * hidden_size] if len(names) == 4 else [])
            for name, part in zip(names, torch.split(value, sizes, dim=0)):
                out[f"{name}.{dsuf}"] = part
    return out


# ---------------------------------------------------------------- separate text encoders and VAE
def t5_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """T5EncoderModel keys; the token embedding is `shared.weight` and `encoder.embed_tokens.weight`
    (the same tensor: files hold one or both)."""
    sd = {k: v for k, v in state_dict.items() if k.startswith(("encoder.", "shared."))}
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if emb is not None:
        sd["shared.weight"] = emb
        sd["encoder.embed_tokens.weight"] = emb
    return sd


def clip_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys in transformers' canonical `text_model.*` form (the text projection,
    logit scale and vision tower of full CLIP files are dropped)."""
    return {k: v for k, v in state_dict.items() if k.startswith("text_model.")}
