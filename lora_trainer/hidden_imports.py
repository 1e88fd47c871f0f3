"""bitsandbytes kept out of sight of the libraries a CLI run imports, until our own code asks for it.

diffusers (its quantizers, imported by every diffusers model) and peft (its LoRA layer dispatch) import
bitsandbytes whenever it is installed, and bitsandbytes >= 0.45 wraps its kernels in `torch.compile` at
import, which imports `torch._inductor`: 1.0 s of a 3.7 s CPU run of the CLI on the development machine
(bench/results/startup_cpu.md). A run needs it only for the bitsandbytes optimizers and nf4 weights,
and imports it for those through `require_bitsandbytes`; the libraries' own bitsandbytes integrations
(quantized `from_pretrained`, peft's bnb LoRA layers over `bnb.nn.Linear4bit`) are never used by a run.

So the CLI's `train` hides it when its optimizer does not use it: `sys.modules["bitsandbytes"] = None`,
which `importlib.util.find_spec` answers with None and `import` with ImportError, the two ways those
libraries check for it. `require_bitsandbytes` takes the entry away again, after which it imports as
usual (the libraries keep believing it absent: they need not know). A package already imported, or not
installed, is left alone. Never used inside a WebUI: the host's process is the host's.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

BITSANDBYTES = "bitsandbytes"
# optimizers that import bitsandbytes (Lion: where lion-pytorch is missing); train/optim.py
BITSANDBYTES_OPTIMIZERS = frozenset({"AdamW8bit", "Lion8bit", "Lion"})

_lock = threading.Lock()
_hidden: set[str] = set()


def hide_bitsandbytes(optimizer: str) -> bool:
    """Hide an installed, not yet imported bitsandbytes unless `optimizer` uses it. True: hidden."""
    if optimizer in BITSANDBYTES_OPTIMIZERS:
        return False
    with _lock:
        if BITSANDBYTES in sys.modules:
            return False
        try:
            if importlib.util.find_spec(BITSANDBYTES) is None:
                return False
        except (ImportError, ValueError):
            return False
        sys.modules[BITSANDBYTES] = None  # type: ignore[assignment]
        _hidden.add(BITSANDBYTES)
        return True


def require_bitsandbytes() -> None:
    """Before our own code imports bitsandbytes: undo `hide_bitsandbytes` (nothing otherwise)."""
    with _lock:
        if BITSANDBYTES in _hidden:
            _hidden.discard(BITSANDBYTES)
            if BITSANDBYTES in sys.modules and sys.modules[BITSANDBYTES] is None:
                del sys.modules[BITSANDBYTES]


def is_hidden() -> bool:
    return BITSANDBYTES in _hidden
