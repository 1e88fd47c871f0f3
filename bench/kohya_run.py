#!/usr/bin/env python3
"""Run kohya sd-scripts' `train_network.py`, `sdxl_train_network.py` or `flux_train_network.py` in this process, exactly as
its own `__main__` does, and write when each phase and each training step happened.

Run it from an sd-scripts checkout (its `library` must import) with sd-scripts' own package
versions first on PYTHONPATH; nothing of sd-scripts is in this repository. Times are absolute
(`time.time()`), so the caller can measure from the moment it started the process.

    python kohya_run.py RESULT.json train_network.py -- <train_network.py arguments>

RESULT.json: `steps` (start of every training step, after a CUDA sync: the interval between two is
one whole step, data loading included), `phases` (name -> [start, end] of model loading, latent
caching, text caching), `peak_reserved_gib` / `peak_allocated_gib` over the process, `error`.
"""

from __future__ import annotations

import json
import os
import sys
import time

T_START = time.time()
out_json, script = sys.argv[1], sys.argv[2]
assert sys.argv[3] == "--", "usage: kohya_run.py RESULT.json SCRIPT -- ARGS"
sys.argv = [script] + sys.argv[4:]
sys.path.insert(0, os.getcwd())

import torch

module_name = os.path.splitext(os.path.basename(script))[0]
trainer_module = __import__(module_name)
train_network = __import__("train_network")
train_util = train_network.train_util
T_IMPORTED = time.time()

steps: list[float] = []
phases: dict[str, list[float]] = {}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_phase(owner, name: str, label: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            _sync()
            phases.setdefault(label, [start, time.time()])

    setattr(owner, name, wrapper)


original_batch = train_network.NetworkTrainer.process_batch


def timed_batch(self, *args, **kwargs):
    if kwargs.get("is_train", True):
        _sync()
        steps.append(time.time())
    return original_batch(self, *args, **kwargs)


train_network.NetworkTrainer.process_batch = timed_batch
trainer_class = next((getattr(trainer_module, n) for n in ("SdxlNetworkTrainer", "FluxNetworkTrainer")
                      if hasattr(trainer_module, n)), train_network.NetworkTrainer)
timed_phase(trainer_class, "load_target_model", "load model")
timed_phase(train_util.DatasetGroup, "new_cache_latents", "cache latents")
timed_phase(trainer_class, "cache_text_encoder_outputs_if_needed", "cache text")

error = None
try:
    parser = trainer_module.setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer_class().train(args)
except BaseException as e:  # noqa: BLE001 - recorded for the caller
    import traceback

    traceback.print_exc()
    error = f"{type(e).__name__}: {e}"[:500]
_sync()
result = {"t_start": T_START, "t_imported": T_IMPORTED, "t_end": time.time(), "steps": steps, "phases": phases,
          "error": error}
if torch.cuda.is_available():
    result.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                  peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3))
with open(out_json, "w") as f:
    json.dump(result, f)
sys.exit(1 if error else 0)
