"""Sample images from the modules being trained, with a diffusers pipeline built in memory (no Hub).

Used for the periodic samples, the demo's with/without-LoRA pair, and anyone who needs a quick
image from a ModelBundle.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.bundle import ModelBundle


def sampler_for(bundle: ModelBundle):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**bundle.schedule.scheduler_config(), prediction_type=bundle.prediction_type,
                                  timestep_spacing="leading", steps_offset=1)


def build_pipeline(bundle: ModelBundle):
    if bundle.is_sdxl:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=bundle.vae, text_encoder=bundle.text_encoders[0], text_encoder_2=bundle.text_encoders[1],
            tokenizer=bundle.tokenizers[0], tokenizer_2=bundle.tokenizers[1], unet=bundle.unet,
            scheduler=sampler_for(bundle))
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0], unet=bundle.unet,
        scheduler=sampler_for(bundle), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


@torch.no_grad()
def generate(bundle: ModelBundle, prompts: list[str], *, seed: int = 1234, steps: int = 20, cfg_scale: float = 7.0,
             width: int = 512, height: int = 512, negative_prompt: str = "", clip_skip: int = 1,
             on_step: Callable[[int, int], None] | None = None) -> list:
    """One PIL image per prompt; image i uses seed + i on a CPU generator (same picture on any device).
    `on_step(image, step)` (both 1-based) is called after each denoising step, for progress displays.

    Prompts are encoded exactly as in training (`text.encode_captions`, clip skip included) and
    handed to the pipeline as embeddings. The bundle's modules must sit on one device. Runs under
    autocast when the UNet is half precision.
    """
    from .text import encode_captions

    pipe = build_pipeline(bundle)
    pipe.set_progress_bar_config(disable=True)
    device = next(bundle.unet.parameters()).device
    dtype = next(bundle.unet.parameters()).dtype
    autocast = (torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32
                else contextlib.nullcontext())
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        with autocast:
            hidden, pooled = encode_captions(bundle, [prompt], clip_skip=clip_skip, device=device)
            kwargs = {"prompt_embeds": hidden.to(dtype)}
            if bundle.is_sdxl and not negative_prompt:
                # SDXL's pipelines use zero embeddings for an empty negative prompt.
                kwargs["negative_prompt_embeds"] = torch.zeros_like(kwargs["prompt_embeds"])
                kwargs["negative_pooled_prompt_embeds"] = torch.zeros_like(pooled.to(dtype))
            else:
                neg_hidden, neg_pooled = encode_captions(bundle, [negative_prompt], clip_skip=clip_skip,
                                                         device=device)
                kwargs["negative_prompt_embeds"] = neg_hidden.to(dtype)
                if bundle.is_sdxl:
                    kwargs["negative_pooled_prompt_embeds"] = neg_pooled.to(dtype)
            if bundle.is_sdxl:
                kwargs["pooled_prompt_embeds"] = pooled.to(dtype)
            if on_step is not None:
                kwargs["callback_on_step_end"] = _step_callback(on_step, i + 1)
            out = pipe(num_inference_steps=steps, guidance_scale=cfg_scale, width=width, height=height,
                       generator=generator, **kwargs)
        images.append(out.images[0])
    return images


def _step_callback(on_step: Callable[[int, int], None], image: int):
    def callback(pipe, index, timestep, tensors):  # diffusers' callback_on_step_end (>= 0.22)
        on_step(image, index + 1)
        return tensors
    return callback


def save_png(image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def side_by_side(left, right, labels: tuple[str, str] = ("without LoRA", "with LoRA")):
    """An A/B image: two pictures next to each other with a caption strip."""
    from PIL import Image, ImageDraw

    w, h = left.width + right.width, max(left.height, right.height)
    strip = 14
    canvas = Image.new("RGB", (w, h + strip), "white")
    canvas.paste(left, (0, strip))
    canvas.paste(right, (left.width, strip))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), labels[0], fill="black")
    draw.text((left.width + 2, 1), labels[1], fill="black")
    return canvas
