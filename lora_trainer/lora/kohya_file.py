"""Reading and writing kohya LoRA files: atomic save with kohya's hashes, load, and a quick reader
that tells which model family a file is for (from its metadata, else from its keys and shapes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.bundle import FLOW, V_PREDICTION, Family
from .errors import LoraFileError

log = logging.getLogger(__name__)


# -- kohya's hashes (library/train_util.py) --------------------------------------------------
def addnet_hash_safetensors(b: io.BufferedIOBase) -> str:
    """sha256 of everything after the safetensors header (sd-webui-additional-networks' hash)."""
    sha = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        sha.update(chunk)
    return sha.hexdigest()


def addnet_hash_legacy(b: io.BufferedIOBase) -> str:
    """Old additional-networks hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    sha = hashlib.sha256()
    b.seek(0x100000)
    sha.update(b.read(0x10000))
    return sha.hexdigest()[0:8]


def precalculate_safetensors_hashes(tensors: Mapping[str, torch.Tensor],
                                    metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya computes them: over the file that holds
    only the `ss_*` metadata, so later user metadata edits do not change them."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = io.BytesIO(save(dict(tensors), ss_only))
    return addnet_hash_safetensors(b), addnet_hash_legacy(b)


# -- save / load -----------------------------------------------------------------------------
def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad[:5]}")
    return dict(metadata)


def save_kohya(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str]) -> str:
    """Write a kohya LoRA .safetensors atomically (temp file in the same folder + os.replace),
    adding `sshs_model_hash`/`sshs_legacy_hash`. Returns the path written."""
    return publish_kohya(write_kohya_temp(path, state_dict, metadata), path)


def write_kohya_temp(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str]) -> str:
    """`save_kohya`'s work but the last rename: the file, with its hashes, written and synced to a hidden temp file
    beside `path` (no LoRA list shows it); `publish_kohya` renames it. Returns the temp file's path."""
    from safetensors.torch import save

    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = _check_metadata(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, metadata)
    data = save(tensors, metadata)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        written, tmp = tmp, None
        return written
    except OSError as e:
        raise _write_error(path, e) from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def publish_kohya(temp: str | os.PathLike, path: str | os.PathLike) -> str:
    """Rename a `write_kohya_temp` file to `path` (atomic: a reader sees the old file or the whole new one)."""
    try:
        os.replace(temp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise _write_error(Path(path), e) from e
    return str(path)


def _write_error(path: Path, e: OSError) -> LoraFileError:
    return LoraFileError(f"Cannot write the LoRA file {path} ({e.strerror or e}); "
                         "choose a folder you can write to with enough free space.")


def load_kohya_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA file (.safetensors, or a torch-saved .pt/.ckpt)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"The LoRA file {path} does not exist; check the path.")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            # safe_open, not safetensors.torch.load_file: Forge wraps load_file and renames any
            # file it fails on to *.corrupted.
            with safe_open(str(path), framework="pt") as f:
                names = list(f.keys())  # safe_open is not iterable
                return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        return dict(state), {}
    except Exception as e:  # safetensors/torch raise many types for damaged files
        raise LoraFileError(f"The LoRA file {path} cannot be read ({e}); re-download or re-export it.") from e


# -- which family is a file for --------------------------------------------------------------
@dataclass
class LoraFileInfo:
    path: str
    family: Family | None  # None when neither metadata nor keys tell
    prediction_type: str | None
    base_model_version: str | None
    rank: int | None
    alpha: float | None
    conv_rank: int | None
    has_unet: bool
    has_text_encoder: bool
    num_modules: int
    title: str | None
    trigger_phrase: str | None
    metadata: dict[str, str] = field(default_factory=dict)


_CONTEXT_DIMS = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}


# (metadata key, (value prefix, family) in the order they are tried): kohya's version first, then modelspec's.
_FAMILY_PREFIXES = (
    ("ss_base_model_version", (("flux", Family.FLUX1), ("chroma", Family.CHROMA), ("sdxl", Family.SDXL),
                               ("sd_v2", Family.SD2), ("sd_v1", Family.SD1))),
    ("modelspec.architecture", (("flux-1", Family.FLUX1), ("chroma", Family.CHROMA),
                                ("stable-diffusion-xl", Family.SDXL), ("stable-diffusion-v2", Family.SD2),
                                ("stable-diffusion-v1", Family.SD1))),
)


