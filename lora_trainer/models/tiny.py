"""Tiny randomly initialised SD1/SD2/SDXL models with the real block structure.

Used by the tests and by `python -m lora_trainer demo` (no downloads). The layouts keep what
matters for key names and conversion (4 UNet levels with attention on the first three for SD1/SD2,
SDXL's 3 levels with 1/2 transformer layers, linear vs conv projections, OpenCLIP-style text
encoders), with channels shrunk so a CPU step takes milliseconds.
"""

from __future__ import annotations

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
                      seed: int = 0) -> ModelBundle:
    """A random tiny model in memory (fp32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    family = Family(family)
    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
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
