"""What Forge's loaded Flux engine holds, read by attribute (Forge main and Neo): which engine it is and
whether we can train it, its parts (transformer, CLIP-L, T5, VAE; Chroma: no CLIP-L) and how each is stored, our
`FluxParams` / `ChromaParams` from the transformer, and a live view of one Forge Linear's stored weight (`layer_weight`).

Chroma (Neo's and Forge main's `Chroma` engine, `backend/diffusion_engine/chroma.py`): the same objects as Flux with
`clip.cond_stage_model.t5xxl` only, and an `IntegratedChromaTransformer2DModel` in BFL layout whose modulation comes
from `distilled_guidance_layer` (in_proj, layers.N.in_layer/out_layer, norms.N, out_proj) instead of per-block Linears.
`forge_flux` builds the trainable bundle from these; imports `backend.*` only for Forge's dequantisers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import quant
from ..errors import UnsupportedModelError
from ..models.bundle import Family
from . import forge_storage

FLUX_ENGINES = ("Flux",)  # Forge's diffusion-engine class names that hold Flux.1 dev/schnell
CHROMA_ENGINES = ("Chroma",)  # Neo's and Forge main's engine for Chroma


def is_flux(sd_model: Any) -> bool:
    """True when the loaded model is a Flux-architecture engine (Flux.1, Chroma, Flux.2)."""
    return type(sd_model).__name__ in (*FLUX_ENGINES, *CHROMA_ENGINES, "Flux2")


def is_chroma(sd_model: Any) -> bool:
    return type(sd_model).__name__ in CHROMA_ENGINES


def check_family(sd_model: Any) -> tuple[Family, str]:
    """(family, variant) of a Flux engine, or a one-sentence refusal for what we cannot train yet."""
    kind = type(sd_model).__name__
    if kind in CHROMA_ENGINES:
        return Family.CHROMA, ""
    if kind not in FLUX_ENGINES:
        raise UnsupportedModelError(
            f"The loaded model ({kind}) is not FLUX.1, Chroma, SD1, SD2 or SDXL, the families LoRA Trainer "
            "supports; "
            "load one of those in the checkpoint menu.")
    if _neo_kontext():
        raise UnsupportedModelError(
            "The loaded model is FLUX.1 Kontext, an image-editing model LoRA Trainer does not train yet; load a "
            "FLUX.1 dev or schnell checkpoint.")
    cfg = _config(transformer_of(sd_model))
    variant = "dev" if cfg.get("guidance_embed", True) else "schnell"
    return Family.FLUX1, variant


def _neo_kontext() -> bool:
    try:
        from backend.args import dynamic_args
    except ImportError:
        return False
    return bool(dynamic_args.get("kontext", False)) if isinstance(dynamic_args, dict) else False


# ---------------------------------------------------------------- Forge's parts
def transformer_of(sd_model: Any) -> nn.Module:
    return sd_model.forge_objects_original.unet.model.diffusion_model


def text_encoders_of(sd_model: Any) -> tuple[nn.Module, ...]:
    """(Forge's CLIP-L IntegratedCLIP, Forge's IntegratedT5); for Chroma (IntegratedT5,)."""
    keys, files = (("t5xxl",), "T5 file") if is_chroma(sd_model) else (("clip_l", "t5xxl"), "CLIP-L and T5 files")
    joint = dict(sd_model.forge_objects_original.clip.cond_stage_model.named_children())
    missing = [k for k in keys if k not in joint]
    if missing:
        raise UnsupportedModelError(
            f"The loaded {'Chroma' if is_chroma(sd_model) else 'Flux'} model has no {' or '.join(missing)} text "
            f"encoder; select the {files} in the VAE / Text Encoder menu and generate once, or train from the "
            "model file.")
    return tuple(joint[k] for k in keys)


def vae_of(sd_model: Any) -> nn.Module:
    return sd_model.forge_objects_original.vae.first_stage_model


def parts_of(sd_model: Any) -> dict[str, nn.Module]:
    """{"transformer", "CLIP-L" (not for Chroma), "T5", "VAE"}: Forge's modules."""
    *clip_l, t5 = text_encoders_of(sd_model)
    parts = {"transformer": transformer_of(sd_model)}
    if clip_l:
        parts["CLIP-L"] = clip_l[0]
    return {**parts, "T5": t5, "VAE": vae_of(sd_model)}


def storage_report(sd_model: Any) -> forge_storage.StorageReport:
    """How each part's weights are stored, e.g. "transformer: fp8 e4m3fn; CLIP-L: fp16; T5: fp8 e4m3fn; VAE: bf16"."""
    fo = sd_model.forge_objects_original
    parts = parts_of(sd_model)
    report = forge_storage.probe(parts)
    # bitsandbytes converts a bf16 file's weights to nf4 only when they first reach the GPU:
    # Forge's storage_dtype says what the transformer will be stored as.
    declared = getattr(fo.unet.model, "storage_dtype", None) or getattr(transformer_of(sd_model), "storage_dtype", None)
    if isinstance(declared, str) and declared in ("nf4", "fp4") and declared not in report.parts["transformer"]:
        report.parts["transformer"] = Counter({declared: sum(report.parts["transformer"].values())})
        report.examples[("transformer", declared)] = "(Forge's storage_dtype)"
    return report


