"""Load SD1/SD2/SDXL models into a ModelBundle: single files (LDM/SGM layout), diffusers folders,
or the WebUI's in-memory LDM state dict.

Modules are built on the meta device and the checkpoint's own tensors are assigned into them
(renamed, reshaped or sliced as views; `build.py`), so the weights exist once in memory; a tensor is
copied only when it must change dtype or device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsupportedModelError
from . import ldm_convert as lc
from .build import build_text_encoders, build_unet, build_vae, meta_modules
from .bundle import EPSILON, V_PREDICTION, Family, ModelBundle, Schedule
from .detect import (
    TensorInfo,
    classify,
    is_gguf,
    prediction_hint,
    read_safetensors_header,
    unsupported,
)
from .ldm_config import ModelConfig, TextEncoderSpec

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TORCH_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.uint8: "U8", torch.int8: "I8", torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _TORCH_TO_ST[getattr(torch, _name)] = _st


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device | None = "cpu", clip_l: str | os.PathLike | None = None,
               t5: str | os.PathLike | None = None, vae: str | os.PathLike | None = None) -> ModelBundle:
    """Load a checkpoint file (with an optional same-named `.yaml` beside it) or a diffusers folder.

    `dtype=None, device=None`: the modules hold the file's own tensors as stored, memory-mapped
    (`.safetensors`, zip `.ckpt`), so nothing is read or converted until a part is moved or cast
    (what the engine does, part by part, straight to the GPU: `train/placement.py`).
    Flux.1 files (and FluxPipeline folders) go to `models.flux.loader.load_flux`, with the separate
    `clip_l`/`t5`/`vae` files (None: the model's own, or found beside it)."""
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"Model {path} does not exist; check the path or pick the model again.")
    components = {"clip_l": clip_l, "t5": t5, "vae": vae}
    if _is_flux(path):
        from .flux.loader import load_flux

        return load_flux(path, **components, dtype=dtype, device=device)
    given = [f"--{k.replace('_', '-')}" for k, v in components.items() if v is not None]
    if given:
        raise UnsupportedModelError(
            f"{path.name} is not a Flux model, so {' and '.join(given)} cannot be used with it; leave "
            f"{'them' if len(given) > 1 else 'it'} out for SD models.")
    if path.is_dir():
        from .diffusers_folder import load_diffusers_folder

        return load_diffusers_folder(path, dtype=dtype, device=device)
    name = path.name
    if path.suffix.lower() == ".gguf" or is_gguf(path):
        raise unsupported("a GGUF (quantised) model", name)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise UnsupportedModelError(
            f"{name} is not a checkpoint file (.safetensors or .ckpt); choose a Stable Diffusion checkpoint.")
    state_dict = read_checkpoint(path)
    config = path.with_suffix(".yaml")
    bundle = _build_bundle(state_dict, config if config.is_file() else None, path.stem, name, str(path),
                           dtype, device)
    if path.stat().st_size <= _CHEAP_HASH_BYTES:
        bundle.model_hash = checkpoint_sha256(path)
    return bundle


def _is_flux(path: Path) -> bool:
    """A Flux file or FluxPipeline folder (refusals for Flux-like files that are not Flux.1 raise)."""
    if path.is_dir():
        index = path / "model_index.json"
        return index.is_file() and '"Flux' in index.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".sft":  # BFL's first releases used .sft for safetensors
        return True
    if path.suffix.lower() != ".safetensors":
        return False
    from .flux.detect import component_only_error, inspect

    tensors, _ = read_safetensors_header(path)
    info = inspect(tensors, path.name)
    if info is None:
        return False
    error = component_only_error(info, path.name)
    if error is not None:
        raise error
    return "transformer" in info.prefixes


