"""Tiny randomly initialised SD1/SD2/SDXL models with the real block structure.

Used by the tests and by `python -m lora_trainer demo` (no downloads). The layouts keep what
matters for key names and conversion (4 UNet levels with attention on the first three for SD1/SD2,
SDXL's 3 levels with 1/2 transformer layers, linear vs conv projections, OpenCLIP-style text
encoders), with channels shrunk so a CPU step takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .bundle import EPSILON, Family, ModelBundle, Schedule
from .tokenizers import PAD_ENDOFTEXT, PAD_EXCLAMATION, clip_tokenizer

TEXT_WIDTH = 32


def unet_config(family: Family) -> dict[str, Any]:
    if family is Family.SDXL:
        return {
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 2,
            "transformer_layers_per_block": (1, 1, 2),
            "attention_head_dim": (2, 4, 4),
            "cross_attention_dim": 2 * TEXT_WIDTH,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": TEXT_WIDTH + 6 * 8,
            "norm_num_groups": 32,
        }
    sd2 = family is Family.SD2
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (32, 64, 64, 64),
        "layers_per_block": 2,
        # SD1 counts heads here; SD2 lists heads per level (channels/64 in the real model).
        "attention_head_dim": (2, 4, 4, 4) if sd2 else 4,
        "cross_attention_dim": TEXT_WIDTH,
        "use_linear_projection": sd2,
        "norm_num_groups": 32,
    }


def vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
    }


def text_config(kind: str) -> dict[str, Any]:
    """kind: 'clip_l' (SD1, SDXL te1), 'open_clip_h' (SD2), 'open_clip_g' (SDXL te2)."""
    return {
        "vocab_size": 49408,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 2 * TEXT_WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu" if kind == "clip_l" else "gelu",
        "projection_dim": TEXT_WIDTH,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1 if kind == "clip_l" else 0,
    }


def _randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Redraw every weight: diffusers zero-initialises output layers, which would hide LoRA effects."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / max(fan_in, 1) ** 0.5)
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(1.0)


def build_tiny_bundle(family: Family | str = Family.SD1, prediction_type: str = EPSILON,
                      seed: int = 0, *, conv_projection: bool = False) -> ModelBundle:
    """A random tiny model in memory (fp32, CPU).

    conv_projection: 1x1-conv `proj_in`/`proj_out` instead of Linear (SD1 always; some SD2 files).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = Family(family)
    g = torch.Generator().manual_seed(seed)
    ucfg = unet_config(family)
    if conv_projection:
        ucfg["use_linear_projection"] = False
    unet = UNet2DConditionModel(**ucfg)
    vae = AutoencoderKL(**vae_config())
    if family is Family.SDXL:
        encoders = [CLIPTextModel(CLIPTextConfig(**text_config("clip_l"))),
                    CLIPTextModelWithProjection(CLIPTextConfig(**text_config("open_clip_g")))]
        tokenizers = [clip_tokenizer(PAD_ENDOFTEXT), clip_tokenizer(PAD_EXCLAMATION)]
    elif family is Family.SD2:
        encoders = [CLIPTextModel(CLIPTextConfig(**text_config("open_clip_h")))]
        tokenizers = [clip_tokenizer(PAD_EXCLAMATION)]
    else:
        encoders = [CLIPTextModel(CLIPTextConfig(**text_config("clip_l")))]
        tokenizers = [clip_tokenizer(PAD_ENDOFTEXT)]
    for m in (unet, vae, *encoders):
        _randomize(m, g)
        m.eval().requires_grad_(False)
    with torch.no_grad():  # keep decoded pixels mostly inside [-1, 1]
        vae.decoder.conv_out.weight.mul_(0.35)
    return ModelBundle(
        family=family,
        prediction_type=prediction_type,
        unet=unet,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        schedule=Schedule(),
        scaling_factor=0.13025 if family is Family.SDXL else 0.18215,
        name=f"tiny-{family.value}",
        source="built in memory",
    )


def write_tiny_checkpoint(folder: str | Path, family: Family | str = "sd1", prediction_type: str = EPSILON,
                          fmt: str = "safetensors", seed: int = 0, *, conv_projection: bool = False,
                          name: str | None = None) -> Path:
    """Write the tiny model of `build_tiny_bundle(family, prediction_type, seed)` into `folder`.

    fmt "safetensors"/"ckpt": a single-file LDM/SGM checkpoint laid out like A1111/Forge/Civitai files,
    plus the same-named A1111 `.yaml` whose text-encoder `version` points at `<name>-text/text_encoder*`
    folders (config.json + tokenizer files). fmt "diffusers": a diffusers pipeline folder.
    Returns the checkpoint file (or the diffusers folder).
    """
    import yaml

    from .ldm_writer import (
        atomic_write_text,
        bundle_to_ldm_state_dict,
        ldm_yaml,
        save_diffusers_folder,
        save_state_dict,
        write_text_encoder_folders,
    )

    if fmt not in ("safetensors", "ckpt", "diffusers"):
        raise ValueError(f"fmt must be 'safetensors', 'ckpt' or 'diffusers', not {fmt!r}")
    family = Family(family)
    bundle = build_tiny_bundle(family, prediction_type, seed, conv_projection=conv_projection)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if name is None:
        name = f"tiny-{family.value}" + ("-v" if prediction_type != EPSILON else "") + ("-conv" if conv_projection else "")
    if fmt == "diffusers":
        return save_diffusers_folder(bundle, folder / name)
    text_dirs = write_text_encoder_folders(bundle, folder / f"{name}-text")
    path = folder / f"{name}.{fmt}"
    save_state_dict(bundle_to_ldm_state_dict(bundle, seed), path, fmt,
                    metadata={"lora_trainer": f"tiny random {family.label} model", "seed": str(seed)})
    atomic_write_text(path.with_suffix(".yaml"), yaml.safe_dump(ldm_yaml(bundle, text_dirs), sort_keys=False))
    return path
