"""Training presets: named groups of settings, each labelled with the GPU memory it is meant to fit.

`TrainConfig.with_preset(key)` applies one; the UI lists them by label. Values are `TrainConfig` fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named group of settings, labelled with the GPU memory it is meant to fit."""

    key: str
    label: str  # shown to users, e.g. "SDXL low-VRAM — 8 GB"
    vram_gb: int
    settings: dict[str, Any]
    note: str = ""


_FLUX = {"resolution": 1024, "batch_size": 1, "rank": 16, "alpha": 16.0, "learning_rate": 1e-4,
         "train_text_encoder": False, "mixed_precision": "bf16", "gradient_checkpointing": True, "fp8_base": True,
         "lr_scheduler": "constant", "sample_cfg_scale": 3.5, "sample_steps": 20}

PRESETS: dict[str, Preset] = {p.key: p for p in (
    Preset("sd15", "SD1.5 — 6 GB", 6, {
        "resolution": 512, "batch_size": 2, "rank": 16, "alpha": 8.0, "learning_rate": 1e-4, "text_encoder_lr": 5e-5,
        "train_text_encoder": True, "mixed_precision": "bf16", "gradient_checkpointing": False,
        "optimizer": "AdamW", "lr_scheduler": "cosine"},
        "UNet + text encoder LoRA, batch 2 at 512 px."),
    Preset("sd15-lowvram", "SD1.5 low-VRAM — 4 GB", 4, {
        "resolution": 512, "batch_size": 1, "rank": 16, "alpha": 8.0, "learning_rate": 1e-4,
        "train_text_encoder": False, "mixed_precision": "bf16", "gradient_checkpointing": True,
        "optimizer": "AdamW", "lr_scheduler": "cosine"},
        "UNet-only LoRA, gradient checkpointing, cached text-encoder outputs."),
    Preset("sdxl", "SDXL — 12 GB", 12, {
        "resolution": 1024, "batch_size": 1, "rank": 16, "alpha": 8.0, "learning_rate": 1e-4,
        "train_text_encoder": False, "mixed_precision": "bf16", "gradient_checkpointing": True,
        "optimizer": "AdamW", "lr_scheduler": "cosine"},
        "UNet-only LoRA at 1024 px with gradient checkpointing."),
    Preset("sdxl-lowvram", "SDXL low-VRAM — 8 GB", 8, {
        "resolution": 1024, "batch_size": 1, "rank": 8, "alpha": 4.0, "learning_rate": 1e-4,
        "train_text_encoder": False, "mixed_precision": "bf16", "gradient_checkpointing": True, "fp8_base": True,
        "optimizer": "AdamW", "lr_scheduler": "cosine"},
        "Rank 8 UNet-only LoRA, fp8 base weights; VAE and text encoders leave the GPU after caching."),
    # Flux.1: kohya's recommended flow settings (TrainConfig defaults), transformer-only rank-16 LoRA at 1024 px,
    # fp8 base weights (and fp8 T5 while caching), cached latents and T5/CLIP outputs. Memory per card from
    # block swap (blocks kept in CPU memory), the 8-bit AdamW and offloaded checkpoints; measured in
    # bench/results/flux_vs_kohya_h100_all15.md (24/12/8 GB, H100) and flux_vs_kohya_h200_keep.md (16 GB).
    Preset("flux-24gb", "Flux.1 — 24 GB", 24, {**_FLUX, "optimizer": "AdamW"},
           "fp8 base weights, no block swap, fused AdamW."),
    Preset("flux-16gb", "Flux.1 — 16 GB", 16, {**_FLUX, "optimizer": "AdamW", "blocks_to_swap": 8},
           "fp8 base weights, 4 double + 8 single blocks streamed from CPU memory."),
    Preset("flux-12gb", "Flux.1 — 12 GB", 12, {**_FLUX, "optimizer": "AdamW8bit", "blocks_to_swap": 20},
           "fp8 base weights, 10 double + 20 single blocks streamed from CPU memory, 8-bit AdamW."),
    Preset("flux-8gb", "Flux.1 — 8 GB", 8, {**_FLUX, "optimizer": "AdamW8bit", "blocks_to_swap": 30,
                                             "cpu_offload_checkpointing": True},
           "fp8 base weights, 15 double + 30 single blocks streamed from CPU memory, 8-bit AdamW, "
           "checkpointed activations in CPU memory."),
)}
