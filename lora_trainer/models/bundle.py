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
    FLUX1 = "flux1"  # Flux.1 dev / schnell (ModelBundle.variant)
    CHROMA = "chroma"  # Flux-derived, T5 only

    @property
    def label(self) -> str:
        """Name shown to users and written as `sd version` in the WebUI's user metadata."""
        return {Family.SD1: "SD1", Family.SD2: "SD2", Family.SDXL: "SDXL", Family.FLUX1: "Flux",
                Family.CHROMA: "Chroma"}[self]

    @property
    def is_flux(self) -> bool:
        """A Flux-architecture transformer (BFL layout) rather than an SD UNet."""
        return self in (Family.FLUX1, Family.CHROMA)

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        """kohya's component names of the text encoders, in ModelBundle.text_encoders order
        (`lora_<name>_` prefixes: Flux's T5 is `te3`, as kohya and ComfyUI name it)."""
        return {Family.SD1: ("te",), Family.SD2: ("te",), Family.SDXL: ("te1", "te2"),
                Family.FLUX1: ("te1", "te3"), Family.CHROMA: ("te3",)}[self]


EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
FLOW = "flow"  # rectified flow (Flux): the model predicts noise - data


def base_model_version(family: Family, prediction_type: str) -> str:
    """kohya's `ss_base_model_version` value."""
    if family is Family.SD1:
        return "sd_v1"
    if family is Family.SD2:
        return "sd_v2_v" if prediction_type == V_PREDICTION else "sd_v2"
    if family is Family.FLUX1:
        return "flux1"
    if family is Family.CHROMA:
        return "chroma"
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
    """Everything training needs from a model.

    text_encoders/tokenizers: one for SD1/SD2 (CLIPTextModel), two for SDXL
    (CLIPTextModel, CLIPTextModelWithProjection) in kohya's te1/te2 order; Flux.1: CLIP-L
    (CLIPTextModel) and T5-XXL (T5EncoderModel); Chroma: T5-XXL only (`Family.text_encoder_names`).
    Flux: `unet` holds the transformer (`models.flux.FluxTransformer`, BFL layout; also reachable
    as `.transformer`), `prediction_type` is FLOW, the VAE latents are (x - shift_factor) *
    scaling_factor, `variant` is "dev" or "schnell" and `schedule` is unused.
    """

    family: Family
    prediction_type: str
    unet: Any  # diffusers UNet2DConditionModel; Flux: models.flux.FluxTransformer
    vae: Any  # diffusers AutoencoderKL
    text_encoders: list[Any]
    tokenizers: list[Any]
    schedule: Schedule = field(default_factory=Schedule)
    scaling_factor: float = 0.18215
    name: str = "model"  # checkpoint stem, for ss_sd_model_name
    source: str = ""  # path of the file/folder, or a description of the host model
    model_hash: str | None = None  # A1111-style sha256 of the checkpoint if known (ss_new_sd_model_hash)
    shift_factor: float = 0.0  # VAE latent shift (Flux: 0.1159)
    variant: str = ""  # Flux.1: "dev" or "schnell"
    # How each part's weights are stored, by component ("unet", "te1", "te3", "vae"): "bf16", "fp16",
    # "fp32", "fp8_e4m3fn", "fp8_e5m2" or "fp8_scaled" (per-layer `scale_weight` buffers beside the
    # fp8 weights: see models/flux/fp8.py). Filled by the Flux loader; empty when unknown.
    weight_formats: dict[str, str] = field(default_factory=dict)
    # Files each part came from when they are separate ("clip_l", "t5", "vae"; `source` is the model).
    component_sources: dict[str, str] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.family is Family.SDXL

    @property
    def is_flux(self) -> bool:
        return Family(self.family).is_flux

    @property
    def transformer(self) -> Any:
        return self.unet

    @property
    def base_model_version(self) -> str:
        return base_model_version(self.family, self.prediction_type)

    def noise_scheduler(self):
        if self.is_flux:
            raise TypeError("Flux models train with rectified flow, not a DDPM noise scheduler")
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.schedule.scheduler_config(), prediction_type=self.prediction_type,
                             clip_sample=False)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Named components, kohya prefix order: unet, te / te1, te2 (Flux: te1, te3), vae."""
        named: dict[str, torch.nn.Module] = {"unet": self.unet}
        named.update(zip(self.text_encoder_names(), self.text_encoders))
        named["vae"] = self.vae
        return named

    def text_encoder_names(self) -> list[str]:
        """kohya component names of `text_encoders`, in order ("te"; "te1", "te2"; Flux "te1", "te3")."""
        names = Family(self.family).text_encoder_names
        if len(names) != len(self.text_encoders) and not self.is_flux:  # SD bundles built by hand
            names = ("te",) if len(self.text_encoders) == 1 else tuple(f"te{i}" for i in range(1, 3))
        return list(names[: len(self.text_encoders)])
