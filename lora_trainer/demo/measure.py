"""Measure what a model draws: batched sampling plus the shape classifier.

`generate_batch` samples exactly as `train.sampling.generate` does (same scheduler, same prompt
encoding, image i from CPU seed `seed + i`), but many prompts per call, and returns tensors.
"""

from __future__ import annotations

import torch

from ..models.bundle import ModelBundle


@torch.no_grad()
def generate_batch(bundle: ModelBundle, prompts: list[str], *, seed: int = 1234, steps: int = 20,
                   cfg_scale: float = 5.0, size: int = 64, negative_prompt: str = "",
                   chunk: int = 64) -> torch.Tensor:
    """(N, 3, size, size) float pictures in [0, 1], on the UNet's device."""
    from ..train.sampling import build_pipeline
    from ..train.text import encode_captions

    pipe = build_pipeline(bundle)
    pipe.set_progress_bar_config(disable=True)
    device = next(bundle.unet.parameters()).device
    out = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        hidden, _ = encode_captions(bundle, part, device=device)
        negative, _ = encode_captions(bundle, [negative_prompt] * len(part), device=device)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(part))]
        latents = torch.stack([torch.randn(4, size // _vae_factor(bundle), size // _vae_factor(bundle),
                                           generator=gen) for gen in generators]).to(device)
        images = pipe(prompt_embeds=hidden, negative_prompt_embeds=negative, num_inference_steps=steps,
                      guidance_scale=cfg_scale, width=size, height=size, latents=latents,
                      output_type="pt").images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)


def _vae_factor(bundle: ModelBundle) -> int:
    return 2 ** (len(bundle.vae.config.block_out_channels) - 1)


def star_share(bundle: ModelBundle, classifier, lora=None, *, n: int = 16, steps: int = 12, seed: int = 7,
               trigger: str = "demostar") -> float:
    """Share of `n` pictures prompted "<colour> <trigger>, <colour> background" that `classifier`
    reads as the held-out shape; with `lora` (a kohya file), that LoRA is loaded for the pictures."""
    from ..lora import applied_lora
    from .world import HELD_OUT, sample_scenes

    prompts = sample_scenes(n, torch.Generator().manual_seed(seed), shapes=(HELD_OUT,)).captions(shape_word=trigger)
    with applied_lora(bundle, lora):
        return classifier.fraction(generate_batch(bundle, prompts, seed=seed, steps=steps), HELD_OUT)
