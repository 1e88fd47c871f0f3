"""Rectified-flow math (train/flow.py) against diffusers' flow-matching code and kohya's formulas.

The opt-in test at the end runs kohya sd-scripts' own `get_noisy_model_input_and_timesteps` in a
separate Python (sd-scripts is never part of this repository): set LORA_TRAINER_SD_SCRIPTS to a
checkout and LORA_TRAINER_SD_SCRIPTS_PYTHON to an interpreter that imports it (torch, torchvision,
accelerate, transformers, diffusers, toml, voluptuous, imagesize).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lora_trainer.train import flow


def _fm_scheduler(**kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)


@pytest.mark.parametrize("shift", [1.0, 3.0, 3.1582])
def test_scheduler_sigmas_are_diffusers_flow_match_grid(shift):
    sched = _fm_scheduler(shift=shift)
    ours = flow.scheduler_sigmas(shift)
    torch.testing.assert_close(ours, sched.sigmas[:1000].float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours * 1000, sched.timesteps[:1000].float(), rtol=1e-5, atol=1e-4)


def test_shift_sampling_is_shifted_sigmoid_of_normal():
    # kohya's "shift": sigmoid(scale * N(0, 1)), then shift * s / (1 + (shift - 1) * s)
    torch.manual_seed(3)
    ours = flow.sample_sigmas(4096, (128, 128), torch.device("cpu"), method="shift", sigmoid_scale=1.5, shift=3.1582)
    torch.manual_seed(3)
    s = torch.sigmoid(torch.randn(4096) * 1.5)
    torch.testing.assert_close(ours, 3.1582 * s / (1 + 2.1582 * s))
    assert 0 < ours.min() and ours.max() < 1 and ours.mean() > 0.6  # shifted towards noise


def test_uniform_and_sigmoid_sampling():
    torch.manual_seed(0)
    u = flow.sample_sigmas(8, (64, 64), torch.device("cpu"), method="uniform")
    torch.manual_seed(0)
    torch.testing.assert_close(u, torch.rand(8))
    torch.manual_seed(0)
    s = flow.sample_sigmas(8, (64, 64), torch.device("cpu"), method="sigmoid", sigmoid_scale=2.0)
    torch.manual_seed(0)
    torch.testing.assert_close(s, torch.sigmoid(2.0 * torch.randn(8)))


def test_flux_shift_uses_the_pipelines_resolution_shift():
    pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for h, w in ((128, 128), (64, 96), (32, 32)):
        seq = (h // 2) * (w // 2)
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        assert flow.lin_function(y1=0.5, y2=1.15)(seq) == pytest.approx(mu)
        torch.manual_seed(5)
        ours = flow.sample_sigmas(16, (h, w), torch.device("cpu"), method="flux_shift")
        torch.manual_seed(5)
        t = torch.sigmoid(torch.randn(16))
        torch.testing.assert_close(ours, math.exp(mu) / (math.exp(mu) + (1 / t - 1)))


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_sigma_sampling_density_matches_diffusers(scheme):
    training_utils = pytest.importorskip("diffusers.training_utils")
    if not hasattr(training_utils, "compute_density_for_timestep_sampling"):
        pytest.skip("this diffusers has no SD3 timestep density")
    torch.manual_seed(11)
    ours = flow.density_for_timestep_sampling(scheme, 64, logit_mean=0.1, logit_std=1.2, mode_scale=1.29)
    torch.manual_seed(11)
    ref = training_utils.compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.1, logit_std=1.2,
                                                               mode_scale=1.29)
    torch.testing.assert_close(ours, ref)
    # "sigma": the scheduler's sigma at index floor(u * 1000)
    torch.manual_seed(11)
    sig = flow.sample_sigmas(64, (64, 64), torch.device("cpu"), method="sigma", shift=3.0, weighting_scheme=scheme,
                             logit_mean=0.1, logit_std=1.2)
    sched = _fm_scheduler(shift=3.0)
    torch.testing.assert_close(sig, sched.sigmas[(ref * 1000).long()].float())


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(scheme):
    training_utils = pytest.importorskip("diffusers.training_utils")
    if not hasattr(training_utils, "compute_loss_weighting_for_sd3"):
        pytest.skip("this diffusers has no SD3 loss weighting")
    sigmas = torch.linspace(0.05, 0.95, 7)
    torch.testing.assert_close(flow.loss_weighting(scheme, sigmas),
                               training_utils.compute_loss_weighting_for_sd3(scheme, sigmas).float())


def test_noisy_input_target_and_prediction_types():
    x0, eps = torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8)
    sig = torch.tensor([0.0, 0.5, 1.0])
    xs = flow.noisy_input(x0, eps, sig)
    torch.testing.assert_close(xs[0], x0[0])
    torch.testing.assert_close(xs[2], eps[2])
    torch.testing.assert_close(xs[1], 0.5 * (x0[1] + eps[1]))
    # the target is the velocity d x_sigma / d sigma
    d = 1e-3
    vel = (flow.noisy_input(x0, eps, sig.clamp(max=1 - d) + d) - flow.noisy_input(x0, eps, sig.clamp(max=1 - d))) / d
    torch.testing.assert_close(vel, flow.flow_target(x0, eps), rtol=1e-2, atol=1e-2)
    pred = torch.randn_like(x0)
    raw, w = flow.apply_prediction_type("raw", pred, xs, sig)
    assert raw is pred and w is None
    add, _ = flow.apply_prediction_type("additive", pred, xs, sig)
    torch.testing.assert_close(add, pred + xs)
    scaled, w = flow.apply_prediction_type("sigma_scaled", pred, xs, sig, "none")
    torch.testing.assert_close(scaled, -sig.view(-1, 1, 1, 1) * pred + xs)
    torch.testing.assert_close(w, torch.ones(3))


@pytest.mark.parametrize("steps, seq", [(4, 1024), (20, 4096), (28, 256)])
def test_sampling_schedule_matches_flux_pipeline(steps, seq):
    pytest.importorskip("diffusers.pipelines.flux.pipeline_flux")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ours = flow.sampling_schedule(steps, seq)
    assert len(ours) == steps + 1 and ours[0] == pytest.approx(1.0) and ours[-1] == 0.0
    sched = _fm_scheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)
    import numpy as np

    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq, 256, 4096, 0.5, 1.15))
    torch.testing.assert_close(torch.tensor(ours[:-1]), sched.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    assert flow.sampling_schedule(4, seq, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


_KOHYA = textwrap.dedent("""
    import json, sys, argparse, torch
    sys.path.insert(0, sys.argv[1])
    from library import flux_train_utils, sd3_train_utils
    out = {}
    latents = torch.linspace(-1, 1, 2 * 16 * 8 * 8).reshape(2, 16, 8, 8)
    noise = torch.linspace(1, -0.5, 2 * 16 * 8 * 8).reshape(2, 16, 8, 8)
    for method in ("sigma", "uniform", "sigmoid", "shift", "flux_shift"):
        args = argparse.Namespace(timestep_sampling=method, sigmoid_scale=1.3, discrete_flow_shift=3.1582,
                                  weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                  ip_noise_gamma=None, ip_noise_gamma_random_strength=False)
        sched = sd3_train_utils.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.1582)
        torch.manual_seed(21)
        noisy, t, sig = flux_train_utils.get_noisy_model_input_and_timesteps(
            args, sched, latents, noise, torch.device("cpu"), torch.float32)
        out[method] = {"noisy": noisy.flatten().tolist(), "t": t.tolist(), "sigmas": sig.flatten().tolist()}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.environ.get("LORA_TRAINER_SD_SCRIPTS"), reason="set LORA_TRAINER_SD_SCRIPTS (and "
                    "LORA_TRAINER_SD_SCRIPTS_PYTHON) to compare with kohya sd-scripts' own functions")
def test_kohya_noisy_input_and_timesteps_are_ours():
    python = os.environ.get("LORA_TRAINER_SD_SCRIPTS_PYTHON", sys.executable)
    proc = subprocess.run([python, "-c", _KOHYA, os.environ["LORA_TRAINER_SD_SCRIPTS"]], check=False,
                          capture_output=True,
                          text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kohya = json.loads(proc.stdout.strip().splitlines()[-1])
    latents = torch.linspace(-1, 1, 2 * 16 * 8 * 8).reshape(2, 16, 8, 8)
    noise = torch.linspace(1, -0.5, 2 * 16 * 8 * 8).reshape(2, 16, 8, 8)
    for method, ref in kohya.items():
        torch.manual_seed(21)
        sig = flow.sample_sigmas(2, (8, 8), torch.device("cpu"), method=method, sigmoid_scale=1.3, shift=3.1582,
                                 weighting_scheme="logit_normal")
        torch.testing.assert_close(sig, torch.tensor(ref["sigmas"]), msg=method)
        torch.testing.assert_close(sig * 1000, torch.tensor(ref["t"]), msg=method)
        torch.testing.assert_close(flow.noisy_input(latents, noise, sig).flatten(), torch.tensor(ref["noisy"]),
                                   msg=method)
