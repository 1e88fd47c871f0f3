"""VAE and text-encoder keys: LDM/SGM single-file layout <-> diffusers/transformers layout.

Renaming returns the very same tensor objects; the only tensor operations are slicing OpenCLIP's
fused `in_proj_weight` into q/k/v and transposing `text_projection`, both views. Writing the LDM
layout (tiny checkpoints, tests) fuses q/k/v with `torch.cat`, a copy, which is fine there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # + text_model.* (transformers CLIPTextModel)
SD2_TEXT_PREFIX = "cond_stage_model.model."  # OpenCLIP text tower
SDXL_TEXT1_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."


# ---------------------------------------------------------------- VAE
_VAE_RESNET_LEAVES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                    # diffusers < 0.14 names, still seen in old conversions
                    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}


def _vae_table(levels: int, layers_per_block: int) -> list[tuple[str, str, dict[str, str]]]:
    rows: list[tuple[str, str, dict[str, str]]] = []
    for side in ("encoder", "decoder"):
        rows.append((f"{side}.mid_block.resnets.0", f"{side}.mid.block_1", _VAE_RESNET_LEAVES))
        rows.append((f"{side}.mid_block.resnets.1", f"{side}.mid.block_2", _VAE_RESNET_LEAVES))
        rows.append((f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1", _VAE_ATTN_LEAVES))
        rows.append((f"{side}.conv_norm_out", f"{side}.norm_out", {}))
        rows.append((f"{side}.conv_in", f"{side}.conv_in", {}))
        rows.append((f"{side}.conv_out", f"{side}.conv_out", {}))
    for i in range(levels):
        for j in range(layers_per_block):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET_LEAVES))
        rows.append((f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", {}))
        ldm_level = levels - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        for j in range(layers_per_block + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}",
                         _VAE_RESNET_LEAVES))
        rows.append((f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{ldm_level}.upsample", {}))
    rows.append(("quant_conv", "quant_conv", {}))
    rows.append(("post_quant_conv", "post_quant_conv", {}))
    return rows


def _rename(key: str, lookup: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    parts = key.split(".")
    for cut in range(min(len(parts) - 1, 5), 0, -1):
        hit = lookup.get(".".join(parts[:cut]))
        if hit is None:
            continue
        target, leaves = hit
        rest = ".".join(parts[cut:])
        for src, dst in leaves.items():
            if rest.startswith(src + "."):
                rest = dst + rest[len(src):]
                break
        return f"{target}.{rest}"
    return None


def vae_to_diffusers(ldm_state_dict: Mapping[str, torch.Tensor], levels: int, layers_per_block: int,
                     prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """LDM VAE keys under `prefix` -> diffusers AutoencoderKL keys (shapes untouched; see fit_shape)."""
    lookup = {ldm: (d, {v: k for k, v in leaves.items() if k not in ("query", "key", "value", "proj_attn")})
              for d, ldm, leaves in _vae_table(levels, layers_per_block)}
    out = {}
    for key, value in ldm_state_dict.items():
        if not key.startswith(prefix):
            continue
        new = _rename(key[len(prefix):], lookup)
        if new is not None:
            out[new] = value
    return out


def vae_to_ldm(diffusers_state_dict: Mapping[str, torch.Tensor], levels: int, layers_per_block: int,
               prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> LDM keys; attention projections become 1x1 convs as in LDM files."""
    lookup = {d: (ldm, leaves) for d, ldm, leaves in _vae_table(levels, layers_per_block)}
    out = {}
    for key, value in diffusers_state_dict.items():
        new = _rename(key, lookup)
        if new is None:
            raise KeyError(f"{key!r} is not a diffusers VAE key")
        if ".mid.attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[prefix + new] = value
    return out


