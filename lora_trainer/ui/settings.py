"""The tab's WebUI settings, as data: both adapters register exactly this list in `on_ui_settings`.

No Gradio here: an adapter maps `kind` to its own option widgets (A1111/Forge `OptionInfo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PRESETS
from ..tagger.registry import DEFAULT_MODEL, MODELS

SECTION = ("lora_trainer", "LoRA Trainer")


@dataclass(frozen=True)
class SettingSpec:
    key: str
    label: str
    default: Any
    kind: str = "text"  # "text" | "dropdown" | "textbox-list" (folders, one per line or comma-separated)
    choices: tuple[str, ...] = ()
    help: str = ""


SETTINGS: list[SettingSpec] = [
    SettingSpec("lora_trainer_output_subdir", "Sub-folder of the Lora folder for trained LoRAs", "",
                help="Empty: the Lora folder itself. Only plain folder names, e.g. 'trained'."),
    SettingSpec("lora_trainer_tagger_model", "Default WD14 tagger", DEFAULT_MODEL, "dropdown",
                choices=tuple(MODELS)),
    SettingSpec("lora_trainer_tagger_cache", "Folder for downloaded tagger models", "",
                help="Empty: the default cache (models/lora_trainer/taggers inside the WebUI)."),
    SettingSpec("lora_trainer_default_preset", "Default training preset", "sd15", "dropdown",
                choices=tuple(PRESETS)),
    SettingSpec("lora_trainer_extra_roots", "Extra folders the trainer may use when the WebUI is shared", "",
                "textbox-list", help="Only matters with --listen/--share: typed paths must stay inside the WebUI "
                "folder or these folders (one per line or comma-separated)."),
]


def defaults() -> dict[str, Any]:
    return {s.key: s.default for s in SETTINGS}


def with_defaults(settings: dict[str, Any] | None) -> dict[str, Any]:
    """`settings` (possibly partial, possibly None values) completed with the defaults."""
    merged = defaults()
    for key, value in (settings or {}).items():
        if value is not None:
            merged[key] = value
    return merged


def get_setting(settings: Any, key: str) -> Any:
    """`settings[key]` read now (adapters pass a live view of the WebUI's options), else the default."""
    value = None
    if settings is not None:
        try:
            value = settings.get(key)
        except (AttributeError, KeyError, TypeError):
            value = None
    return defaults()[key] if value is None else value


def parse_paths(value: str | list[str] | None) -> list[Path]:
    """The `paths` setting as folders (one per line or comma-separated)."""
    if not value:
        return []
    items = value if isinstance(value, list) else str(value).replace(",", "\n").splitlines()
    return [Path(p.strip()).expanduser() for p in items if p.strip()]
