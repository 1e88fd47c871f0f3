"""Forge's loaded Flux.1 or Chroma -> a trainable Flux/Chroma ModelBundle over Forge's own weights (Forge main
and Neo).

What Forge holds (lllyasviel/stable-diffusion-webui-forge `backend/`; Forge Neo keeps the same objects):
`sd_model` is a `Flux` diffusion engine whose `forge_objects_original` has the transformer at
`unet.model.diffusion_model` (BFL layout: `double_blocks.N.img_attn.qkv`, ...; its `config` dict holds
hidden_size, depth, guidance_embed, ...), CLIP-L at `clip.cond_stage_model.clip_l.transformer` (a
transformers CLIPTextModel), T5-XXL at `clip.cond_stage_model.t5xxl.transformer` (Forge's own T5 with
transformers' parameter names) and an LDM-named AutoencoderKL at `vae.first_stage_model`. Every Linear
there is one of Forge's operation classes whose `weight` is stored as the user chose: fp16/bf16/fp32,
fp8 (with a `scale_weight` for fp8_scaled), bitsandbytes nf4/fp4, or GGUF (`ParameterGGUF`, baked by
Forge's memory manager); Forge dequantises it per call. A `Chroma` engine holds the same objects without
CLIP-L, its transformer with `distilled_guidance_layer` instead of the modulation Linears (`forge_flux_parts.py`).

The hand-off builds our modules (models.flux's transformer, transformers' CLIP and T5, diffusers' VAE)
on the meta device and gives them Forge's weights without copying them:
- every Linear becomes a `quant.QuantLinear` over a `quant.HostWeight` that reads the Forge layer's
  *current* weight (and scale) and dequantises it with Forge's own function (`dequantize_tensor` for
  GGUF, `functional_dequantize_4bit` for bitsandbytes) per use, in forward and in backward. Forge's
  memory manager keeps deciding where those weights live (on the GPU, or swapped to the CPU on a small
  card); nothing of ours pins them, and the LoRA trains on the weights exactly as Forge generates
  with them (fp8/nf4/GGUF included).
- everything else (biases, norms, embeddings; the VAE) is aliased (`forge_model.alias`: the same
  storage), and copied only where the training device or dtype differs (a few MB; embeddings).
Before that, Forge's memory manager is asked to load the transformer and leave the room training
needs (`memory_management.load_models_gpu`, as Forge's own sampler asks it). Forge's tensors are only
read; ForgeHost hashes them before and after the run.

Reads Forge's objects by attribute (`forge_flux_parts.py`: detection, parts, storage, one Linear's weight);
imports `backend.*` only for Forge's dequantisers (tests give stand-ins in `sys.modules`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import quant
from ..errors import UnsupportedModelError
from ..models.bundle import ModelBundle
from . import forge_model, forge_storage
from .forge_flux_parts import (  # noqa: F401  (what Forge holds: ForgeHost and the tests read it from here)
    CHROMA_ENGINES,
    FLUX_ENGINES,
    check_family,
    dequantizer,
    flux_params,
    is_chroma,
    is_flux,
    layer_weight,
    parts_of,
    storage_report,
    text_encoders_of,
    transformer_of,
    vae_of,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- our modules over Forge's
@dataclass
class HandoffStats:
    """What the hand-off did with Forge's weights, in bytes (for the console line and the tab)."""

    live: int = 0  # Linear weights read from Forge's memory at each use (never copied)
    aliased: int = 0  # other weights sharing Forge's storage
    copied: int = 0  # small weights copied to the training device/dtype
    formats: dict[str, Counter] = field(default_factory=dict)  # part -> {format: number of Linears}

    def shared_fraction(self) -> float:
        total = self.live + self.aliased + self.copied
        return (self.live + self.aliased) / total if total else 0.0

    def text(self) -> str:
        mib = self.copied / 2**20
        share = self.shared_fraction()
        return ("zero copy" if self.copied == 0 else
                f"{share:.0%} of the weights shared with Forge, {mib:.0f} MiB copied to the training device/dtype")


def _fit(value: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None, stats: HandoffStats
         ) -> torch.Tensor:
    out = value
    if value.is_floating_point():
        out = value.to(device=device or value.device, dtype=dtype or value.dtype)
    elif device is not None:
        out = value.to(device)
    size = value.numel() * value.element_size()
    if out.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        stats.aliased += size
    else:
        stats.copied += out.numel() * out.element_size()
    return out


def _same_device(value: torch.Tensor, device: torch.device | None) -> bool:
    if device is None:
        return True
    device = torch.device(device)
    return value.device.type == device.type and (device.index is None or value.device.index in (None, device.index))