def _config(transformer: nn.Module) -> dict[str, Any]:
    cfg = getattr(transformer, "config", None)
    if cfg is None:
        return {}
    return dict(cfg) if not isinstance(cfg, dict) else cfg


_FLUX2_OPTIONS = ("global_modulation", "mlp_silu_act", "yak_mlp", "txt_norm")  # Neo's Flux.2 switches


def flux_params(transformer: nn.Module):
    """Our FluxParams (ChromaParams for a Chroma transformer) from Forge's transformer: its block lists and
    widths, and its config dict (huggingface_guess's unet_config: latent `in_channels` 16 for Flux in Forge, the
    2x2 patch is ours; Chroma's modules say 64 themselves)."""
    from ..models.flux.chroma import ChromaParams
    from ..models.flux.model import FluxParams

    cfg = _config(transformer)
    if any(cfg.get(k) for k in _FLUX2_OPTIONS):
        raise UnsupportedModelError(
            "The loaded model is a FLUX.2-style transformer, which LoRA Trainer cannot train yet; load a FLUX.1 dev "
            "or schnell checkpoint.")
    try:
        patch = int(cfg.get("patch_size", 2))
        hidden = int(getattr(transformer, "hidden_size", None) or cfg["hidden_size"])
        in_channels = int(getattr(transformer, "in_channels", None) or int(cfg["in_channels"]) * patch * patch)
        common: dict[str, Any] = {
            "in_channels": in_channels, "out_channels": int(getattr(transformer, "out_channels", None) or in_channels),
            "context_in_dim": int(cfg.get("context_in_dim", 4096)), "hidden_size": hidden,
            "mlp_ratio": float(cfg.get("mlp_ratio", 4.0)),
            "num_heads": int(getattr(transformer, "num_heads", None) or cfg["num_heads"]),
            "depth": len(transformer.double_blocks), "depth_single_blocks": len(transformer.single_blocks),
            "axes_dim": tuple(int(a) for a in cfg.get("axes_dim", (16, 56, 56))),
            "theta": int(cfg.get("theta", 10_000)), "qkv_bias": bool(cfg.get("qkv_bias", True))}
        approximator = getattr(transformer, "distilled_guidance_layer", None)
        if approximator is not None:  # Chroma: sizes as Neo (attributes) or Forge main (guidance_* config) name them
            return ChromaParams(
                **common, approximator_in_dim=int(getattr(transformer, "in_dim", None) or cfg.get("in_dim", 64)),
                approximator_hidden_size=int(getattr(transformer, "hidden_dim", None) or cfg.get("hidden_dim")
                                             or cfg["guidance_hidden_dim"]),
                approximator_depth=len(approximator.layers))
        return FluxParams(**common, vec_in_dim=int(cfg.get("vec_in_dim", 768)),
                          guidance_embed=bool(cfg.get("guidance_embed", True)))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise UnsupportedModelError(
            f"The loaded transformer's configuration is not what LoRA Trainer expects ({e!r}); train from the "
            "model file instead.") from None


# ---------------------------------------------------------------- one Linear's weight
def dequantizer(fmt: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Forge's own function for a low-bit format (None: a plain cast is enough)."""
    if fmt.startswith("gguf"):
        from backend.operations_gguf import dequantize_tensor

        return dequantize_tensor
    if fmt in ("nf4", "fp4", "nf4/fp4"):
        from backend.operations_bnb import functional_dequantize_4bit

        return functional_dequantize_4bit
    if fmt == "int8":
        return lambda t: t.to(torch.float32)  # Neo's int8: times `weight_scale`, applied as the scale
    return None


def layer_weight(layer: nn.Module, shape: torch.Size, *, what: str) -> quant.FrozenWeight:
    """A live view of one Forge Linear's stored weight, dequantised as Forge does."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedModelError(
            f"The loaded model's {what} has no weight, so Forge loaded the model incompletely (its console lists the "
            "keys after 'Missing:'); load a complete FLUX.1 dev or schnell checkpoint with its text encoders.")
    fmt = forge_storage.tensor_format(weight, layer)
    if fmt == forge_storage.SVDQ or "svdq" in type(layer).__name__.lower():
        raise UnsupportedModelError(
            "The loaded model is a Nunchaku SVDQ model, whose packed weights LoRA Trainer cannot train over; load "
            "the fp16/bf16, fp8, nf4 or GGUF version of it.")
    plain = fmt.removesuffix(" scaled")
    known = forge_storage.is_trainable(plain) or fmt.startswith(("fp8", "gguf")) or fmt in ("nf4", "fp4", "int8")
    if not known:
        raise UnsupportedModelError(
            f"The loaded model's {what} is stored as {fmt}, which LoRA Trainer cannot read yet; set 'Diffusion in "
            "Low Bits' to Automatic or load an fp16/bf16, fp8, nf4 or GGUF model.")
    scale: Callable[[], Any] | None = None
    if getattr(layer, "scale_weight", None) is not None:  # Forge scales any stored weight that has one
        scale = lambda: getattr(layer, "scale_weight", None)  # read at each use, as Forge does
    elif fmt == "int8":
        scale = lambda: getattr(layer, "weight_scale", None)
    return quant.HostWeight(lambda: layer.weight, dequantizer(fmt), shape=shape, format=fmt, scale=scale)
