"""Flux.1 sample images from the modules being trained: Euler steps of the rectified flow, as BFL's and
kohya's samplers (`flux_train_utils.denoise`) run them.

The prompt is encoded as in training (`FluxFamily.encode_text`); the starting noise is drawn on a CPU
generator (seed + image index), so a picture is the same on any device; the schedule is Flux.1's
(`flow.sampling_schedule`: shifted for the resolution for dev, plain for schnell); dev gets the
distilled guidance (`guidance`, 3.5 in BFL's examples), schnell ignores it. Chroma has no distilled guidance
and samples with classifier-free guidance instead (`cfg_scale` with a negative prompt, as kohya's sampler and
diffusers' ChromaPipeline).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from typing import Any

import torch

from . import flow


@torch.no_grad()
def generate(bundle: Any, family: Any, prompts: list[str], *, seed: int = 1234, steps: int = 20,
             guidance: float = 3.5, width: int = 1024, height: int = 1024, cfg_scale: float = 1.0,
             negative_prompt: str = "", on_step: Callable[[int, int], None] | None = None) -> list:
    """One PIL image per prompt. The transformer, text encoders and VAE may sit on different devices (the
    transformer's decides where the denoising runs)."""
    from ..models.flux.model import unpack_latents

    channels = int(getattr(bundle.vae.config, "latent_channels", 16))
    h, w = 2 * (height // 16), 2 * (width // 16)  # latent size, even for the 2x2 packing
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        noise = torch.randn((1, channels, h, w), generator=generator, dtype=torch.float32)
        step = None if on_step is None else (lambda n, i=i: on_step(i + 1, n))
        packed = denoise(bundle, family, prompt, noise, steps=steps, guidance=guidance, cfg_scale=cfg_scale,
                         negative_prompt=negative_prompt, on_step=step)
        images.append(decode(bundle, unpack_latents(packed.float(), h, w)))
    return images


@torch.no_grad()
def denoise(bundle: Any, family: Any, prompt: str, noise: torch.Tensor, *, steps: int = 20, guidance: float = 3.5,
            cfg_scale: float = 1.0, negative_prompt: str = "",
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Euler steps from `noise` (1, C, h, w) to packed latents (1, h/2 * w/2, 4C) for one prompt. Runs under
    autocast when the transformer computes in half precision. `cfg_scale` != 1: classifier-free guidance
    against `negative_prompt` (prediction = negative + cfg_scale * (positive - negative))."""
    from ..models.flux.model import image_ids, pack_latents

    model = bundle.unet
    device = next(model.parameters()).device
    dtype = _compute_dtype(model)
    autocast = (torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                else contextlib.nullcontext())
    _, _, h, w = noise.shape
    schedule = flow.sampling_schedule(steps, (h // 2) * (w // 2), shift=bundle.variant != "schnell")
    cfg = float(cfg_scale) != 1.0
    with autocast:
        text = family.text_inputs(family.encode_text(bundle, [prompt]), 1, device, dtype)
        negative = family.text_inputs(family.encode_text(bundle, [negative_prompt]), 1, device, dtype) if cfg else None
    img = pack_latents(noise.to(device, dtype))
    img_ids = image_ids(1, h, w, device=device)
    g = torch.full((1,), float(guidance), device=device, dtype=dtype)
    for n, (t_curr, t_prev) in enumerate(itertools.pairwise(schedule), 1):
        t = torch.full((1,), t_curr, device=device, dtype=dtype)
        with autocast:
            pred = model(img=img, img_ids=img_ids, timesteps=t, guidance=g, **text)
            if negative is not None:
                uncond = model(img=img, img_ids=img_ids, timesteps=t, guidance=g, **negative)
                pred = uncond + float(cfg_scale) * (pred - uncond)
        img = img + (t_prev - t_curr) * pred.to(img.dtype)
        if on_step is not None:
            on_step(n)
    return img


def decode(bundle: Any, latents: torch.Tensor):
    """Latents (scaled and shifted as in training) -> a PIL image, through the VAE."""
    from PIL import Image

    vae = bundle.vae
    p = next(vae.parameters())
    z = latents / bundle.scaling_factor + float(getattr(bundle, "shift_factor", 0.0) or 0.0)
    pixels = vae.decode(z.to(p.device, p.dtype)).sample[0].float()
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype in (torch.float32, torch.float16, torch.bfloat16) and not p.requires_grad:
            return p.dtype
    return torch.float32
