"""Full-size SD1.x/SD2.x/SDXL models with random weights, for the WebUI hand-off benchmarks.

Shared by forge_handoff.py and webui_handoff.py (run as `python bench/<script>.py`, so this folder
is on sys.path). Built on the meta device, then materialised on the CPU: no checkpoint, no Hub.
"""

from __future__ import annotations

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
