"""Optimisers and learning-rate schedules from maintained libraries.

Optional packages are checked before training starts so a missing one fails in the first second.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

import torch

from ..errors import MissingPackageError
from ..hidden_imports import BITSANDBYTES_OPTIMIZERS, require_bitsandbytes

log = logging.getLogger(__name__)

# optimizer -> (package to install, import name), for the optional ones (AdamW8bit: bitsandbytes where it
# imports, else our own 8-bit AdamW in train/adamw8bit.py)
_OPTIONAL = {
    "Lion8bit": ("bitsandbytes", "bitsandbytes"),
    "Prodigy": ("prodigyopt", "prodigyopt"),
}


def check_optimizer_available(name: str) -> None:
    if name in BITSANDBYTES_OPTIMIZERS:
        require_bitsandbytes()  # the CLI does not hide it for these; in case a caller did (hidden_imports.py)
    if name in _OPTIONAL:
        package, module = _OPTIONAL[name]
        if importlib.util.find_spec(module) is None:
            raise MissingPackageError(package, f"The {name} optimizer")
    if name == "Lion" and not (importlib.util.find_spec("lion_pytorch") or importlib.util.find_spec("bitsandbytes")):
        raise MissingPackageError("lion-pytorch", "The Lion optimizer")


def bitsandbytes_works() -> bool:
    """bitsandbytes imports (it may be installed without a usable build for this machine)."""
    require_bitsandbytes()
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken native library raises anything
        log.warning("bitsandbytes is installed but does not import; AdamW8bit uses lora_trainer's own")
        return False
    return True


def build_optimizer(name: str, groups: list[dict[str, Any]], *, lr: float, weight_decay: float,
                    args: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """`args`: the user's optimizer_args; `extra`: torch AdamW kwargs from accel (fused/capturable)."""
    check_optimizer_available(name)
    args = dict(args or {})
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    if name == "AdamW":
        for key, value in (extra or {}).items():
            args.setdefault(key, value)
        if on_cuda and "fused" not in args:
            args["fused"] = True
        try:
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **args)
        except (RuntimeError, TypeError):  # fused kernel unavailable for this torch/device
            args.pop("fused", None)
            args.pop("capturable", None)
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "AdamW8bit":
        if bitsandbytes_works():
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay, **args)
        from .adamw8bit import AdamW8bit

        log.info("AdamW8bit: bitsandbytes is not available here; using lora_trainer's own 8-bit AdamW")
        return AdamW8bit(groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "Lion8bit":
        import bitsandbytes as bnb

        return bnb.optim.Lion8bit(groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "Lion":
        if importlib.util.find_spec("lion_pytorch"):
            from lion_pytorch import Lion

            return Lion(groups, lr=lr, weight_decay=weight_decay, **args)
        import bitsandbytes as bnb

        return bnb.optim.Lion(groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "Prodigy":
        from prodigyopt import Prodigy

        # the settings its authors give for fine-tuning with a warm-up (kohya's LoRA guides use them too)
        args.setdefault("use_bias_correction", True)
        args.setdefault("safeguard_warmup", True)
        return Prodigy(groups, lr=lr, weight_decay=weight_decay, **args)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate needs relative_step off (kohya does the same).
        args.setdefault("relative_step", False)
        args.setdefault("scale_parameter", False)
        args.setdefault("warmup_init", False)
        return Adafactor(groups, lr=lr, weight_decay=weight_decay, **args)
    raise ValueError(name)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0):
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