# ---------------------------------------------------------------- CLIP (transformers layout in LDM)
def clip_to_diffusers(ldm_state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """`cond_stage_model.transformer.text_model.*` -> `text_model.*` (position_ids dropped)."""
    out = {}
    for key, value in ldm_state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if not rest.startswith("text_model."):  # transformers < 4.? saved without the text_model level
            rest = "text_model." + rest
        if rest.endswith("position_ids"):
            continue  # a buffer the module rebuilds; some files store it as float or with odd values
        out[rest] = value
    return out


def clip_to_ldm(diffusers_state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    sd = canonical_text_keys(diffusers_state_dict)
    return {prefix + k: v for k, v in sd.items() if k.startswith("text_model.")}


def canonical_text_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 dropped the `text_model.` level of CLIPTextModel; put it back (no-op before)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state_dict.items()}


def module_text_keys(state_dict: Mapping[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical `text_model.*` keys -> the key names this transformers version's module uses."""
    if hasattr(module, "text_model"):
        return dict(state_dict)
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


# ---------------------------------------------------------------- OpenCLIP text tower
_OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def open_clip_layer_count(ldm_state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in ldm_state_dict if (m := pat.match(k))}
    return max(found) + 1 if found else 0


def open_clip_to_diffusers(ldm_state_dict: Mapping[str, torch.Tensor], prefix: str, num_layers: int,
                           with_projection: bool) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> transformers CLIPTextModel(WithProjection) keys.

    Only the first `num_layers` resblocks are kept: SD2 uses the penultimate layer, so diffusers'
    SD2 text encoder has one layer fewer than the file holds.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in ldm_state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[rest]] = value
            continue
        if rest == "text_projection":
            if with_projection:
                out["text_projection.weight"] = value.T  # OpenCLIP multiplies x @ P; Linear does x @ W.T
            continue
        m = _RESBLOCK.fullmatch(rest)
        if m is None:
            continue  # logit_scale, attn_mask, ...
        layer, leaf = int(m.group(1)), m.group(2)
        if layer >= num_layers:
            continue
        base = f"text_model.encoder.layers.{layer}."
        if leaf in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if leaf.endswith("weight") else "bias"
            q, k, v = value.chunk(3, dim=0)  # views into the fused tensor
            out[base + f"self_attn.q_proj.{kind}"] = q
            out[base + f"self_attn.k_proj.{kind}"] = k
            out[base + f"self_attn.v_proj.{kind}"] = v
            continue
        for src, dst in _OPEN_CLIP_LAYER.items():
            if leaf.startswith(src + "."):
                out[base + dst + leaf[len(src):]] = value
                break
    return out


def open_clip_to_ldm(diffusers_state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel(WithProjection) -> OpenCLIP keys (q/k/v fused, projection transposed)."""
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer_map = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    diffusers_state_dict = canonical_text_keys(diffusers_state_dict)
    out: dict[str, torch.Tensor] = {}
    pat = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
    for key, value in diffusers_state_dict.items():
        if key in top:
            out[prefix + top[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := pat.fullmatch(key):
            layer, leaf = m.group(1), m.group(2)
            base = f"{prefix}transformer.resblocks.{layer}."
            if leaf.startswith("self_attn.q_proj."):
                kind = leaf.rsplit(".", 1)[1]
                parts = [diffusers_state_dict[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"]
                         for p in "qkv"]
                out[base + f"attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            elif leaf.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                continue
            else:
                for src, dst in layer_map.items():
                    if leaf.startswith(src + "."):
                        out[base + dst + leaf[len(src):]] = value
                        break
                else:
                    raise KeyError(f"{key!r} is not a CLIP text-encoder key")
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"{key!r} is not a CLIP text-encoder key")
    return out


def fit_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Match a 1x1 conv weight to a Linear weight or back (LDM VAE attention, SD2 proj_in/proj_out).

    Returns a view when the memory layout allows it (always for tensors read from a file).
    """
    if tensor.shape == shape:
        return tensor
    if tensor.numel() == torch.Size(shape).numel() and [d for d in tensor.shape if d != 1] == [
            d for d in shape if d != 1]:
        return tensor.reshape(shape)
    raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(shape)}")
