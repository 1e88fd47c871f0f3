"""What each TrainConfig field may hold: the allowed choices, the upper bounds that catch typos, which
fields a resume's hash leaves out, and the per-value checks and coercion that `config.py` applies.

Kept apart from the dataclass so these tables read as one list; `config` re-exports the public names
(`from lora_trainer.config import OPTIMIZERS` keeps working).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

from .errors import ConfigError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Prodigy", "Lion", "Lion8bit", "Adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = ("fp16", "bf16", "float")
LOSS_TYPES = ("l2", "huber")
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")  # Flux (train/flow.py)
PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")
WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
MAX_BLOCKS_TO_SWAP = 38  # kohya's count: n // 2 of Flux's 19 double blocks and 2 * (n - n // 2) of its 38 single


# Settings that do not change what a resumed run computes: they may differ between the run that
# saved a state and the run that resumes it.
NOT_HASHED = frozenset({
    "resume", "overwrite", "device", "output_dir", "save_every_n_epochs", "save_every_n_steps",
    "sample_prompts", "sample_every_n_epochs", "sample_steps", "sample_cfg_scale", "sample_seed",
    "sample_negative_prompt", "latent_cache_dir", "cache_latents_to_disk", "preset", "log_every",
    "save_state", "activation_text", "preferred_weight", "accel", "processes", "validate_every_n_epochs",
})
# Settings added for Flux: hashed only when set, so the states of runs saved before they existed resume.
HASHED_IF_SET = frozenset({
    "clip_l", "t5", "vae", "timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "model_prediction_type",
    "guidance_scale", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "t5_max_token_length",
    "blocks_to_swap", "cpu_offload_checkpointing", "train_t5", "validation_split",
    "leak_check_dir",
})
# Upper bounds that catch typos and hostile requests (`rank: 1e9` would only fail as "out of memory",
# `max_steps: 1e12` would show an ETA of trillions of seconds): field -> (lowest, highest, hint).
LIMITS: dict[str, tuple[int, int, str]] = {
    "rank": (1, 1024, "16 is a good start"),
    "conv_rank": (0, 1024, "4 to 32 is usual"),
    "epochs": (0, 10_000, "10 is typical"),
    "max_steps": (0, 1_000_000, "a few thousand is typical"),
    "batch_size": (1, 256, "1 to 8 fit most GPUs"),
    "gradient_accumulation_steps": (1, 1024, "1 unless the batch does not fit"),
    "resolution": (8, 4096, "512 for SD1.5, 1024 for SDXL"),
    "lr_warmup_steps": (0, 1_000_000, "0 or about 5% of the steps"),
    "sample_steps": (1, 1000, "20 is typical"),
    "keep_tokens": (0, 1000, "1 keeps a trigger word first"),
}
MAX_SAMPLE_PROMPTS = 64
_NAME_OK = re.compile(r"^[^/\\:*?\"<>|\x00-\x1f]+$")


def check_name(name: str) -> None:
    """The LoRA name becomes a file name: no folders, no `..`, nothing Windows cannot store."""
    if not name or not name.strip():
        raise ConfigError("The LoRA name is empty; give it a short name such as my-style.")
    if ".." in name or "/" in name or "\\" in name or os.sep in name:
        raise ConfigError(f"The LoRA name '{name}' contains a path separator or '..'; "
                          "use a plain file name such as my-style.")
    if not _NAME_OK.match(name) or name != name.strip() or name.endswith("."):
        raise ConfigError(f"The LoRA name '{name}' has characters a file name cannot hold; "
                          "use letters, digits, '-' and '_'.")
    if name.lower().endswith(".safetensors"):
        raise ConfigError(f"The LoRA name '{name}' includes the extension; give the name without .safetensors.")


def coerce_value(key: str, value: Any, default: Any, f: dataclasses.Field) -> Any:
    """Settings files and form fields give strings and ints loosely; make them the field's type."""
    try:
        if isinstance(value, bool) and not isinstance(default, bool) and isinstance(default, (int, float)):
            raise TypeError("a true/false value is not a number")
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.strip().lower() in ("1", "true", "yes", "on"):
                    return True
                if value.strip().lower() in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if isinstance(default, str):
            return "" if value is None else str(value)
        if isinstance(default, list):
            if isinstance(value, str):
                return [line for line in value.splitlines() if line.strip()]
            return [str(v) for v in value]
        if isinstance(default, dict):
            if isinstance(value, str):
                return json.loads(value) if value.strip() else {}
            return dict(value)
    except (TypeError, ValueError, OverflowError) as e:
        raise ConfigError(f"Setting {key} has the value {value!r}, which is not a valid "
                          f"{type(default).__name__}; fix it in your settings.") from e
    return value


def check_positive_int(key: str, value: int, hint: str = "") -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be at least 1 (got {value}); {hint or 'raise it'}.")


def check_non_negative_int(key: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{key} cannot be negative (got {value}); use 0 to turn it off.")


def check_positive(key: str, value: float, hint: str = "") -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be greater than 0 (got {value}); {hint or 'raise it'}.")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} '{value}' is not supported; choose one of {', '.join(choices)}.")
