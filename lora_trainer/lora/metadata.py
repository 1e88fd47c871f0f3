"""The `ss_*` and `modelspec.*` metadata kohya sd-scripts writes into a LoRA file.

Values follow kohya's `train_network.py` (every value is `str(python value)`: "True", "None",
"(512, 512)", JSON for dicts) and `library/sai_model_spec.py` (ModelSpec 1.0.1), so tools that read
kohya LoRAs (A1111/Forge's Lora cards and metadata editor, Civitai, ComfyUI) find what they expect.
The engine fills a `TrainingFacts`; everything about the model and network comes from the
bundle and the LoraSpec.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models.bundle import V_PREDICTION, Family
from .network import LoraSpec

SAI_MODEL_SPEC_VERSION = "1.0.1"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_CHROMA = "https://huggingface.co/lodestones/Chroma"


@dataclass
class TrainingFacts:
    """What happened in training, as kohya records it. Leave unknown fields at their defaults."""

    output_name: str = "lora"
    training_started_at: float = field(default_factory=time.time)
    training_finished_at: float | None = None  # None: now
    session_id: int | None = None  # None: random, as kohya
    steps: int = 0  # optimizer steps done (ss_steps)
    epoch: int = 0  # epochs done (ss_epoch)
    num_epochs: int = 1
    max_train_steps: int = 0
    num_train_images: int = 0  # images x repeats
    num_reg_images: int = 0
    num_batches_per_epoch: int = 0
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "torch.optim.adamw.AdamW"  # kohya: module.Class plus "(arg=value,...)"
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    full_fp16: bool = False
    seed: int | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    cache_latents: bool = True
    noise_offset: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    adaptive_noise_scale: float | None = None
    zero_terminal_snr: bool = False
    min_snr_gamma: float | None = None
    ip_noise_gamma: float | None = None
    debiased_estimation: bool = False
    prior_loss_weight: float = 1.0
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    min_timestep: int | None = None
    max_timestep: int | None = None
    resolution: tuple[int, int] | int | None = None  # None: the family's native size
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_no_upscale: bool = False
    bucket_info: dict[str, Any] | None = None
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)  # {dir: {n_repeats, img_count}}
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # {dir: {tag: count}}
    training_comment: str | None = None
    sd_model_name: str | None = None  # None: the checkpoint's file name, else bundle.name
    sd_model_hash: str | None = None  # A1111's old 8-hex hash; None: computed from bundle.source if a file
    new_sd_model_hash: str | None = None  # full sha256 (ss_new_sd_model_hash); None: bundle.model_hash
    vae_name: str | None = None
    # modelspec.*
    title: str | None = None  # None: output_name
    trigger_phrase: str | None = None
    author: str | None = None
    description: str | None = None
    license: str | None = None
    tags: str | None = None
    usage_hint: str | None = None


def _num(value: float | None) -> str:
    """kohya's network_args are the user's strings: write 8, not 8.0, for whole numbers."""
    if value is None:
        return "None"
    return str(int(value)) if float(value).is_integer() else str(float(value))


def _resolution(facts: TrainingFacts, family: Family, v: bool) -> tuple[int, int]:
    reso = facts.resolution
    if reso is None:
        size = 1024 if family is Family.SDXL or family.is_flux else (768 if family is Family.SD2 and v else 512)
        return (size, size)
    if isinstance(reso, int):
        return (reso, reso)
    reso = tuple(int(r) for r in reso)
    return (reso[0], reso[0]) if len(reso) == 1 else (reso[0], reso[1])


def _model_file_name(bundle: Any) -> str:
    """kohya writes the checkpoint's file name (with extension) when it trained from a file."""
    source = str(getattr(bundle, "source", "") or "")
    if source and os.path.isfile(source):
        return os.path.basename(source)
    return getattr(bundle, "name", None) or "model"


