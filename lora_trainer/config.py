"""TrainConfig: every training setting in one dataclass, TOML/JSON in and out, validation.

Field names follow kohya sd-scripts where one exists (network_dim → `rank`, network_alpha → `alpha`),
so users can carry their settings over. `validate()` checks everything that can be checked without
loading a model, so a bad setting fails in a second instead of after caching latents. The presets
`with_preset` applies live in `presets.py`; each field's choices, bounds and value checks in
`config_fields.py` (both re-exported here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_fields import (
    HASHED_IF_SET,
    LIMITS,
    LOSS_TYPES,
    MAX_BLOCKS_TO_SWAP,
    MAX_SAMPLE_PROMPTS,
    MIXED_PRECISION,
    NOT_HASHED,
    OPTIMIZERS,
    PREDICTION_TYPES,
    SAVE_PRECISION,
    SCHEDULERS,
    TIMESTEP_SAMPLING,
    WEIGHTING_SCHEMES,
    check_choice,
    check_name,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    coerce_value,
)
from .errors import ConfigError
from .presets import PRESETS, Preset  # noqa: F401  (imported from here by the CLI, UI, tests)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class TrainConfig:
    # --- what to train on / where to write
    model: str = ""  # checkpoint file or diffusers folder (ignored when the host hands a model)
    clip_l: str = ""  # Flux: CLIP-L file ("": the model file's own, or found beside it)
    t5: str = ""  # Flux: T5-XXL file (t5xxl_fp16 / t5xxl_fp8_e4m3fn)
    vae: str = ""  # Flux: the autoencoder (ae.safetensors)
    data: str = ""  # folder with img/<N>_<name>/ (and reg/), or the folder holding <N>_<name>/ itself
    reg_data: str = ""  # folder with <N>_<class>/ regularisation images; default <data>/reg
    output_dir: str = "output"
    name: str = "my-lora"
    overwrite: bool = False
    preset: str = ""
    # --- network
    rank: int = 16
    alpha: float = 8.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    train_unet: bool = True
    train_text_encoder: bool = False  # CLIP (SD's text encoder(s); Flux.1: CLIP-L)
    train_t5: bool = False  # Flux.1/Chroma: LoRA on T5-XXL too (kohya's network_args train_t5xxl=True)
    # --- data
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 0  # 0 = follow the resolution (half of it); see bucket_limits()
    max_bucket_reso: int = 0  # 0 = follow the resolution (twice it)
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    prior_loss_weight: float = 1.0
    # --- schedule of the run
    epochs: int = 10
    max_steps: int = 0  # > 0 overrides epochs
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # --- optimisation
    optimizer: str = "AdamW"
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-4  # UNet LoRA
    text_encoder_lr: float = 0.0  # 0 = same as learning_rate
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_grad_norm: float = 1.0  # 0 = no clipping
    # --- math
    clip_skip: int = 1
    noise_offset: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's value
    min_timestep: int = 0
    max_timestep: int = 0  # 0 = the schedule's num_train_timesteps
    loss_type: str = "l2"
    huber_c: float = 0.1
    # --- Flux (rectified flow; kohya's names, its recommended values as defaults)
    timestep_sampling: str = "shift"  # sigma | uniform | sigmoid | shift | flux_shift
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.1582
    model_prediction_type: str = "raw"  # raw | additive | sigma_scaled
    guidance_scale: float = 1.0  # Flux.1 dev's distilled guidance while training (1.0 = off)
    weighting_scheme: str = "none"  # with timestep_sampling sigma / model_prediction_type sigma_scaled
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    t5_max_token_length: int = 0  # 0 = 512 for dev, 256 for schnell
    # --- precision and memory
    mixed_precision: str = "bf16"  # fp16 (with loss scaling) on GPUs without bf16; fp32 on the CPU
    save_precision: str = "fp16"
    gradient_checkpointing: bool = False
    fp8_base: bool = False  # frozen UNet/TE Linear weights stored in fp8 (CUDA, models we load ourselves)
    blocks_to_swap: int = 0  # Flux: transformer blocks streamed from CPU memory (kohya's count, 0..38)
    cpu_offload_checkpointing: bool = False  # Flux: keep the checkpointed block inputs in CPU memory
    accel: str = "auto"  # "auto": fused LoRA forward + CUDA graphs where they work; "off": plain eager
    cache_latents_to_disk: bool = False
    latent_cache_dir: str = ""  # default <output_dir>/.cache/latents
    device: str = "auto"
    processes: int = 1  # data-parallel processes, one per GPU (`train --gpus N`); batch_size is per process
    # --- saving, samples, logging
    save_every_n_epochs: int = 0
    save_every_n_steps: int = 0
    save_state: bool = True
    # --- "did it learn?" (train/validation.py, train/report.py): validation/leakage scores per epoch, best epoch kept
    validate_every_n_epochs: int = 1  # 0 = no report
    validation_split: float = 0.0  # share of the training images held out for scoring (0: fixed noise on them)
    # a folder of pictures of other concepts with same-named .txt captions, never trained on: the report's leakage
    # is measured on them ("other concepts"; "": the regularisation images, else pure noise)
    leak_check_dir: str = ""
    sample_prompts: list[str] = field(default_factory=list)
    sample_negative_prompt: str = ""
    sample_every_n_epochs: int = 0
    sample_steps: int = 20
    sample_cfg_scale: float = 7.0
    sample_seed: int = 1234
    log_every: int = 1
    activation_text: str = ""  # written to <name>.json; default: the dataset's class tokens
    preferred_weight: float = 0.8
    resume: str = ""  # state folder written by an earlier (stopped) run

    # ------------------------------------------------------------------ in / out
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "settings") -> TrainConfig:
        unknown = sorted(set(data) - cls.field_names())
        if unknown:
            raise ConfigError(f"Unknown setting(s) {', '.join(unknown)} in {source}; "
                              "check the spelling against `python -m lora_trainer train --help`.")
        config = cls()
        if data.get("preset"):
            config = config.with_preset(str(data["preset"]))
        kinds = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            setattr(config, key, coerce_value(key, value, getattr(cls(), key), kinds[key]))
        return config

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a `.toml` or `.json` settings file (flat keys, or a [train] table in TOML)."""
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"Settings file {p} is a folder; give the path of a .toml or .json file.")
        if not p.is_file():
            raise ConfigError(f"Settings file {p} does not exist; check the path.")
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(p.read_text(encoding="utf-8-sig"))
            elif p.suffix.lower() == ".toml":
                data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
                data = data.get("train", data)
            else:
                raise ConfigError(f"Settings file {p.name} is neither .toml nor .json; "
                                  "save it with one of those extensions.")
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"Settings file {p.name} cannot be parsed ({e}); fix its syntax.") from e
        if not isinstance(data, dict):
            raise ConfigError(f"Settings file {p.name} does not hold a table of settings; "
                              "write `key = value` lines (TOML) or a JSON object.")
        return cls.from_dict(data, source=p.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as TOML or JSON (by extension), atomically."""
        p = Path(path)
        if p.suffix.lower() == ".toml":
            import tomli_w

            text = tomli_w.dumps(self.to_dict())
        else:
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        _atomic_write_text(p, text)
        return p

    def with_preset(self, key: str) -> TrainConfig:
        if key not in PRESETS:
            raise ConfigError(f"Unknown preset '{key}'; choose one of {', '.join(PRESETS)}.")
        return dataclasses.replace(self, preset=key, **PRESETS[key].settings)

    def state_dir(self) -> Path:
        """Where a run keeps its resumable state: `<output_dir>/<name>-state/`."""
        return Path(self.output_dir) / f"{self.name}-state"

    def candidates_dir(self) -> Path:
        """Where a run keeps the LoRA files of the epochs its report could still pick (train/validation.py) until
        it ends: `<output_dir>/.<name>-candidates/` (a stopped run's stay for its resume)."""
        return Path(self.output_dir) / f".{self.name}-candidates"

    @property
    def global_batch_size(self) -> int:
        """Images per optimizer step and micro-batch across all processes of a multi-GPU run."""
        return self.batch_size * max(1, self.processes)

    def bucket_limits(self) -> tuple[int, int]:
        """(smallest, largest) bucket side: the settings, or where they are 0, half and twice the
        resolution on the bucket grid (kohya's 256..1024 at 512 px, 512..2048 at 1024 px, 64..256 at
        128 px), so a lower resolution needs no bucket setting of its own."""
        step = max(1, self.bucket_reso_steps)
        low = self.min_bucket_reso or max(step, self.resolution // 2 // step * step)
        high = self.max_bucket_reso or max(low, self.resolution * 2 // step * step)
        return low, high

    def hash(self) -> str:
        """Identity of the settings that decide what each step computes (checked on resume)."""
        defaults = TrainConfig()
        items = {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED
                 and not (k in HASHED_IF_SET and v == getattr(defaults, k))}
        # buckets that follow the resolution hash as their values: a state saved with 256/1024 written
        # out resumes with 0/0 at 512 px (the same buckets)
        items["min_bucket_reso"], items["max_bucket_reso"] = self.bucket_limits()
        # several GPUs train the global batch (batch_size per process x processes): that is what
        # decides the steps, so 2 GPUs x 4 resume on 1 GPU x 8 (and a 1-process hash is unchanged)
        items["batch_size"] = self.global_batch_size
        for key in ("model", "clip_l", "t5", "vae"):
            if key in items:
                items[key] = os.path.basename(str(items[key]))
        items["data"] = os.path.basename(os.path.normpath(str(items["data"]))) if items["data"] else ""
        blob = json.dumps(items, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # ------------------------------------------------------------------ checks
    def validate(self, *, need_model: bool = True) -> TrainConfig:
        """Raise ConfigError on the first setting that cannot work. Returns self."""
        if need_model:
            if not self.model:
                raise ConfigError("No base model was given; pass --model with a .safetensors/.ckpt file.")
            if not Path(self.model).exists():
                raise ConfigError(f"Model {self.model} does not exist; check the path.")
        if not self.data:
            raise ConfigError("No dataset folder was given; pass --data with the folder holding img/.")
        if not Path(self.data).is_dir():
            raise ConfigError(f"Dataset folder {self.data} does not exist; check the path.")
        check_name(self.name)
        for key, (low, high, hint) in LIMITS.items():
            value = getattr(self, key)
            if value > high:
                raise ConfigError(f"{key} must be at most {high:,} (got {value:,}); the allowed range is "
                                  f"{low}..{high:,}, {hint}.")
        if len(self.sample_prompts) > MAX_SAMPLE_PROMPTS:
            raise ConfigError(f"{len(self.sample_prompts)} sample prompts were given; use at most "
                              f"{MAX_SAMPLE_PROMPTS} (each is drawn at every sampling round).")
        check_positive_int("rank", self.rank, "16 is a good start")
        check_non_negative_int("conv_rank", self.conv_rank)
        check_positive("alpha", self.alpha)
        if self.conv_rank:
            check_positive("conv_alpha", self.conv_alpha)
        if not (self.train_unet or self.train_text_encoder or self.train_t5):
            raise ConfigError("Neither the UNet nor the text encoder is trained; enable at least one.")
        check_positive("learning_rate", self.learning_rate, "1e-4 is a good start")
        if self.text_encoder_lr < 0:
            raise ConfigError(f"text_encoder_lr must be ≥ 0 (got {self.text_encoder_lr}); "
                              "use 0 to reuse learning_rate.")
        check_positive_int("resolution", self.resolution)
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (got {self.resolution}); use 512 or 1024.")
        check_positive_int("bucket_reso_steps", self.bucket_reso_steps)
        if self.enable_bucket:
            if self.resolution < self.bucket_reso_steps:
                raise ConfigError(f"resolution {self.resolution} is smaller than one bucket step "
                                  f"({self.bucket_reso_steps} px); use at least {self.bucket_reso_steps}, or lower "
                                  "bucket_reso_steps.")
            low, high = self.bucket_limits()
            if self.min_bucket_reso < 0 or self.max_bucket_reso < 0 or high < low:
                raise ConfigError(f"Bucket sizes {low}..{high} are not a valid range; set min_bucket_reso and "
                                  "max_bucket_reso to 0 to follow the resolution, or use e.g. 256..1024.")
            if not low <= self.resolution <= high:
                which = "min_bucket_reso" if self.resolution < low else "max_bucket_reso"
                raise ConfigError(f"resolution {self.resolution} is outside the bucket sizes {low}..{high}; "
                                  f"set {which} to 0 to follow the resolution, or change it.")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("The run has zero steps (epochs and max_steps are both 0); "
                              "set --epochs or --max-steps to at least 1.")
        if self.epochs < 0 or self.max_steps < 0:
            raise ConfigError("epochs and max_steps cannot be negative; set at least one of them to ≥ 1.")
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("processes", self.processes, "1 per GPU")
        check_positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.optimizer == "Prodigy" and min(self.learning_rate, self.text_encoder_lr or 1.0) < 0.1:
            # Prodigy estimates the step size itself; its learning rate only scales that estimate, so
            # an AdamW-sized rate (1e-4) would make a LoRA that learns nothing.
            raise ConfigError(f"Prodigy sets its own step size and takes the learning rate as a multiplier "
                              f"(got {self.learning_rate:g}, text encoder {self.text_encoder_lr:g}); "
                              "use 1.0 for both.")
        check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        check_choice("save_precision", self.save_precision, SAVE_PRECISION)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_non_negative_int("lr_warmup_steps", self.lr_warmup_steps)
        check_positive_int("lr_scheduler_num_cycles", self.lr_scheduler_num_cycles)
        if self.clip_skip < 1:
            raise ConfigError(f"clip_skip must be ≥ 1 (got {self.clip_skip}); 1 = last layer, 2 = penultimate.")
        for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1) (got {value}); 0.05 is typical.")
        check_non_negative_int("keep_tokens", self.keep_tokens)
        for key in ("noise_offset", "min_snr_gamma", "max_grad_norm", "prior_loss_weight", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} cannot be negative (got {getattr(self, key)}); use 0 to turn it off.")
        if self.min_timestep < 0 or (self.max_timestep and self.max_timestep <= self.min_timestep):
            raise ConfigError(f"Timestep range {self.min_timestep}..{self.max_timestep} is empty; "
                              "use e.g. min_timestep 0, max_timestep 1000.")
        if self.loss_type == "huber":
            check_positive("huber_c", self.huber_c)
        for key in ("save_every_n_epochs", "save_every_n_steps", "sample_every_n_epochs", "multires_noise_iterations"):
            check_non_negative_int(key, getattr(self, key))
        if self.sample_every_n_epochs and not self.sample_prompts:
            raise ConfigError("Samples are requested but no sample prompt is given; add --sample-prompt.")
        check_positive_int("sample_steps", self.sample_steps)
        check_non_negative_int("validate_every_n_epochs", self.validate_every_n_epochs)
        if not 0 <= self.validation_split < 1:
            raise ConfigError(f"validation_split must be at least 0 and below 1 (got {self.validation_split}); "
                              "0.1 holds out a tenth of the images, 0 scores the training images.")
        if self.leak_check_dir and not Path(self.leak_check_dir).is_dir():
            raise ConfigError(f"Leak-check folder {self.leak_check_dir} does not exist; check the path, or leave "
                              "leak_check_dir empty.")
        if self.caption_extension and not self.caption_extension.startswith("."):
            raise ConfigError(f"caption_extension must start with a dot (got '{self.caption_extension}'); "
                              "use .txt or .caption.")
        if self.resume and not Path(self.resume).is_dir():
            raise ConfigError(f"Resume state {self.resume} does not exist; pass the <name>-state folder "
                              "written by the stopped run.")
        check_choice("accel", self.accel, ("auto", "off"))
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
        check_choice("model_prediction_type", self.model_prediction_type, PREDICTION_TYPES)
        check_choice("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        check_positive("discrete_flow_shift", self.discrete_flow_shift, "3.1582 is kohya's recommendation for Flux.1")
        check_positive("sigmoid_scale", self.sigmoid_scale, "1.0 is the usual value")
        check_positive("logit_std", self.logit_std, "1.0 is the usual value")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale cannot be negative (got {self.guidance_scale}); use 1.0 for Flux.1 dev.")
        check_non_negative_int("t5_max_token_length", self.t5_max_token_length)
        if not 0 <= self.blocks_to_swap <= MAX_BLOCKS_TO_SWAP:
            raise ConfigError(f"blocks_to_swap must be between 0 and {MAX_BLOCKS_TO_SWAP} (got {self.blocks_to_swap}); "
                              "use 0 when the model fits on the GPU.")
        for key in ("clip_l", "t5", "vae"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise ConfigError(f"The {key.replace('_', '-').upper()} file {value} does not exist; check the path.")
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(f"Unknown preset '{self.preset}'; choose one of {', '.join(PRESETS)}.")
        return self


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
