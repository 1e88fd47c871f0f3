"""The `<lora>.json` beside a LoRA file: the user metadata A1111/Forge show and use on the Lora card
("activation text" is added to the prompt, "preferred weight" becomes the `<lora:name:w>` weight)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def user_metadata_path(lora_path: str | os.PathLike[str]) -> Path:
    p = Path(lora_path)
    return p.with_name(p.stem + ".json")


def write_user_metadata(lora_path: str | os.PathLike[str], *, activation_text: str = "",
                        preferred_weight: float = 0.8, sd_version: str = "Unknown", description: str = "",
                        notes: str = "", negative_text: str = "") -> Path:
    """Write (atomically) or update the WebUI user metadata; keys the user added are kept.

    sd_version: "SD1", "SD2", "SDXL" or "Unknown" (`Family.label`), as the WebUI's card filter expects.
    """
    path = user_metadata_path(lora_path)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            data = {}
    data.update({
        "description": description or data.get("description", ""),
        "sd version": sd_version,
        "activation text": activation_text,
        "preferred weight": preferred_weight,
        "negative text": negative_text or data.get("negative text", ""),
        "notes": notes or data.get("notes", ""),
    })
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path
