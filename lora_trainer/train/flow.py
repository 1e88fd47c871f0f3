"""Rectified flow (flow matching), as kohya sd-scripts trains Flux.1 (`flux_train_utils.py`).

A training sample at noise level σ ∈ [0, 1] is x_σ = (1 - σ)·x₀ + σ·ε; the model predicts the velocity
ε - x₀ (the target), given σ as its timestep (kohya passes `timesteps / 1000` = σ). How σ is drawn
(`timestep_sampling`) and how the prediction is read (`model_prediction_type`) follow kohya's options:

- `sigma`: SD3-style, a timestep index from `weighting_scheme`'s density over the shifted
  FlowMatchEulerDiscreteScheduler grid (shift = `discrete_flow_shift`);
- `uniform`: σ ~ U(0, 1);  `sigmoid`: σ = sigmoid(s·n), n ~ N(0, 1), s = `sigmoid_scale`;
- `shift`: sigmoid(s·n) shifted by `discrete_flow_shift` (σ' = shift·σ / (1 + (shift - 1)·σ));
- `flux_shift`: sigmoid(s·n) shifted by the resolution-dependent μ of Flux.1's own sampler.
- `raw`: loss on the prediction as is (recommended); `additive`: prediction + x_σ;
  `sigma_scaled`: -σ·prediction + x_σ with the SD3 loss weighting (`sigma_sqrt`, `cosmap`).

The defaults (`shift`, 3.1582, `raw`, guidance 1.0) are kohya's recommended Flux.1 settings
(docs/flux_train_network.md). Every draw uses torch's global generator on the training device, in a
fixed order, so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------------- shifts
def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The discrete flow shift of SD3/Flux schedulers: shift·σ / (1 + (shift - 1)·σ)."""
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """Flux.1's resolution-dependent shift: e^μ / (e^μ + (1/t - 1)^σ)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    """The straight line through (x1, y1) and (x2, y2): μ from the packed image sequence length."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def scheduler_sigmas(shift: float, num: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """σ of FlowMatchEulerDiscreteScheduler(num_train_timesteps=num, shift=shift) before set_timesteps,
    from high noise to low (its `timesteps` are these × num)."""
    timesteps = torch.linspace(1, num, num, dtype=torch.float32).flip(0)
    return shift_sigmas(timesteps / num, shift)


# ---------------------------------------------------------------------------------- draws
def density_for_timestep_sampling(scheme: str, batch: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                                  mode_scale: float = 1.29) -> torch.Tensor:
    """u ∈ [0, 1) per sample (CPU), SD3's density for `scheme` (diffusers/kohya
    `compute_density_for_timestep_sampling`)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(batch,), device="cpu"))
    u = torch.rand(size=(batch,), device="cpu")
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def sample_sigmas(batch: int, latent_hw: tuple[int, int], device: torch.device, *, method: str = "shift",
                  sigmoid_scale: float = 1.0, shift: float = 3.1582, weighting_scheme: str = "none",
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """σ per sample (float32, on `device`) as kohya's `get_noisy_model_input_and_timesteps` draws it.
    `latent_hw` is the latent's (unpacked) height and width (for `flux_shift`)."""
    if method in ("uniform", "sigmoid"):
        if method == "sigmoid":
            return torch.sigmoid(sigmoid_scale * torch.randn((batch,), device=device))
        return torch.rand((batch,), device=device)
    if method == "shift":
        sigmas = (torch.randn(batch, device=device) * sigmoid_scale).sigmoid()
        return shift_sigmas(sigmas, shift)
    if method == "flux_shift":
        sigmas = (torch.randn(batch, device=device) * sigmoid_scale).sigmoid()
        h, w = latent_hw
        mu = lin_function(y1=0.5, y2=1.15)((h // 2) * (w // 2))
        return time_shift(mu, 1.0, sigmas)
    if method == "sigma":
        u = density_for_timestep_sampling(weighting_scheme, batch, logit_mean=logit_mean, logit_std=logit_std,
                                          mode_scale=mode_scale)
        indices = (u * NUM_TRAIN_TIMESTEPS).long()
        return scheduler_sigmas(shift)[indices].to(device)
    raise ValueError(f"unknown timestep_sampling {method!r}")


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 - σ)·x₀ + σ·ε, σ broadcast over the sample's dimensions."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: ε - x₀."""
    return noise - latents


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's per-sample loss weight for `sigma_scaled` predictions (ones for other schemes)."""
    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas ** 2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas)


def apply_prediction_type(kind: str, pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor,
                          weighting_scheme: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction the loss compares with the target, per-sample weight or None), kohya's
    `apply_model_prediction_type`."""
    if kind == "raw":
        return pred, None
    if kind == "additive":
        return pred + noisy, None
    if kind == "sigma_scaled":
        s = sigmas.view(-1, *([1] * (pred.dim() - 1)))
        return pred * (-s) + noisy, loss_weighting(weighting_scheme, sigmas)
    raise ValueError(f"unknown model_prediction_type {kind!r}")


# ---------------------------------------------------------------------------------- sampling schedule
def sampling_schedule(num_steps: int, image_seq_len: int, *, base_shift: float = 0.5, max_shift: float = 1.15,
                      shift: bool = True) -> list[float]:
    """σ from 1 to 0 in `num_steps` Euler steps (+ the final 0), shifted for the resolution as
    Flux.1 dev samples (schnell: `shift=False`)."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()
