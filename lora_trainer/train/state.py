"""Resumable training state: everything needed to continue a stopped run as if it never stopped.

One folder `<output>/<name>-state/` with `state.safetensors` (LoRA weights in fp32, optimizer, LR
schedule, loss scaler, RNG states of python/numpy/torch/CUDA, position in the data order,
step/epoch, loss history, files already written) and `config.json` (the settings, for people and
for resume).

Not `torch.save`/`torch.load`: both WebUIs patch `torch.load` (A1111's `modules/safe.py` refuses
archives whose inner names it does not know and returns None; Forge renames files it fails on).
The tensors go into a safetensors file, the structure around them into its metadata as JSON.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError

STATE_FILE = "state.safetensors"
FORMAT = 2
_META_KEY = "lora_trainer_state"


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # index of the epoch in progress (0-based)
    chunk: int = 0  # next accumulation group of batches inside that epoch
    losses: list[float] = field(default_factory=list)
    smoothed: float | None = None
    saved: list[str] = field(default_factory=list)  # LoRA files this run wrote (may be rewritten on resume)
    report: dict[str, Any] = field(default_factory=dict)  # "did it learn?" so far (train/report.py)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda":
            # the training GPU's stream by itself: a run resumed on other GPUs (another process count,
            # each rank on its own device) continues it there
            state["cuda_train"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        if "cuda_train" in state and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_train"], device)


def save_state(folder: Path, *, config_hash: str, config_json: str, lora: dict[str, torch.Tensor],
               optimizer, scheduler, scaler, position: Position, device: torch.device | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config_hash": config_hash,
        "lora": {k: v.detach().float().cpu().contiguous() for k, v in lora.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(device),
        "position": {"step": position.step, "epoch": position.epoch, "chunk": position.chunk,
                     "losses": list(position.losses), "smoothed": position.smoothed,
                     "saved": list(position.saved), "report": position.report},
    }
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(payload, tensors)
    tmp = folder / f".{STATE_FILE}.{os.getpid()}.tmp"
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(skeleton)})
    os.replace(tmp, folder / STATE_FILE)
    cfg_tmp = folder / f".config.json.{os.getpid()}.tmp"
    cfg_tmp.write_text(config_json, encoding="utf-8")
    os.replace(cfg_tmp, folder / "config.json")
    return folder


def load_state(folder: str | os.PathLike[str], config_hash: str) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        older = " (it was written by an older version; start a new run)" if (Path(folder) / "state.pt").is_file() else ""
        raise ConfigError(f"{folder} holds no {STATE_FILE}{older}; pass the <name>-state folder written by "
                          "the stopped run.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            skeleton = json.loads((f.metadata() or {})[_META_KEY])
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
        payload = _decode(skeleton, tensors)
    except Exception as e:
        raise ConfigError(f"Resume state {path} cannot be read ({e.__class__.__name__}); "
                          "start a new run without --resume.") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"Resume state {path} was written by another version; start a new run.")
    if payload["config_hash"] != config_hash:
        raise ConfigError("The resume state was saved with different training settings; resume with the "
                          f"settings in {Path(folder) / 'config.json'} (e.g. --config that file).")
    return payload


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `value`, its tensors moved into `tensors` (dict keys and tuples keep their types)."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        t = value.detach()
        tensors[key] = t.cpu().contiguous() if t.device.type != "cpu" else t.clone().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a resume state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def position_from(payload: dict[str, Any]) -> Position:
    p = payload["position"]
    return Position(step=p["step"], epoch=p["epoch"], chunk=p["chunk"], losses=list(p["losses"]),
                    smoothed=p["smoothed"], saved=list(p["saved"]), report=p.get("report") or {})