def cast_lookups(embedding: nn.Module, dtype: torch.dtype) -> None:
    """An embedding table kept as Forge stores it: the rows it returns are cast to the training dtype (the values
    a cast copy of the table would give), so the table itself is never copied."""
    if getattr(embedding, "_lookup_dtype", None) is None:
        embedding.register_forward_hook(lambda module, args, out: out.to(dtype))
        embedding._lookup_dtype = dtype


def host_skeleton(skeleton: nn.Module, forge_root: nn.Module, *, what: str, device: torch.device | None,
                  dtype: torch.dtype, stats: HandoffStats, part: str,
                  rename: Callable[[str], str] = lambda n: n, alias_tables: bool = False) -> nn.Module:
    """Fill a meta-device `skeleton` from `forge_root` (the same module/parameter names after `rename`):
    Linears become QuantLinears over Forge's live weights, other parameters aliases (or small copies).
    `alias_tables`: embedding tables (a text encoder's token embedding: T5-XXL's is 251 MiB in fp16) stay Forge's
    tensors in Forge's float dtype, their lookups cast (`cast_lookups`), where they are on the training device."""
    theirs_modules = dict(forge_root.named_modules())
    theirs_params = dict(forge_root.named_parameters())
    formats: Counter = Counter()
    for name, module in list(skeleton.named_modules()):
        if type(module) is not nn.Linear:
            continue
        src = theirs_modules.get(rename(name))
        if src is None:
            raise UnsupportedModelError(
                f"The loaded model's {what} has no layer {rename(name)} LoRA Trainer expects; train from the model "
                "file instead.")
        frozen = layer_weight(src, module.weight.shape, what=f"{what} layer {rename(name)}")
        bias = getattr(src, "bias", None)
        if module.bias is not None and bias is None:
            raise UnsupportedModelError(
                f"The loaded model's {what} layer {rename(name)} has no bias; train from the model file instead.")
        if bias is not None:
            if getattr(bias, "gguf_cls", None) is not None:  # a quantised bias (rare): dequantise it once
                bias = dequantizer("gguf")(bias)
            bias = _fit(forge_model.alias(bias), device, dtype, stats)
        quant.replace_linear(skeleton, name, frozen, bias, dtype=dtype, device=device or frozen.device,
                             movable=False)
        stats.live += frozen.nbytes
        formats[frozen.format] += 1
    for name, param in list(skeleton.named_parameters()):
        if not param.is_meta:
            continue
        theirs_name = rename(name)
        src = theirs_params.get(theirs_name)
        if src is None and theirs_name.endswith(".scale"):  # Neo's RMSNorm (torch.nn.RMSNorm) calls it `weight`
            src = theirs_params.get(theirs_name[: -len("scale")] + "weight")
        if src is None:
            raise UnsupportedModelError(
                f"The loaded model's {what} lacks the weight {rename(name)} LoRA Trainer expects; train from the "
                "model file instead.")
        value = forge_model.alias(src)
        if tuple(value.shape) != tuple(param.shape):
            value = forge_model.fit_shape(value, param.shape)
        parent, _, leaf = name.rpartition(".")
        owner = skeleton.get_submodule(parent) if parent else skeleton
        if (alias_tables and isinstance(owner, nn.Embedding) and leaf == "weight" and _same_device(value, device)
                and value.dtype in (torch.float16, torch.bfloat16, torch.float32)):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
            stats.aliased += value.numel() * value.element_size()
            if value.dtype != dtype:
                cast_lookups(owner, dtype)
            continue
        setattr(owner, leaf, nn.Parameter(_fit(value, device, dtype, stats), requires_grad=False))
    stats.formats[part] = formats
    return skeleton.eval().requires_grad_(False)


def _meta(factory):
    with torch.device("meta"):
        return factory()


def transformer_skeleton(forge_transformer: nn.Module, *, device, dtype, stats: HandoffStats):
    from ..models.flux.chroma import ChromaParams, ChromaTransformer
    from ..models.flux.model import FluxTransformer

    params = flux_params(forge_transformer)
    chroma = isinstance(params, ChromaParams)
    skeleton = _meta(lambda: ChromaTransformer(params) if chroma else FluxTransformer(params))
    return host_skeleton(skeleton, forge_transformer, what=f"{'Chroma' if chroma else 'Flux'} transformer",
                         device=device, dtype=dtype, stats=stats, part="transformer")


