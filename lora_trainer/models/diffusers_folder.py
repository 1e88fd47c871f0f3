"""Load a diffusers-format pipeline folder (model_index.json, unet/, vae/, text_encoder(_2)/, scheduler/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError
from .bundle import EPSILON, Family, ModelBundle, Schedule
from .detect import unsupported
from .tokenizers import PAD_ENDOFTEXT, PAD_EXCLAMATION, clip_tokenizer


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_diffusers_folder(folder: Path, *, dtype: torch.dtype | None = torch.float32,
                          device: str | torch.device | None = "cpu") -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    name = folder.name
    index = _json(folder / "model_index.json")
    if "transformer" in index or (folder / "transformer").is_dir():
        raise unsupported("a transformer-based diffusers model (SD3, Flux, ...)", name)
    if not (folder / "unet" / "config.json").is_file():
        if (folder / "config.json").is_file():
            raise unsupported("a single diffusers component, not a whole pipeline", name)
        raise UnsupportedModelError(
            f"{name} is a folder but not a diffusers model (no unet/config.json); choose a checkpoint "
            "file or a diffusers pipeline folder.")
    has_te1 = (folder / "text_encoder").is_dir()
    has_te2 = (folder / "text_encoder_2").is_dir()
    if has_te2 and not has_te1:
        raise unsupported("an SDXL refiner", name)
    if not has_te1 or not (folder / "vae").is_dir():
        raise UnsupportedModelError(
            f"{name} lacks its text encoder or VAE folder; copy the whole diffusers pipeline folder.")
    unet_config = _json(folder / "unet" / "config.json")
    in_channels = int(unet_config.get("in_channels", 4))
    if in_channels != 4:
        raise unsupported({9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(
            in_channels, f"a UNet with {in_channels} input channels"), name)
    te_config = _json(folder / "text_encoder" / "config.json")
    if has_te2:
        family = Family.SDXL
    elif te_config.get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024:
        family = Family.SD2  # OpenCLIP text tower
    else:
        family = Family.SD1

    def kw(sub: str) -> dict[str, Any]:
        args: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
        names = [f.name for f in (folder / sub).iterdir()]
        weights = [n for n in names if n.endswith((".safetensors", ".bin"))]
        if weights and all(".fp16." in n for n in weights):
            args["variant"] = "fp16"  # saved with only the fp16 variant
        return args

    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", **kw("unet"))
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **kw("vae"))
        encoders = [CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **kw("text_encoder"))]
        if has_te2:
            encoders.append(CLIPTextModelWithProjection.from_pretrained(
                str(folder / "text_encoder_2"), **kw("text_encoder_2")))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UnsupportedModelError(
            f"{name} could not be loaded as a diffusers model ({exc}); copy the folder again.") from exc
    for m in (unet, vae, *encoders):
        if device is not None:
            m.to(device)
        m.eval().requires_grad_(False)

    sched = _json(folder / "scheduler" / "scheduler_config.json")
    schedule = Schedule(
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
        beta_start=float(sched.get("beta_start", 0.00085)),
        beta_end=float(sched.get("beta_end", 0.012)),
        beta_schedule=str(sched.get("beta_schedule", "scaled_linear")),
    )
    pads = [PAD_ENDOFTEXT, PAD_EXCLAMATION] if has_te2 else [
        PAD_EXCLAMATION if family is Family.SD2 else PAD_ENDOFTEXT]
    return ModelBundle(
        family=family, prediction_type=str(sched.get("prediction_type", EPSILON)), unet=unet, vae=vae,
        text_encoders=encoders, tokenizers=[clip_tokenizer(p) for p in pads], schedule=schedule,
        scaling_factor=float(vae.config.scaling_factor), name=name, source=str(folder))
