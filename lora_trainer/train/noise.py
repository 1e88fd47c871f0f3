"""The diffusion objective: noise (offset, multires), timesteps, targets, loss and weighting.

Targets and noising come from the model's own diffusers DDPMScheduler (`add_noise`,
`get_velocity`), so epsilon and v-prediction follow the schedule the checkpoint was trained with.
Formulas for noise offset, multires (pyramid) noise, min-SNR-γ and huber follow kohya sd-scripts.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F


def make_noise(latents: torch.Tensor, *, noise_offset: float = 0.0, multires_iterations: int = 0,
               multires_discount: float = 0.3) -> torch.Tensor:
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    if multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Add upsampled low-resolution noise at random scales (kohya's pyramid_noise_like)."""
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    for i in range(iterations):
        r = random.random() * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        noise = noise + up(torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)) * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_timesteps(batch: int, low: int, high: int, device: torch.device) -> torch.Tensor:
    return torch.randint(low, high, (batch,), device=device).long()


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind}")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float = 0.1) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        loss = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    else:
        raise ValueError(loss_type)
    return loss.mean(dim=list(range(1, loss.dim())))


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weight(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, γ)/SNR for epsilon; min(SNR, γ)/(SNR + 1) for v-prediction (kohya's apply_snr_weight)."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped / s