def family_from_metadata(metadata: Mapping[str, str]) -> Family | None:
    for key, prefixes in _FAMILY_PREFIXES:
        value = metadata.get(key, "")
        for prefix, family in prefixes:
            if value.startswith(prefix):
                return family
    return None


def family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> Family | None:
    """From the cross-attention context width (UNet attn2 to_k) or the text encoder width; Flux from
    its block names (`lora_unet_double_blocks_*` / `single_blocks_*`, kohya's and ComfyUI's naming)."""
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in shapes):
        return Family.FLUX1
    for key, shape in shapes.items():
        if key.startswith("lora_unet_") and "attn2_to_k" in key and key.endswith(".lora_down.weight"):
            return _CONTEXT_DIMS.get(shape[1])
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in shapes):
        return Family.SDXL
    for key, shape in shapes.items():
        if key.startswith("lora_te_") and "q_proj" in key and key.endswith(".lora_down.weight"):
            return {768: Family.SD1, 1024: Family.SD2}.get(shape[1])
    return None


def read_lora_info(path: str | os.PathLike) -> LoraFileInfo:
    """Header-only look at a LoRA file: family, prediction type, rank/alpha, parts, title."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"The LoRA file {path} does not exist; check the path.")
    if path.suffix.lower() != ".safetensors":
        tensors, metadata = load_kohya_file(path)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        alphas = {k: float(v.float().item()) for k, v in tensors.items() if k.endswith(".alpha")}
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                names = list(f.keys())  # safe_open is not iterable
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
                alphas = {k: float(f.get_tensor(k).float().item()) for k in names if k.endswith(".alpha")}
        except Exception as e:
            raise LoraFileError(f"The LoRA file {path} cannot be read ({e}); re-download or re-export it.") from e

    family = family_from_metadata(metadata) or family_from_shapes(shapes)
    if family is None and metadata.get("ss_v2") in ("True", "False"):
        family = Family.SD2 if metadata["ss_v2"] == "True" else Family.SD1
    version = metadata.get("ss_base_model_version") or None
    is_v = (version or "").endswith("_v") or metadata.get("modelspec.prediction_type") == "v" \
        or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v2-768-v")
    prediction = V_PREDICTION if is_v else ("epsilon" if family is not None else None)
    if family is not None and family.is_flux:
        prediction = FLOW

    downs = {k[: -len(".lora_down.weight")]: s for k, s in shapes.items() if k.endswith(".lora_down.weight")}
    linear = [s[0] for s in downs.values() if len(s) == 2 or tuple(s[2:]) == (1, 1)]
    conv = [s[0] for s in downs.values() if len(s) == 4 and tuple(s[2:]) != (1, 1)]

    def _num(key: str) -> float | None:
        try:
            return float(metadata[key])
        except (KeyError, ValueError):
            return None

    rank = int(_num("ss_network_dim")) if _num("ss_network_dim") else (max(linear) if linear else None)
    alpha = _num("ss_network_alpha")
    if alpha is None and downs:
        first = next(iter(downs))
        alpha = alphas.get(f"{first}.alpha", float(downs[first][0]))
    conv_rank = max(conv) if conv else None
    if conv_rank is None and metadata.get("ss_network_args"):
        try:
            conv_dim = json.loads(metadata["ss_network_args"]).get("conv_dim")
            conv_rank = int(conv_dim) if conv_dim is not None else None
        except (ValueError, TypeError, AttributeError):
            pass
    return LoraFileInfo(
        path=str(path),
        family=family,
        prediction_type=prediction,
        base_model_version=version,
        rank=rank,
        alpha=alpha,
        conv_rank=conv_rank,
        has_unet=any(k.startswith("lora_unet_") for k in downs),
        has_text_encoder=any(k.startswith("lora_te") for k in downs),
        num_modules=len(downs),
        title=metadata.get("modelspec.title") or metadata.get("ss_output_name") or None,
        trigger_phrase=metadata.get("modelspec.trigger_phrase") or None,
        metadata=metadata,
    )


def list_loras(folder: str | os.PathLike, recursive: bool = True) -> list[LoraFileInfo]:
    """`read_lora_info` of every .safetensors LoRA in a folder (subfolders too, like the WebUI's
    Lora folder); unreadable files are logged and left out."""
    folder = Path(folder)
    pattern = "**/*.safetensors" if recursive else "*.safetensors"
    infos = []
    for path in sorted(folder.glob(pattern)):
        try:
            infos.append(read_lora_info(path))
        except LoraFileError as e:
            log.warning("%s", e)
    return infos
