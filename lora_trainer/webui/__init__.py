"""The WebUI adapters: the only package that imports the host (`modules.*`, `backend.*`).

`register()` is called by `scripts/lora_trainer_tab.py` while the WebUI loads extension scripts —
the only moment the extension folder is on `sys.path`, so everything we need later is imported here.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .common import SETTINGS_SECTION, TAB_ID, TAB_LABEL, disabled_reason

log = logging.getLogger("lora_trainer.webui")

# Imported while the WebUI loads us (the extension folder leaves sys.path afterwards).
_EAGER = ("lora_trainer.jobs", "lora_trainer.api", "lora_trainer.actions", "lora_trainer.ui",
          "lora_trainer.ui.settings", "lora_trainer.models.loader", "lora_trainer.train",
          "lora_trainer.lora", "lora_trainer.tagger", "lora_trainer.dataset", "lora_trainer.webui.a1111",
          "lora_trainer.webui.forge", "lora_trainer.webui.forge_kind", "lora_trainer.webui.forge_storage",
          "lora_trainer.webui.forge_model")

# Our own settings (beside the UI's list): the A/B grid after a run.
A1111_SETTINGS = (
    ("lora_trainer_ab_grid", True, "After training, make an A/B grid (no LoRA, 0.4, 0.8, 1.0 per epoch)"),
    ("lora_trainer_ab_steps", 20, "A/B grid: sampling steps"),
    ("lora_trainer_verify_weights", True,
     "Check that the WebUI's model is bit-identical after training (hashes every weight: a few seconds)"),
)

_registered: dict[str, Any] = {}


class OptsView(dict):
    """Our settings as the WebUI has them *now* (read through on every access)."""

    def __init__(self, opts_getter, defaults: dict[str, Any]) -> None:
        super().__init__(defaults)
        self._get = opts_getter

    def __getitem__(self, key: str) -> Any:
        opts = self._get()
        data = getattr(opts, "data", None) or {}
        return data[key] if key in data else super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def import_all() -> str | None:
    """Import every module we need later; the reason when our dependencies are missing."""
    for name in _EAGER:
        try:
            importlib.import_module(name)
        except ImportError as e:
            if name.startswith("lora_trainer.webui.forge"):
                continue
            return f"{e.__class__.__name__}: {e}"
    return None


def pick_host(settings: dict[str, Any]) -> Any:
    try:
        from . import forge
    except ImportError:
        forge = None
    if forge is not None and forge.is_forge():
        try:
            return forge.ForgeHost(settings=settings)
        except TypeError:  # older constructor without settings
            return forge.ForgeHost()
    from .a1111 import A1111Host

    return A1111Host(settings=settings)


def register() -> None:
    """Hook the tab, the settings and the API into the WebUI (idempotent)."""
    from modules import script_callbacks, shared

    if _registered:
        return
    problem = disabled_reason() or import_all()
    if problem:
        _register_disabled(script_callbacks, problem)
        return
    from .common import api_auth_dependency, settings_specs

    specs = settings_specs()
    defaults = {s.key: s.default for s in specs} | {k: d for k, d, _ in A1111_SETTINGS}
    settings = OptsView(lambda: shared.opts, defaults)
    host = pick_host(settings)
    kind = getattr(host, "kind", None)
    if kind is not None:
        print(f"LoRA Trainer: host {kind.plain()}", flush=True)
    from ..jobs import manager_for

    jobs = manager_for(host)
    _registered.update(host=host, jobs=jobs, settings=settings)

    def on_ui_settings() -> None:
        from .common import register_settings

        register_settings(shared, specs)
        for key, default, label in A1111_SETTINGS:
            shared.opts.add_option(key, shared.OptionInfo(default, label, section=SETTINGS_SECTION))

    def on_ui_tabs() -> list[tuple[Any, str, str]]:
        from ..ui import build_tab

        blocks = build_tab(host, settings, jobs=jobs)
        return [(blocks, TAB_LABEL, TAB_ID)]

    def on_app_started(demo: Any, app: Any) -> None:
        from ..api import mount

        mount(app, host, jobs, auth=api_auth_dependency(shared.cmd_opts), settings=settings)
        log.info("LoRA Trainer: API mounted at /lora-trainer/v1 (host %s)", host.name)

    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)


def _register_disabled(script_callbacks: Any, problem: str) -> None:
    """A tab that says why LoRA Trainer is off; the rest of the WebUI is untouched."""
    print(f"LoRA Trainer is disabled: {problem}", flush=True)
    _registered.update(disabled=problem)

    def on_ui_tabs() -> list[tuple[Any, str, str]]:
        import gradio as gr

        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown("## LoRA Trainer is disabled\n\n"
                        f"{problem}\n\nSee the console output of install.py, fix the packages named "
                        "there in the WebUI's venv, then restart the WebUI.", elem_id="lora_trainer_disabled")
        return [(blocks, TAB_LABEL, TAB_ID)]

    script_callbacks.on_ui_tabs(on_ui_tabs)