def check_model_header(path: str | os.PathLike, *, clip_l: str | os.PathLike | None = None,
                       t5: str | os.PathLike | None = None, vae: str | os.PathLike | None = None) -> Family | None:
    """The family of a model file from headers alone (fast, before any heavy work), or an
    UnsupportedModelError of one sentence. Flux: also finds and checks its text encoders and VAE.
    None for what only loading can tell (.ckpt files, SD diffusers folders)."""
    p = Path(path)
    if not p.exists():
        raise UnsupportedModelError(f"Model {p} does not exist; check the path or pick the model again.")
    if _is_flux(p):
        from .flux.loader import check_diffusers, resolve_flux_files

        check_diffusers()
        if p.is_file():
            return resolve_flux_files(p, clip_l=clip_l, t5=t5, vae=vae).info.family
        return Family.FLUX1
    if p.is_file() and p.suffix.lower() == ".safetensors":
        return classify(read_safetensors_header(p)[0], p.name)
    return None


_CHEAP_HASH_BYTES = 256 * 2**20  # hash small files now; big ones on demand (checkpoint_sha256)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """A1111's model hash (sha256 of the whole file; the WebUI shows the first 10 characters)."""
    from ..hashing import sha256_file

    return sha256_file(path)


def legacy_model_hash(path: str | os.PathLike) -> str:
    """The old 8-character model hash (A1111 before 1.0, kohya's `ss_sd_model_hash`)."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# Only tensors under these prefixes are read (EMA copies, optimizer leftovers etc. are skipped).
_WANTED = (lc.UNET_PREFIX, lc.VAE_PREFIX, "cond_stage_model.", "conditioner.", "v_pred")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint, checked for family before the bulk is read."""
    name = path.name
    if path.suffix.lower() == ".safetensors":
        tensors, _ = read_safetensors_header(path)
        classify(tensors, name)  # refuse LoRAs, VAEs, SD3, ... from the header alone
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                    if key.startswith(_WANTED):
                        out[key] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise UnsupportedModelError(
                f"{name} could not be read ({exc}); download or copy it again.") from exc
        return out
    try:
        data = _torch_load(path)
    except Exception as exc:  # pickle/zip errors of many kinds
        text = str(exc)
        if "Weights only load failed" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise UnsupportedModelError(
                f"{name} contains Python objects besides weights, which are not loaded for safety; "
                "convert it to .safetensors or choose another checkpoint.") from exc
        raise UnsupportedModelError(
            f"{name} is not a readable checkpoint (it is truncated, corrupt or another kind of file); "
            "download or copy it again, or choose another checkpoint.") from exc
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise unsupported("not a Stable Diffusion checkpoint", name)
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            out[str(key)] = value
        elif isinstance(value, Mapping):  # embeddings: {"string_to_param": {"*": tensor}}
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    classify(tensor_infos(out), name)
    return out


