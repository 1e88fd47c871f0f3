"""LoRA adapters (peft) with kohya sd-scripts' target set, file format, metadata and hashes."""

from .errors import LoraFileError
from .kohya_file import (
    LoraFileInfo,
    list_loras,
    load_kohya_file,
    precalculate_safetensors_hashes,
    read_lora_info,
    save_kohya,
)
from .metadata import TrainingFacts, architecture, build_metadata
from .network import LoadReport, LoraNetwork, LoraSpec, applied_lora, inject_lora
from .targets import LoraTarget, find_targets

__all__ = [
    "LoadReport",
    "LoraFileError",
    "LoraFileInfo",
    "LoraNetwork",
    "LoraSpec",
    "LoraTarget",
    "TrainingFacts",
    "applied_lora",
    "architecture",
    "build_metadata",
    "find_targets",
    "inject_lora",
    "list_loras",
    "load_kohya_file",
    "precalculate_safetensors_hashes",
    "read_lora_info",
    "save_kohya",
]