def clip_skeleton(forge_clip: nn.Module, *, device, dtype, stats: HandoffStats):
    """transformers' CLIPTextModel over Forge's (built with the same transformers: same names)."""
    from transformers import CLIPTextModel

    hf = forge_clip.transformer
    skeleton = _meta(lambda: CLIPTextModel(hf.config))
    host_skeleton(skeleton, hf, what="CLIP-L text encoder", device=device, dtype=dtype, stats=stats, part="CLIP-L",
                  alias_tables=True)
    forge_model._fill_buffers(skeleton, hf, device)
    return skeleton


def t5_skeleton(forge_t5: nn.Module, *, device, dtype, stats: HandoffStats):
    """transformers' T5EncoderModel over Forge's T5 (`transformer.shared`, `transformer.encoder.*`)."""
    from transformers import T5Config, T5EncoderModel

    ft5 = forge_t5.transformer
    cfg = dict(getattr(ft5, "config", {}) or {})
    allowed = {k: v for k, v in cfg.items() if k not in ("architectures", "_name_or_path")}
    config = T5Config(**allowed)
    skeleton = _meta(lambda: T5EncoderModel(config))
    host_skeleton(skeleton, ft5, what="T5 text encoder", device=device, dtype=dtype, stats=stats, part="T5",
                  rename=lambda n: "shared" + n[len("encoder.embed_tokens"):] if n.startswith("encoder.embed_tokens")
                  else n, alias_tables=True)
    if skeleton.encoder.embed_tokens is not skeleton.shared:  # transformers 5 ties by name, not by object
        skeleton.encoder.embed_tokens.weight = skeleton.shared.weight
        if getattr(skeleton.shared, "_lookup_dtype", None) is not None:
            cast_lookups(skeleton.encoder.embed_tokens, skeleton.shared._lookup_dtype)
    return skeleton


def bundle_from_forge_flux(sd_model: Any, *, device: torch.device | None, dtype: torch.dtype,
                           name: str | None = None, model_hash: str | None = None,
                           stats: HandoffStats | None = None) -> ModelBundle:
    """A Flux (or Chroma) ModelBundle over the weights Forge holds (call restore_clean_weights() and make_room()
    first)."""
    from ..models.bundle import FLOW
    from ..models.flux.tokenizers import flux_clip_tokenizer, t5_tokenizer

    family, variant = check_family(sd_model)
    stats = stats if stats is not None else HandoffStats()
    parts = parts_of(sd_model)
    transformer = transformer_skeleton(parts["transformer"], device=device, dtype=dtype, stats=stats)
    clip = [clip_skeleton(parts["CLIP-L"], device=device, dtype=dtype, stats=stats)] if "CLIP-L" in parts else []
    t5 = t5_skeleton(parts["T5"], device=device, dtype=dtype, stats=stats)
    forge_vae = parts["VAE"]
    vae = forge_model._vae(forge_vae, device)
    theirs = {p.untyped_storage().data_ptr() for p in forge_vae.parameters()}
    for p in vae.parameters():
        size = p.numel() * p.element_size()
        if p.untyped_storage().data_ptr() in theirs:
            stats.aliased += size
        else:
            stats.copied += size
    # The format of most Linear weights (what decides memory and precision), the VAE's from its parameters.
    formats = {"unet": _main(stats.formats["transformer"]), **({"te1": _main(stats.formats["CLIP-L"])} if clip else {}),
               "te3": _main(stats.formats["T5"]), "vae": format_by_bytes(forge_vae)}
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(sd_model, "filename", None) or getattr(info, "filename", "") or ""
    t5_tok = t5_tokenizer(host_roots=_tokenizer_roots(), max_length=256 if variant == "schnell" else 512)
    return ModelBundle(
        family=family, prediction_type=FLOW, unet=transformer, vae=vae, text_encoders=[*clip, t5],
        tokenizers=[flux_clip_tokenizer(), t5_tok] if clip else [t5_tok],
        scaling_factor=float(getattr(forge_vae, "scaling_factor", 0.3611)),
        shift_factor=float(getattr(forge_vae, "shift_factor", 0.1159)),
        name=name or (getattr(info, "model_name", None) or f"forge-{family.value}"),
        source=f"forge:{filename}" if filename else "forge", model_hash=model_hash, variant=variant,
        weight_formats=formats)


def format_by_bytes(module: nn.Module) -> str:
    """The storage format holding most of a part's matrix bytes (Linear/conv weights; not embeddings)."""
    sizes: Counter = Counter()
    for mod in module.modules():
        if isinstance(mod, nn.Embedding) or "Embedding" in type(mod).__name__:
            continue
        for p_name, p in mod.named_parameters(recurse=False):
            if p_name not in forge_storage.SCALE_NAMES and p.dim() >= 2:
                sizes[forge_storage.tensor_format(p, mod)] += p.numel() * p.element_size()
    return _main(sizes)


