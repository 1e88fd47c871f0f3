"""Noise, timestep and loss formulas (kohya sd-scripts' definitions) against hand computations."""

from __future__ import annotations

import random

import pytest
import torch
from diffusers import DDPMScheduler

from lora_trainer.train import noise as nm


def _scheduler(prediction: str) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction, clip_sample=False)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights(prediction):
    s = _scheduler(prediction)
    t = torch.tensor([0, 100, 500, 999])
    ac = s.alphas_cumprod[t]
    snr = ac / (1 - ac)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction == "v_prediction" else snr)
    torch.testing.assert_close(nm.min_snr_weight(s, t, 5.0), expected)
    # low timesteps (high SNR) are down-weighted, high ones keep weight <= 1
    w = nm.min_snr_weight(s, t, 5.0)
    assert w[0] < w[-1] <= 1.0 + 1e-6


def test_huber_and_l2_per_sample():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 3
    l2 = nm.per_sample_loss(pred, target, "l2")
    torch.testing.assert_close(l2, torch.tensor([1.0, 9.0]))
    c = 0.1
    hub = nm.per_sample_loss(pred, target, "huber", huber_c=c)
    expected = torch.tensor([2 * c * ((1 + c * c) ** 0.5 - c), 2 * c * ((9 + c * c) ** 0.5 - c)])
    torch.testing.assert_close(hub, expected)


def test_noise_offset_and_multires_noise():
    torch.manual_seed(0)
    latents = torch.zeros(2, 4, 32, 32)
    plain = nm.make_noise(latents)
    assert plain.shape == latents.shape
    torch.manual_seed(0)
    offset = nm.make_noise(latents, noise_offset=0.1)
    per_channel_shift = (offset - plain).mean(dim=(2, 3))
    # the offset is constant over each (sample, channel) image: one value per channel
    torch.testing.assert_close(offset - plain, per_channel_shift[..., None, None].expand_as(plain))
    random.seed(0)
    pyramid = nm.make_noise(latents, multires_iterations=6, multires_discount=0.3)
    assert abs(float(pyramid.std()) - 1.0) < 1e-4  # kohya normalises pyramid noise to unit std


def test_targets_follow_the_scheduler():
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 400, 999])
    assert torch.equal(nm.target_for(_scheduler("epsilon"), x0, noise, t), noise)
    v = _scheduler("v_prediction")
    ac = v.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(nm.target_for(v, x0, noise, t), ac.sqrt() * noise - (1 - ac).sqrt() * x0)
