"""Text-encoder outputs computed once, before the loop (frozen encoders, captions that never change).

Kept in memory (CPU, fp32) per caption. A family that names its encoders (`TrainFamily.text_identity`)
may also keep them on disk, under a key made of the caption's text and that identity, so an edited
caption or another encoder never reuses a stale entry. When every caption is on disk the encoders are
never loaded: `ensure_encoders` is only called when something has to be encoded (Flux's T5-XXL is
~9 GB; a second run with the same captions skips it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

Entry = dict[str, torch.Tensor]
TEXT_BATCH = 16  # captions per text-encoder call (32 one-by-one calls took 1.5 s for SDXL on an H200)


def cache_key(caption: str, identity: str) -> str:
    return hashlib.sha256(f"{identity}\0{caption}".encode()).hexdigest()[:40]


def cache_text_outputs(family: Any, bundle: Any, captions: list[str], *, clip_skip: int = 1,
                       disk_dir: Path | None = None, ensure_encoders: Callable[[], None] | None = None,
                       autocast: Any = None, progress: Callable[[int, int], None] | None = None,
                       keys: tuple[str, ...] | None = None) -> list[Entry]:
    """One conditioning entry per caption (`family.encode_text` output row, fp32 on the CPU).

    `ensure_encoders()` puts the encoders on the device; it is called once, before the first caption
    that is not found on disk. `autocast` is a context manager factory for the encoders' precision.
    `keys`: only these conditioning tensors (e.g. Flux's T5 output while CLIP-L trains); None: all.
    """
    part = {} if keys is None else {"keys": keys}
    identity = family.text_identity(bundle, clip_skip, **part) if disk_dir is not None else None
    entries: list[Entry | None] = [None] * len(captions)
    if identity is not None:
        disk_dir.mkdir(parents=True, exist_ok=True)
        for i, caption in enumerate(captions):
            entries[i] = _from_disk(disk_dir / f"{cache_key(caption, identity)}.safetensors")
    todo = [i for i, e in enumerate(entries) if e is None]
    if todo and ensure_encoders is not None:
        ensure_encoders()
    unique: dict[str, list[int]] = {}
    for i in todo:
        unique.setdefault(captions[i], []).append(i)
    texts = list(unique)
    done = len(captions) - len(todo)
    for start in range(0, len(texts), TEXT_BATCH):  # batched: one call per chunk, not per caption
        chunk = texts[start:start + TEXT_BATCH]
        with torch.no_grad(), (autocast() if autocast is not None else _null()):
            out = family.encode_text(bundle, chunk, clip_skip=clip_skip, **part)
        out = {k: v.float().cpu() for k, v in out.items()}
        for row, text in enumerate(chunk):
            entry = {k: v[row] for k, v in out.items()}
            for i in unique[text]:
                entries[i] = entry
            if identity is not None:
                _to_disk(disk_dir / f"{cache_key(text, identity)}.safetensors", entry)
            done += len(unique[text])
        if progress:
            progress(done, len(captions))
    return [e for e in entries if e is not None]


def _from_disk(path: Path) -> Entry | None:
    from safetensors import safe_open  # not load_file: Forge renames files load_file fails on

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except Exception:  # noqa: BLE001 - half-written or foreign file: recompute it
        log.warning("text cache file %s is unreadable; recomputing it", path.name)
        return None


def _to_disk(path: Path, entry: Entry) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in entry.items()}, str(tmp))
    os.replace(tmp, path)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