def _old_model_hash(source: str) -> str | None:
    """A1111's old 8-hex model hash (kohya's `model_hash`): sha256 of 64 KiB at offset 1 MiB."""
    if not source or not os.path.isfile(source):
        return None
    try:
        with open(source, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[0:8]
    except OSError:
        return None


def architecture(family: Family, prediction_type: str, variant: str = "") -> str:
    """modelspec.architecture of a LoRA for this family (kohya's determine_architecture).
    variant: Flux.1's "dev" or "schnell"."""
    if family is Family.FLUX1:
        arch = {"dev": "flux-1-dev", "schnell": "flux-1-schnell"}.get(variant, "flux-1")
    elif family is Family.CHROMA:
        arch = "chroma"
    elif family is Family.SDXL:
        arch = "stable-diffusion-xl-v1-base"
    elif family is Family.SD2:
        arch = "stable-diffusion-v2-768-v" if prediction_type == V_PREDICTION else "stable-diffusion-v2-512"
    else:
        arch = "stable-diffusion-v1"
    return arch + "/lora"


def _implementation(family: Family) -> str:
    return {Family.SDXL: IMPL_STABILITY_AI, Family.FLUX1: IMPL_FLUX, Family.CHROMA: IMPL_CHROMA}.get(
        family, IMPL_DIFFUSERS)


def build_metadata(bundle: Any, spec: LoraSpec,
                   facts: TrainingFacts | Mapping[str, Any] | None = None) -> dict[str, str]:
    """kohya's LoRA metadata: ss_* training record plus modelspec.* (all values strings).

    bundle: a ModelBundle (or anything with family, prediction_type, base_model_version, name,
    model_hash); facts: TrainingFacts or a dict of its fields. `sshs_*` hashes are added by `save_kohya`, as kohya adds them at save time.
    """
    from .. import __version__

    if facts is None:
        facts = TrainingFacts()
    elif not isinstance(facts, TrainingFacts):
        facts = TrainingFacts(**dict(facts))  # a plain dict of TrainingFacts' fields
    family = Family(bundle.family)
    flux = family.is_flux
    v = bundle.prediction_type == V_PREDICTION
    finished = facts.training_finished_at if facts.training_finished_at is not None else time.time()
    reso = _resolution(facts, family, v)
    md: dict[str, Any] = {
        "ss_session_id": facts.session_id if facts.session_id is not None else random.randint(0, 2**32),
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": facts.output_name,
        "ss_learning_rate": facts.learning_rate,
        "ss_text_encoder_lr": facts.text_encoder_lr,
        "ss_unet_lr": facts.unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": bool(facts.gradient_checkpointing),
        "ss_gradient_accumulation_steps": facts.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": facts.lr_warmup_steps,
        "ss_lr_scheduler": facts.lr_scheduler,
        "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": int(spec.rank),
        "ss_network_alpha": float(spec.effective_alpha),
        "ss_network_dropout": float(spec.dropout) if spec.dropout else None,
        "ss_mixed_precision": facts.mixed_precision,
        "ss_full_fp16": bool(facts.full_fp16),
        "ss_v2": family is Family.SD2,
        "ss_base_model_version": bundle.base_model_version,
        # Not written by kohya (it encodes v-prediction in ss_base_model_version and
        # modelspec.prediction_type); kept because older readers look for kohya's CLI flag name.
        "ss_v_parameterization": v,
        "ss_clip_skip": facts.clip_skip,
        "ss_max_token_length": facts.max_token_length,
        "ss_cache_latents": bool(facts.cache_latents),
        "ss_seed": facts.seed,
        "ss_lowram": False,
        "ss_noise_offset": facts.noise_offset,
        "ss_multires_noise_iterations": facts.multires_noise_iterations,
        "ss_multires_noise_discount": facts.multires_noise_discount,
        "ss_adaptive_noise_scale": facts.adaptive_noise_scale,
        "ss_zero_terminal_snr": bool(facts.zero_terminal_snr),
        "ss_training_comment": facts.training_comment,
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": facts.max_grad_norm,
        "ss_caption_dropout_rate": facts.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": facts.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": facts.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": None,
        "ss_prior_loss_weight": facts.prior_loss_weight,
        "ss_min_snr_gamma": facts.min_snr_gamma,
        "ss_scale_weight_norms": None,
        "ss_ip_noise_gamma": facts.ip_noise_gamma,
        "ss_debiased_estimation": bool(facts.debiased_estimation),
        "ss_batch_size_per_device": facts.batch_size,
        "ss_total_batch_size": facts.batch_size * facts.gradient_accumulation_steps,
        "ss_resolution": reso,
        "ss_color_aug": bool(facts.color_aug),
        "ss_flip_aug": bool(facts.flip_aug),
        "ss_random_crop": bool(facts.random_crop),
        "ss_shuffle_caption": bool(facts.shuffle_caption),
        "ss_enable_bucket": bool(facts.enable_bucket),
        "ss_bucket_no_upscale": bool(facts.bucket_no_upscale),
        "ss_min_bucket_reso": facts.min_bucket_reso,
        "ss_max_bucket_reso": facts.max_bucket_reso,
        "ss_keep_tokens": facts.keep_tokens,
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_bucket_info": json.dumps(facts.bucket_info),
        "ss_sd_model_name": facts.sd_model_name or _model_file_name(bundle),
        "ss_training_finished_at": finished,
        "ss_steps": facts.steps,
        "ss_epoch": facts.epoch,
    }
    if flux:  # kohya's Flux metadata has no v-prediction key
        del md["ss_v_parameterization"]
        if getattr(spec, "train_t5", False):  # the --network_args kohya needs to train T5-XXL
            md["ss_network_args"] = json.dumps({"train_t5xxl": "True"})
    if spec.conv_rank is not None and not flux:
        # kohya writes the --network_args strings, plus the dropout it injects for LyCORIS.
        md["ss_network_args"] = json.dumps({"conv_dim": _num(spec.conv_rank),
                                            "conv_alpha": _num(spec.effective_conv_alpha),
                                            "dropout": float(spec.dropout) if spec.dropout else None})
    old_hash = facts.sd_model_hash or _old_model_hash(getattr(bundle, "source", ""))
    if old_hash:
        md["ss_sd_model_hash"] = old_hash
    new_hash = facts.new_sd_model_hash or getattr(bundle, "model_hash", None)
    if new_hash:
        md["ss_new_sd_model_hash"] = new_hash
    if facts.vae_name:
        md["ss_vae_name"] = facts.vae_name
    metadata = {k: str(v) for k, v in md.items()}

    spec_md: dict[str, str | None] = {
        "modelspec.sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "modelspec.architecture": architecture(family, bundle.prediction_type, getattr(bundle, "variant", "")),
        "modelspec.implementation": _implementation(family),
        "modelspec.title": facts.title or facts.output_name,
        "modelspec.resolution": f"{reso[0]}x{reso[1]}",
        "modelspec.description": facts.description,
        "modelspec.author": facts.author,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.implementation_version": f"lora-trainer/{__version__}",
        "modelspec.license": facts.license,
        "modelspec.usage_hint": facts.usage_hint,
        "modelspec.tags": facts.tags,
        "modelspec.trigger_phrase": facts.trigger_phrase,
        "modelspec.prediction_type": None if flux else ("v" if v else "epsilon"),  # kohya: none for Flux
        "modelspec.timestep_range": (f"{facts.min_timestep or 0},{facts.max_timestep or 1000}"
                                     if facts.min_timestep is not None or facts.max_timestep is not None else None),
        "modelspec.encoder_layer": str(facts.clip_skip) if facts.clip_skip is not None else None,
    }
    metadata.update({k: v for k, v in spec_md.items() if v is not None})
    return metadata
