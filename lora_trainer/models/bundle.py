"""The trainable model handed between loading, LoRA injection, training and export.

A ModelBundle is host-independent: it holds diffusers/transformers modules, whether they were
built from a checkpoint file, a diffusers folder, or the WebUI's tensors in memory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class Family(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        """Name shown to users and written as `sd version` in the WebUI's user metadata."""
        return {Family.SD1: "SD1", Family.SD2: "SD2", Family.SDXL: "SDXL"}[self]


EPSILON = "epsilon"
V_PREDICTION = "v_prediction"


def base_model_version(family: Family, prediction_type: str) -> str:
    """kohya's `ss_base_model_version` value."""
    if family is Family.SD1:
        return "sd_v1"
    if family is Family.SD2:
        return "sd_v2_v" if prediction_type == V_PREDICTION else "sd_v2"
    return "sdxl_base_v1-0"


@dataclass
class Schedule:
    """The model's DDPM training schedule (LDM `linear_start`/`linear_end`/`timesteps`)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
        }


@dataclass
class ModelBundle:
    """Everything training needs from a Stable Diffusion model.

    text_encoders/tokenizers: one for SD1/SD2 (CLIPTextModel), two for SDXL
    (CLIPTextModel, CLIPTextModelWithProjection) in kohya's te1/te2 order.
    """

    family: Family
    prediction_type: str
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoders: list[Any]
    tokenizers: list[Any]
    schedule: Schedule = field(default_factory=Schedule)
    scaling_factor: float = 0.18215
    name: str = "model"  # checkpoint stem, for ss_sd_model_name
    source: str = ""  # path of the file/folder, or a description of the host model
    model_hash: str | None = None  # A1111-style sha256 of the checkpoint if known (ss_new_sd_model_hash)

    @property
    def is_sdxl(self) -> bool:
        return self.family is Family.SDXL

    @property
    def base_model_version(self) -> str:
        return base_model_version(self.family, self.prediction_type)

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.schedule.scheduler_config(), prediction_type=self.prediction_type,
                             clip_sample=False)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Named components, kohya prefix order: unet, te / te1, te2, vae."""
        named: dict[str, torch.nn.Module] = {"unet": self.unet}
        if len(self.text_encoders) == 1:
            named["te"] = self.text_encoders[0]
        else:
            for i, te in enumerate(self.text_encoders, 1):
                named[f"te{i}"] = te
        named["vae"] = self.vae
        return named