def _main(counts: Counter) -> str:
    return counts.most_common(1)[0][0] if counts else "unknown"


def _tokenizer_roots() -> list[str]:
    """Forge's bundled FLUX.1 tokenizer folders (backend/huggingface/...), where the T5 tokenizer lives."""
    from pathlib import Path

    try:
        import backend

        root = Path(backend.__file__).parent / "huggingface" / "black-forest-labs"
        return [str(root / "FLUX.1-dev" / "tokenizer_2"), str(root / "FLUX.1-schnell" / "tokenizer_2")]
    except (ImportError, AttributeError, TypeError):
        return []


# ---------------------------------------------------------------- Forge's memory manager
def training_memory(config: Any, params: Any) -> int:
    """Bytes of GPU room a run needs besides the weights (activations, LoRA, optimizer): a rough upper
    estimate for asking Forge's memory manager, from the resolution, batch, checkpointing and rank."""
    res = int(getattr(config, "resolution", 1024) or 1024)
    batch = int(getattr(config, "batch_size", 1) or 1)
    tokens = (res // 16) ** 2 + 512  # packed latent tokens + T5 tokens
    per_token_block = params.hidden_size * 2 * (2 if getattr(config, "gradient_checkpointing", True) else 24)
    blocks = params.depth + params.depth_single_blocks
    activations = batch * tokens * per_token_block * blocks
    rank = int(getattr(config, "network_dim", 16) or 16)
    lora = blocks * 10 * rank * params.hidden_size * 2 * 16  # ~10 adapted Linears a block; fp32 weights + grads + Adam
    return int(1.5 * 2**30 + activations + lora)


def make_room(sd_model: Any, memory_required: int) -> None:
    """Ask Forge's memory manager to load the transformer for training and leave `memory_required`
    bytes free (it unloads or offloads other models, or keeps part of the transformer on the CPU on a
    small card, exactly as before sampling)."""
    try:
        from backend import memory_management
    except ImportError:
        return
    unet = sd_model.forge_objects_original.unet
    memory_management.load_models_gpu([unet], memory_required=memory_required)


# ---------------------------------------------------------------- what ForgeHost calls
def training_dtype(config: Any, device: torch.device) -> torch.dtype:
    """The compute dtype of a run (the engine's rule): fp32 on the CPU; on CUDA the mixed precision asked
    for (bf16, or fp16 where the GPU has no bf16)."""
    if device.type != "cuda":
        return torch.float32
    mp = str(getattr(config, "mixed_precision", "bf16") or "bf16")
    if mp == "bf16" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return {"no": torch.float32, "fp16": torch.float16}.get(mp, torch.bfloat16)


@dataclass
class Handoff:
    """The result of acquire(): the bundle, the console line and the note the UI shows."""

    bundle: ModelBundle
    stats: HandoffStats
    line: str
    note: str
    advice: str | None = None  # how to use the LoRA at full effect on this base, where Forge's settings lose it


def formats_text(stats: HandoffStats) -> str:
    """e.g. "transformer fp8 e4m3fn, CLIP-L fp16, T5 fp8 e4m3fn"."""
    return ", ".join(f"{part} {_main(stats.formats[part])}" for part in ("transformer", "CLIP-L", "T5")
                     if part in stats.formats)


def _loras_merged() -> bool:
    """True when Forge applies LoRAs by merging them into the stored weights: "Diffusion in Low Bits" without
    "(fp16 LoRA)" (Forge main and Neo set `dynamic_args["online_lora"]` from it; Neo forces it on for GGUF)."""
    try:
        from backend.args import dynamic_args
    except ImportError:
        return False
    return isinstance(dynamic_args, dict) and not dynamic_args.get("online_lora", False)


def lora_use_advice(stats: HandoffStats) -> str | None:
    """A note for bases where Forge's merge loses most of a LoRA: fp8 weights (the sum is rounded to fp8: a
    change of a few percent of a weight mostly rounds away), scaled weights (Forge adds the change to the
    unscaled values it multiplies by `scale_weight` at use) and bitsandbytes nf4/fp4 (the sum is quantised again
    to 16 levels per block: a change of 3% of a matrix's norm keeps ~8% of itself). Applied on the fly
    ("(fp16 LoRA)"), it is exact."""
    fmt = _main(stats.formats.get("transformer", Counter()))
    lossy = fmt.startswith("fp8") or "scaled" in fmt or fmt in ("nf4", "fp4", "nf4/fp4")
    if not lossy or not _loras_merged():
        return None
    return (f"Forge applies LoRAs to this model by merging them into its {fmt} weights, which loses most of a LoRA's "
            "effect; to use this LoRA at full strength here, set 'Diffusion in Low Bits' to an '(fp16 LoRA)' option "
            "(such as 'Automatic (fp16 LoRA)' or 'float8-e4m3fn (fp16 LoRA)'), which applies LoRAs on the fly.")


def acquire(sd_model: Any, config: Any, *, device: torch.device, name: str | None = None,
            model_hash: str | None = None) -> Handoff:
    """Make room through Forge's memory manager, then hand Forge's Flux or Chroma over (weights read where they
    are)."""
    check_family(sd_model)
    params = flux_params(transformer_of(sd_model))
    make_room(sd_model, training_memory(config, params))
    stats = HandoffStats()
    bundle = bundle_from_forge_flux(sd_model, device=device, dtype=training_dtype(config, device), name=name,
                                    model_hash=model_hash, stats=stats)
    formats = formats_text(stats)
    quantised = [f for f in (_main(c) for c in stats.formats.values()) if not forge_storage.is_trainable(f)]
    how = ("the LoRA trains over the weights as stored, dequantised one layer at a time" if quantised
           else "the LoRA trains over Forge's own weights")
    label = bundle.family.label
    line = (f"training on Forge's loaded {label} model {bundle.name} ({bundle.variant + '; ' if bundle.variant else ''}"
            f"{formats}; {how}; {stats.text()})")
    note = f"Trains on the loaded {label} model as Forge holds it ({formats}); no second copy of the weights."
    return Handoff(bundle=bundle, stats=stats, line=line, note=note, advice=lora_use_advice(stats))


def model_info(sd_model: Any) -> dict[str, Any]:
    """For the tab: the loaded Flux or Chroma model, how each part is stored and that training uses it in place
    (or, for what cannot be trained, the sentence a run would fail with)."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(sd_model, "filename", None) or getattr(info, "filename", "") or ""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1] or str(getattr(info, "model_name", "") or "")
    try:
        family, _ = check_family(sd_model)
        theirs = parts_of(sd_model)
        if any(fmt == forge_storage.SVDQ for _, fmt, _ in storage_report(sd_model).low_bit):
            raise UnsupportedModelError(
                "The loaded model is a Nunchaku SVDQ model, whose packed weights LoRA Trainer cannot train over; "
                "load the fp16/bf16, fp8, nf4 or GGUF version of it.")
    except UnsupportedModelError as e:
        return {"name": name, "family": None, "note": str(e)}
    parts = ", ".join(f"{part} {format_by_bytes(theirs[part])}" for part in ("transformer", "CLIP-L", "T5")
                      if part in theirs)
    out = {"name": name, "family": family.label, "storage": parts,
           "note": f"stored as {parts}; trains on the loaded weights as stored (no second copy)"}
    budget = gpu_budget(theirs.values())
    if budget is not None:
        preset = fitting_preset(budget)
        out["preset"] = preset.key if preset else None
        out["note"] += (f"; {budget / 2**30:.1f} GiB of VRAM free with Forge's {family.label} counted in: "
                        + (f"preset {preset.label} fits" if preset else
                           "less than the smallest Flux preset (8 GB) needs, training will be slow"))
    return out


def gpu_budget(parts: Any) -> int | None:
    """Bytes of VRAM a run can use: what is free plus what Forge's Flux holds on the GPU (training reads
    those weights in place, and Forge's memory manager moves the rest out to make room); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    try:
        from backend import memory_management

        device = memory_management.get_torch_device()
    except ImportError:
        device = torch.device("cuda")
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    seen: set[int] = set()
    held = 0
    for module in parts:
        for t in (*module.parameters(), *module.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if t.device.type == "cuda" and ptr not in seen:
                seen.add(ptr)
                held += t.untyped_storage().nbytes()
    return int(free + held)


def fitting_preset(budget: int):
    """The Flux preset for the biggest card that `budget` bytes cover (a card's usable memory is ~90% of its
    nominal GB), or None below the smallest one."""
    from ..config import PRESETS

    flux = sorted((p for k, p in PRESETS.items() if k.startswith("flux")), key=lambda p: p.vram_gb, reverse=True)
    return next((p for p in flux if p.vram_gb * 1e9 * 0.9 <= budget), None)
