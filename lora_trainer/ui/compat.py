"""The few places where Gradio 3.41 (A1111) and 4.x (Forge) differ, in one file."""

from __future__ import annotations

from typing import Any

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def js_kwargs(js: str | None) -> dict[str, Any]:
    """Client-side JS for an event: `_js=` on Gradio 3, `js=` on Gradio 4."""
    if not js:
        return {}
    return {"_js": js} if GRADIO_MAJOR < 4 else {"js": js}


def upload_paths(files: Any) -> list[Any]:
    """gr.File values: Gradio 3 gives tempfile wrappers (`.name`), Gradio 4 plain paths or FileData."""
    if files is None:
        return []
    if not isinstance(files, list):
        files = [files]
    out = []
    for f in files:
        path = getattr(f, "path", None) or getattr(f, "name", None) or f
        out.append(type("Upload", (), {"name": str(path), "orig_name": getattr(f, "orig_name", None)})())
    return out


def selected_index(evt: Any) -> int | None:
    """gr.SelectData.index: an int for galleries (a [row, col] list for tables)."""
    index = getattr(evt, "index", None)
    if isinstance(index, (list, tuple)):
        index = index[0] if index else None
    return int(index) if index is not None else None


def queue_kwargs(workers: int) -> dict[str, Any]:
    """Blocks.queue() arguments for `workers` events at once. Gradio 3 needs them: an open page's
    progress generator holds one worker while the page is open (A1111 runs `queue(64)`); Gradio 4
    limits each event separately and polls with short timer ticks, so its default is kept."""
    return {"concurrency_count": workers} if GRADIO_MAJOR < 4 else {}
