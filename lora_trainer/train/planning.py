"""Planning a run before any model is loaded: the dataset scan and buckets, the steps arithmetic,
the model file's header check and the files the run will write (claimed before step 1)."""

from __future__ import annotations

from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError
from .buckets import BucketSelector
from .data import Dataset, assign_buckets, make_plan, scan_dataset, scan_leak_check
from .events import TrainingPlan
from .saving import epoch_tag, lora_file, step_tag
from .validation import split_held_out


def prepare_dataset(config: TrainConfig, *, decode: bool = True) -> tuple[Dataset, TrainingPlan]:
    dataset = scan_dataset(config.data, config.reg_data, caption_extension=config.caption_extension,
                           decode=decode)
    low, high = config.bucket_limits()
    selector = BucketSelector(config.resolution, enable=config.enable_bucket, min_size=low, max_size=high,
                              steps=config.bucket_reso_steps,
                              no_upscale=config.bucket_no_upscale)
    split_held_out(dataset, config.validation_split, config.seed)  # "did it learn?" images, never trained on
    if config.leak_check_dir:  # the report's leakage on other concepts, never trained on
        dataset.leak_check = scan_leak_check(config.leak_check_dir, caption_extension=config.caption_extension,
                                             decode=decode)
    assign_buckets(dataset, selector)
    for item in dataset.held_out + dataset.leak_check:
        item.choice = selector.select(*item.size)
    for item in dataset.items + dataset.held_out + dataset.leak_check:
        if min(item.bucket) < 8:
            raise ConfigError(f"Image {item.path.name} ({item.size[0]}x{item.size[1]}) is smaller than one "
                              f"{config.bucket_reso_steps}-pixel bucket step; remove it or turn off "
                              "bucket_no_upscale.")
    plan = make_plan(dataset, batch_size=config.global_batch_size, grad_accum=config.gradient_accumulation_steps,
                     epochs=config.epochs, max_steps=config.max_steps)
    return dataset, plan


def plan_training(config: TrainConfig) -> TrainingPlan:
    """The steps arithmetic for the UI, without loading a model (also checks the settings)."""
    config.validate(need_model=False)
    return prepare_dataset(config, decode=False)[1]


def model_components(config: TrainConfig) -> dict[str, str]:
    """The separate part files given for the model (Flux: clip_l, t5, vae), as load_model takes them."""
    return {k: getattr(config, k) for k in ("clip_l", "t5", "vae") if getattr(config, k, "")}


def check_model_file(path: str, components: dict[str, str] | None = None) -> None:
    """Refuse a file that is not a model we train from its header alone, before any heavy work."""
    from ..errors import UnsupportedModelError
    from ..models.loader import check_model_header

    p = Path(path)
    if p.is_dir():
        if components:
            check_model_header(p, **components)
        return  # a diffusers folder: the loader checks its parts
    suffix = p.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        check_model_header(p, **(components or {}))  # SD, or Flux with its text encoders and VAE
    elif suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise UnsupportedModelError(f"{p.name} is not a model checkpoint (expected .safetensors or .ckpt); "
                                    "pick an SD1.x, SD2.x or SDXL checkpoint file.")


def planned_files(config: TrainConfig, plan: TrainingPlan) -> list[Path]:
    files = [lora_file(config)]
    if config.save_every_n_epochs:
        files += [lora_file(config, epoch_tag(e))
                  for e in range(config.save_every_n_epochs, plan.epochs, config.save_every_n_epochs)]
    if config.save_every_n_steps:
        files += [lora_file(config, step_tag(s))
                  for s in range(config.save_every_n_steps, plan.total_steps, config.save_every_n_steps)]
    return files
