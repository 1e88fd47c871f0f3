"""Keep Python's cyclic garbage collector off the objects that live through a whole training run.

A full collection walks every object the process tracks. With torch, diffusers and transformers
imported that is 250,000-400,000 objects, 0.25-0.45 s per collection on the 2-core development CPU
(more inside a WebUI, whose own heap is larger), paid at each memory clean-up of the engine and at each
automatic full collection while those libraries import: 0.7-0.9 s of CPU per CLI run there, under load
up to 3.5 s of wall clock (`bench/results/startup_cpu.md`). Modules, classes and model weights stay
alive for the whole run, so those walks are wasted.

`gc.freeze()` moves every object alive now into a permanent generation that collections skip;
`gc.unfreeze()` gives them back. Reference counting, which frees nearly everything (tensors,
activations, batches), works as before; only reference *cycles* among frozen objects wait for the
end of the run, when the outermost `run_scope` unfreezes and the engine's last clean-up collects.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # run scopes open in this process (a WebUI may run a job while another thread starts one)


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """One training run: what exists at its start is frozen; the outermost scope unfreezes at its end."""
    global _depth
    with _lock:
        _depth += 1
        gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()


def thaw() -> None:
    """Unfreeze now, inside the outermost scope only (before the engine's final clean-up, so cycles among
    the run's own frozen objects, e.g. a model it loaded, are collected then). Inside an outer scope
    (the CLI's: the process ends with the run) that walk is left out; the outer scope unfreezes at its end."""
    with _lock:
        if _depth <= 1:
            gc.unfreeze()


@contextlib.contextmanager
def building() -> Iterator[None]:
    """Heavy imports and model building: they create long-lived objects, not garbage, so no automatic
    collection runs meanwhile, and what they built is frozen afterwards (else the next young-generation
    collection would walk all of it). Outside a run scope it stays frozen until a scope ends: use it
    there only for what lives as long as the process (the CLI importing torch and the engine)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def frozen_count() -> int:
    """Objects in the permanent generation (for tests)."""
    return gc.get_freeze_count()
