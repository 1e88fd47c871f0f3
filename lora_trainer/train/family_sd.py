"""SD1.x, SD2.x and SDXL as training families: CLIP conditioning, DDPM epsilon/v objective, SD pipelines.

The math is the model's own diffusers DDPMScheduler (`train/noise.py`), as kohya's train_network.py
and sdxl_train_network.py compute it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from . import noise as noise_math
from .family import Batch, StepInputs, TrainFamily, register
from .text import encode_captions, encode_ids, sdxl_time_ids, tokenize


class DiffusionObjective:
    """DDPM noise prediction (epsilon or v) with kohya's noise offset, multires noise and min-SNR-γ."""

    def __init__(self, scheduler: Any, config: Any, device: torch.device):
        self.scheduler = scheduler
        self.config = config
        num = scheduler.config.num_train_timesteps
        self.min_t = config.min_timestep
        self.max_t = config.max_timestep or num
        if self.max_t > num:
            raise ConfigError(f"max_timestep {self.max_t} is beyond the model's {num} timesteps; lower it or "
                              "leave it at 0 (= all).")
        self.device = device
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)  # once, not per step

    def draw(self, latents: torch.Tensor) -> Batch:
        c = self.config
        out = {"noise": noise_math.make_noise(latents, noise_offset=c.noise_offset,
                                              multires_iterations=c.multires_noise_iterations,
                                              multires_discount=c.multires_noise_discount)}
        timesteps = noise_math.sample_timesteps(latents.shape[0], self.min_t, self.max_t, self.device)
        out["timesteps"] = timesteps
        if c.min_snr_gamma:
            out["weights"] = noise_math.min_snr_weight(self.scheduler, timesteps, c.min_snr_gamma)
        return out


class SDFamily(TrainFamily):
    """SD1.x / SD2.x: one CLIP text encoder, a UNet2DConditionModel."""

    key = "sd1"
    cond_keys: tuple[str, ...] = ("hidden",)

    def encode_text(self, bundle: Any, captions: list[str], *, clip_skip: int = 1) -> Batch:
        hidden, pooled = encode_captions(bundle, captions, clip_skip=clip_skip)
        return self._cond(hidden, pooled)

    def _cond(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> Batch:
        return {"hidden": hidden}

    def tokenize(self, bundle: Any, captions: list[str]) -> Batch:
        return {f"input_ids_{i}": tokenize(tok, captions) for i, tok in enumerate(bundle.tokenizers)}

    def encode_tokens(self, bundle: Any, tokens: Batch, *, clip_skip: int = 1) -> Batch:
        hidden, pooled = encode_ids(bundle, [tokens[f"input_ids_{i}"] for i in range(len(bundle.tokenizers))],
                                    clip_skip=clip_skip)
        return self._cond(hidden, pooled)

    def make_objective(self, bundle: Any, config: Any, device: torch.device) -> DiffusionObjective:
        return DiffusionObjective(bundle.noise_scheduler(), config, device)

    def _unet_kwargs(self, inputs: StepInputs) -> dict[str, Any]:
        return {}

    def prediction_and_target(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        b, scheduler, dtype = inputs.batch, inputs.objective.scheduler, inputs.model_dtype
        noisy = scheduler.add_noise(b["latents"], b["noise"], b["timesteps"])
        pred = inputs.bundle.unet(noisy.to(dtype), b["timesteps"], inputs.cond["hidden"].to(dtype),
                                  **self._unet_kwargs(inputs)).sample
        return pred, noise_math.target_for(scheduler, b["latents"], b["noise"], b["timesteps"])

    def generate(self, bundle: Any, prompts: list[str], **kwargs: Any) -> list:
        from .sampling import generate

        return generate(bundle, prompts, **kwargs)


class SDXLFamily(SDFamily):
    """SDXL: two CLIP encoders (penultimate states + pooled projection) and size/crop `time_ids`."""

    key = "sdxl"
    cond_keys = ("hidden", "pooled")

    def _cond(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> Batch:
        return {"hidden": hidden, "pooled": pooled}

    def batch_extras(self, bundle: Any, items: Sequence[Any], flips: Sequence[bool]) -> Batch:
        time_ids = []
        for item, flip in zip(items, flips):
            top, left = item.choice.crop_top_left
            if flip:  # the crop seen from the mirrored side
                left = item.choice.resized[0] - item.choice.bucket[0] - left
            time_ids.append(sdxl_time_ids((item.size[1], item.size[0]), (top, left),
                                          (item.bucket[1], item.bucket[0])))
        return {"time_ids": torch.stack(time_ids)}

    def _unet_kwargs(self, inputs: StepInputs) -> dict[str, Any]:
        return {"added_cond_kwargs": {"text_embeds": inputs.cond["pooled"], "time_ids": inputs.batch["time_ids"]}}

    def vae_dtype(self, bundle: Any, dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16 (kohya's --no_half_vae); bf16 has fp32's range.
        return torch.float32 if dtype == torch.float16 else dtype


register("sd1", SDFamily)
register("sd2", SDFamily)
register("sdxl", SDXLFamily)
