"""What the steps of the tab share: the context of one tab (host, job manager, settings), preset
labels, and how an error is shown in the form.
"""

import html
from dataclasses import dataclass
from typing import Any

from ..config import PRESETS, TrainConfig
from ..jobs import JobManager
from . import logic, plan
from .settings import get_setting
from .texts import form_message

PRESET_LABELS = {f"{p.label} ({key})": key for key, p in PRESETS.items()}


def preset_label(key: str) -> str:
    for label, k in PRESET_LABELS.items():
        if k == key:
            return label
    return next(iter(PRESET_LABELS))


def train_defaults(preset_key: str) -> TrainConfig:
    return TrainConfig().with_preset(preset_key)


def error_md(e: BaseException) -> str:
    """An error for the form: our message in the form's words (a field's label, not its flag)."""
    return f"**Error:** {html.escape(form_message(logic.user_error(e))).replace('&#x27;', chr(39))}"


@dataclass
class TabContext:
    """One tab's host, job manager and settings, and what follows from them."""

    host: Any
    jobs: JobManager
    settings: dict | None
    preset_key: str  # the default preset (a known key)
    standalone: bool
    needs_model_file: bool  # standalone without a model: the form asks for a checkpoint file

    def opt(self, key):  # read when used: the WebUI's settings can change while it runs
        return get_setting(self.settings, key)

    def roots(self):
        return self.jobs.allowed_roots()

    def preset_info(self, key, family=None):
        p = PRESETS[key]
        text = f"**{p.label}** — needs about {p.vram_gb} GB of GPU memory. {p.note}"
        warning = plan.preset_warning(key, family)
        return text + (f"\n\n{warning}" if warning else "")
