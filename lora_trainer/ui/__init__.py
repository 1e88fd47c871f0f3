"""The "Train LoRA" tab (Gradio Blocks, Gradio 3.41 and 4.x).

`build_tab(host, settings=None, *, jobs=None) -> gr.Blocks`; Gradio is imported only when the tab
is built, so `ui.settings` stays importable where Gradio is missing (the newest test stack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr

    from ..jobs import JobManager


def build_tab(host: Any, settings: dict[str, Any] | None = None, *, jobs: JobManager | None = None) -> gr.Blocks:
    from .tab import build_tab as _build

    return _build(host, settings, jobs=jobs)
