"""Full-size SD1.x/SD2.x/SDXL models with random weights, and what a WebUI did with its model
before anyone pressed Train, for the hand-off and first-step benchmarks.

Shared by the scripts in bench/ (run as `python bench/<script>.py`, so this folder is on sys.path).
Models are built on the meta device, then materialised on the CPU: no checkpoint, no Hub.
"""

from __future__ import annotations

import time

import torch

from lora_trainer.models.bundle import Family, ModelBundle


def full_size_random_bundle(family: str) -> ModelBundle:
    """The bundled config's UNet, VAE and text encoders at full size, weights ~ N(0, 0.02), on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.models.ldm_config import ModelConfig

    cfg = ModelConfig.bundled(Family(family))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.unet)
        vae = AutoencoderKL(**cfg.vae)
    tes = []
    for i, spec in enumerate(cfg.text_encoders):
        tcfg = CLIPTextConfig(**{k: v for k, v in spec.config.items() if k not in ("architectures", "model_type")})
        cls = CLIPTextModelWithProjection if family == "sdxl" and i == 1 else CLIPTextModel
        with torch.device("meta"):
            tes.append(cls(tcfg))
    for m in (unet, vae, *tes):
        m.to_empty(device="cpu")
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.02)
        # to_empty leaves buffers uninitialised: CLIP's position ids must be 0..n-1 to run.
        for name, b in m.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand(b.shape))
    return ModelBundle(Family(family), cfg.prediction_type, unet, vae, tes, [], cfg.schedule, cfg.scaling_factor)


def host_generation(unet: torch.nn.Module, vae: torch.nn.Module | None = None, size: int = 512) -> float:
    """One txt2img's worth of work on the GPU (CFG batch 2, 20 UNet steps, a VAE decode), so CUDA's
    inference kernels are loaded as in a WebUI that has generated; returns the seconds it took."""
    t0 = time.perf_counter()
    p = next(unet.parameters())
    dev, dtype = p.device, p.dtype
    with torch.no_grad():
        lat = torch.randn(2, 4, size // 8, size // 8, device=dev, dtype=dtype)
        ctx = torch.randn(2, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
        extra = None
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size ids
            pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
            extra = {"text_embeds": torch.randn(2, pooled, device=dev, dtype=dtype),
                     "time_ids": torch.randn(2, 6, device=dev, dtype=dtype)}
        for i in range(20):
            unet(lat, 999 - 50 * i, encoder_hidden_states=ctx, added_cond_kwargs=extra)
        if vae is not None:
            vae.to(dev).decode(lat[:1].to(next(vae.parameters()).dtype))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return round(time.perf_counter() - t0, 2)
