"""What a checkpoint is: family, prediction type, or a clear reason why we cannot train on it.

Works on key names and shapes only (a safetensors header is enough), so a wrong file is refused
before gigabytes are read. Messages are one sentence of cause and one of remedy.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import UnsupportedModelError
from .bundle import EPSILON, V_PREDICTION, Family
from .ldm_convert import SD1_TEXT_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT1_PREFIX, SDXL_TEXT2_PREFIX, UNET_PREFIX

_REMEDY = ("choose an SD1.x, SD2.x, SDXL or FLUX.1 base model (.safetensors, .ckpt or a diffusers folder; "
           "quantised files: the bf16/fp16/fp8 .safetensors of the same model).")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F16, BF16, F32, F8_E4M3, U8, ...


def unsupported(what: str, name: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{name} is {what}, which LoRA Trainer cannot train on; {_REMEDY}")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names/shapes/dtypes and metadata from the header; checks the file is complete."""
    name = Path(path).name
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _not_readable(name)
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > min(size - 8, 100_000_000):
            raise _not_readable(name)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _not_readable(name) from None
    if not isinstance(header, dict):
        raise _not_readable(name)
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for key, info in header.items():
        try:
            tensors[key] = TensorInfo(tuple(info["shape"]), str(info["dtype"]))
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise _not_readable(name) from None
    if 8 + n + end > size:
        raise UnsupportedModelError(
            f"{name} is truncated ({size:,} of {8 + n + end:,} bytes); download or copy it again.")
    return tensors, metadata


def _not_readable(name: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{name} is not a readable model file (it is truncated, corrupt or another kind of file); "
        "download or copy it again, or choose another checkpoint.")


def is_gguf(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


_LORA_MARKERS = (".lora_down.", ".lora_up.", "lora_A.", "lora_B.", ".hada_w1_a", ".lokr_w1", ".oft_blocks",
                 ".lora.down.", ".lora.up.", ".diff_b", ".dora_scale")
_QUANT_MARKERS = (".absmax", ".quant_map", ".quant_state", ".nested_absmax", ".SCB", ".weight_format",
                  ".scale_weight", ".qweight", ".qzeros")
_QUANT_DTYPES = {"F8_E4M3", "F8_E5M2", "F8_E4M3FN", "F8_E5M2FNUZ", "F8_E4M3FNUZ", "U8", "I8", "U4", "I4"}


def classify(tensors: Mapping[str, TensorInfo], name: str) -> Family:
    """The family of an LDM/SGM checkpoint, or UnsupportedModelError naming what the file is."""
    keys = list(tensors)
    if not keys:
        raise unsupported("an empty file (no tensors)", name)
    has = tensors.__contains__

    def any_key(*needles: str) -> bool:
        return any(n in k for k in keys for n in needles)

    def starts(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any_key(*_LORA_MARKERS) or starts("lora_unet_") or starts("lora_te"):
        raise UnsupportedModelError(
            f"{name} is a LoRA/LyCORIS network, not a model; put it in models/Lora and choose an "
            "SD1.x, SD2.x or SDXL base checkpoint as the model to train on.")
    if (has("emb_params") or starts("string_to_param")
            or (len(keys) <= 4 and set(keys) & {"clip_l", "clip_g"})):
        raise UnsupportedModelError(
            f"{name} is a textual-inversion embedding, not a model; choose a checkpoint from "
            "models/Stable-diffusion as the model to train on.")
    if any_key(*_QUANT_MARKERS) or any(
            t.dtype in _QUANT_DTYPES and len(t.shape) >= 2 for k, t in tensors.items() if k.endswith("weight")):
        raise unsupported("a quantised checkpoint (fp8/nf4/int8 weights)", name)
    if any_key("joint_blocks.", "x_embedder.proj"):
        raise unsupported("a Stable Diffusion 3 model", name)
    if any_key("double_blocks.", "single_blocks.", "img_in.weight"):
        raise unsupported("a Flux model", name)
    if any_key("input_hint_block", "control_model."):
        raise unsupported("a ControlNet", name)
    if has("conditioner.embedders.0.model.ln_final.weight") or (
            starts("conditioner.embedders.0.model.") and not starts(SDXL_TEXT1_PREFIX)):
        raise unsupported("an SDXL refiner", name)
    if starts("depth_model."):
        raise unsupported("a depth-conditioned SD2 model", name)
    if starts("embedder.model."):
        raise unsupported("an SD2 unCLIP model", name)

    if not starts(UNET_PREFIX):
        if (starts("encoder.") and starts("decoder.") and not starts("down_blocks.")) or (
                starts("first_stage_model.") and len({k.split(".")[0] for k in keys}) == 1):
            raise UnsupportedModelError(
                f"{name} is a VAE alone, not a whole model; choose a full checkpoint as the model "
                "(a separate VAE is not needed).")
        if starts("down_blocks.") or starts("text_model.") or starts("mid_block."):
            raise unsupported("a single diffusers-format component, not a whole model", name)
        raise unsupported("not a Stable Diffusion checkpoint (no UNet weights)", name)

    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(
            conv_in.shape[1], f"a UNet with {conv_in.shape[1]} input channels")
        raise unsupported(kind, name)

    if starts(SDXL_TEXT2_PREFIX):
        family = Family.SDXL
        if not starts(SDXL_TEXT1_PREFIX):
            raise unsupported("an SDXL model without its first text encoder", name)
    elif starts(SD2_TEXT_PREFIX):
        family = Family.SD2
    elif starts(SD1_TEXT_PREFIX):
        family = Family.SD1
    else:
        raise UnsupportedModelError(
            f"{name} has no text encoder weights (a UNet-only file); choose a full checkpoint that "
            "includes its text encoder and VAE.")
    if not starts("first_stage_model."):
        raise UnsupportedModelError(
            f"{name} has no VAE weights; choose a checkpoint with the VAE baked in.")
    return family


def prediction_hint(tensors: Mapping[str, TensorInfo], family: Family) -> str | None:
    """v-prediction markers some files carry (A1111/Forge read `v_pred`); None when unknown."""
    if "v_pred" in tensors:
        return V_PREDICTION
    if family is Family.SD1:
        return EPSILON
    return None