def _torch_load(path: Path) -> Any:
    """torch.load, memory-mapped where the format and torch allow it (zip files, torch >= 2.1)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except TypeError:  # torch < 2.1: no mmap argument
        pass
    except RuntimeError as exc:  # legacy (non-zip) pickles cannot be memory-mapped
        if "mmap" not in str(exc):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def tensor_infos(state_dict: Mapping[str, Any]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(v.shape), _TORCH_TO_ST.get(v.dtype, str(v.dtype)))
            for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------- in-memory LDM state dict
def bundle_from_ldm_state_dict(state_dict: Mapping[str, torch.Tensor], *,
                               config: ModelConfig | Mapping | str | os.PathLike | None = None,
                               name: str = "model", source: str = "",
                               dtype: torch.dtype | None = None,
                               device: str | torch.device | None = None) -> ModelBundle:
    """Build a ModelBundle whose modules hold `state_dict`'s tensors (views; copies only to change
    dtype/device). `config`: a ModelConfig, a parsed A1111 yaml, a yaml path, or None (detect)."""
    return _build_bundle(state_dict, config, name, name, source, dtype, device)


def _build_bundle(state_dict, config, name: str, label: str, source: str, dtype, device) -> ModelBundle:
    """label: how messages name the model (the file name when loading a file)."""
    # transformers (for the tokenizer) only here: the header check (`check_model_header`) imports this module too
    from .tokenizers import PAD_ENDOFTEXT, PAD_EXCLAMATION, clip_tokenizer

    state_dict = _unwrap_host_keys(state_dict)
    family = classify(tensor_infos(state_dict), label)
    hint = prediction_hint(tensor_infos({k: state_dict[k] for k in ("v_pred",) if k in state_dict}), family)
    cfg = _resolve_config(config, family, label)
    if cfg.family is not family:
        raise UnsupportedModelError(
            f"{label} holds an {family.label} model but its config describes {cfg.family.label}; "
            "fix or remove the .yaml beside the checkpoint.")
    if config is None and hint is not None:
        cfg.prediction_type = hint
    unet = build_unet(cfg, state_dict, label, dtype, device)
    vae = build_vae(cfg, state_dict, label, dtype, device)
    encoders = build_text_encoders(cfg, state_dict, label, dtype, device)
    if config is None and hint is None and family is Family.SD2:
        cfg.prediction_type = V_PREDICTION if _sd2_is_v_prediction(unet) else EPSILON
    pads = {Family.SD1: [PAD_ENDOFTEXT], Family.SD2: [PAD_EXCLAMATION],
            Family.SDXL: [PAD_ENDOFTEXT, PAD_EXCLAMATION]}[family]
    return ModelBundle(
        family=family, prediction_type=cfg.prediction_type, unet=unet, vae=vae, text_encoders=encoders,
        tokenizers=[clip_tokenizer(p) for p in pads], schedule=cfg.schedule,
        scaling_factor=cfg.scaling_factor, name=name, source=source or "in-memory state dict")


def _unwrap_host_keys(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A1111's hijack wraps the text encoder (`cond_stage_model.wrapped.`, `token_embedding.wrapped.`)."""
    if not any(".wrapped." in k for k in state_dict):
        return state_dict
    return {k.replace(".wrapped.", "."): v for k, v in state_dict.items()}


def _resolve_config(config: Any, family: Family, name: str) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if config is None:
        return ModelConfig.bundled(family)
    base_dir = None
    if isinstance(config, (str, os.PathLike)):
        import yaml

        base_dir = os.path.dirname(os.path.abspath(config))
        try:
            with open(config, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except (OSError, yaml.YAMLError) as exc:
            raise UnsupportedModelError(
                f"The config {os.path.basename(config)} beside {name} cannot be read ({exc}); "
                "fix it or remove it.") from exc
        source = str(config)
    else:
        data, source = _plain(config), "yaml"
    try:
        return ModelConfig.from_yaml(data or {}, family, source=source, base_dir=base_dir)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise UnsupportedModelError(
            f"The config beside {name} cannot be used ({exc}); fix it or remove it to use the built-in "
            f"{family.label} config.") from exc


def _plain(config: Any) -> Any:
    """An OmegaConf config (what A1111 keeps as `sd_model.used_config`) as plain dicts and lists."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return config
    return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config


def _sd2_is_v_prediction(unet: Any) -> bool:
    """A1111's test for SD2 files without a yaml: a v model pushes the output far below the input."""
    param = next(unet.parameters())
    if param.device.type == "cpu" and param.dtype != torch.float32:
        unet.float()  # half-precision kernels are missing or slow on CPUs (only SD2 files without a yaml get here)
        param = next(unet.parameters())
    try:
        with torch.no_grad():
            x = torch.full((1, 4, 8, 8), 0.5, dtype=param.dtype, device=param.device)
            ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=param.dtype, device=param.device)
            out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=ctx).sample
            return bool((out.float() - x.float()).mean().item() < -1)
    except RuntimeError as exc:  # e.g. fp16 kernels missing on this CPU build
        log.warning("Could not test the SD2 model for v-prediction (%s); assuming epsilon.", exc)
        return False


__all__ = ["ModelConfig", "Schedule", "TextEncoderSpec", "bundle_from_ldm_state_dict", "check_model_header",
           "checkpoint_sha256",
           "legacy_model_hash", "load_model", "meta_modules", "read_checkpoint"]
