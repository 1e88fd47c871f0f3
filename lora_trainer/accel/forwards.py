"""Swap a module's forward for a leaner one in place, and put peft's/torch's own back.

The replacement is an instance attribute bound with `types.MethodType`, so deleting it restores
the class's forward; a marker attribute says which lever set it (norms, fused LoRA).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import nn


def replace_forwards(model: nn.Module, choose: Callable[[nn.Module], Callable[..., Any] | None],
                     marker: str) -> int:
    """Bind `choose(module)` as the forward of every module it returns one for; returns how many."""
    n = 0
    for module in model.modules():
        fwd = choose(module)
        if fwd is None:
            continue
        module.forward = types.MethodType(fwd, module)
        setattr(module, marker, True)
        n += 1
    return n


def restore_forwards(model: nn.Module, marker: str) -> int:
    """Undo `replace_forwards(..., marker)`; returns how many modules got their own forward back."""
    n = 0
    for module in model.modules():
        if module.__dict__.pop(marker, False):
            module.__dict__.pop("forward", None)
            n += 1
    return n
