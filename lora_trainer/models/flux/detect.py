"""What a Flux-related file holds, from key names and shapes only (a safetensors header is enough).

A Flux.1 or Chroma transformer (BFL layout, or diffusers layout for Flux.1; any known prefix;
bf16/fp16/fp8/scaled fp8), the separate CLIP-L, T5-XXL and VAE files, and all-in-one checkpoints
holding several of them. Files that look like Flux but are something we cannot train (FLUX.2, Fill,
Canny/Depth, Kontext, a LoRA, a quantised NF4 file) are refused with one sentence saying what they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import UnsupportedModelError
from ..bundle import Family
from ..detect import TensorInfo
from . import convert as cv
from .model import FluxParams

REMEDY = "choose a FLUX.1 dev or schnell transformer (e.g. flux1-dev.safetensors) as the model."

_FP8 = {"F8_E4M3": "fp8_e4m3fn", "F8_E4M3FN": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
_FLOATS = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_A.weight", ".lora.down.", ".lora.up.",
                 ".hada_w1_a", ".lokr_w1", ".oft_blocks", ".dora_scale")
_BNB_MARKERS = (".absmax", ".quant_map", ".quant_state", ".nested_absmax", ".SCB")
_CLIP_MARKER = "text_model.encoder.layers.0.self_attn.q_proj.weight"
_T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
_VAE_MARKERS = ("decoder.conv_in.weight",)

TRANSFORMER, CLIP_L, T5, VAE = "transformer", "clip_l", "t5", "vae"
PARTS_NEEDED = {Family.FLUX1: (CLIP_L, T5, VAE), Family.CHROMA: (T5, VAE)}
PART_LABELS = {TRANSFORMER: "the Flux transformer", CLIP_L: "a CLIP-L text encoder",
               T5: "a T5-XXL text encoder", VAE: "the Flux VAE (ae.safetensors)"}


@dataclass
class FluxFileInfo:
    """The Flux parts one file holds. `prefixes[part]` is the key prefix of that part."""

    name: str
    prefixes: dict[str, str] = field(default_factory=dict)
    layout: str = "bfl"  # transformer keys: "bfl" or "diffusers"
    family: Family = Family.FLUX1
    variant: str = "dev"  # "dev" (guidance embedding) or "schnell"; "" for Chroma
    params: FluxParams | None = None
    formats: dict[str, str] = field(default_factory=dict)  # part -> "bf16"/"fp16"/"fp32"/"fp8_e4m3fn"/"fp8_scaled"
    vae_layout: str = "ldm"  # "ldm" (ae.safetensors) or "diffusers"
    vae_channels: int = 16  # latent channels of the VAE (16 for Flux, 4 for SD)

    @property
    def parts(self) -> list[str]:
        return list(self.prefixes)

    def describe(self) -> str:
        return " and ".join(PART_LABELS[p] for p in self.prefixes)


def refuse(name: str, what: str, remedy: str = REMEDY) -> UnsupportedModelError:
    return UnsupportedModelError(f"{name} is {what}, which LoRA Trainer cannot train on; {remedy}")


def _format(tensors: Mapping[str, TensorInfo], prefix: str, probe: str) -> str:
    info = tensors.get(prefix + probe)
    if info is None:  # pick any 2-d weight of the part
        info = next((t for k, t in tensors.items() if k.startswith(prefix) and k.endswith(".weight")
                     and len(t.shape) == 2), None)
    if info is None:
        return "unknown"
    if info.dtype in _FP8:
        scaled = any(k.startswith(prefix) and k.endswith(".scale_weight") for k in tensors)
        return "fp8_scaled" if scaled else _FP8[info.dtype]
    return _FLOATS.get(info.dtype, info.dtype.lower())


def _axes_dim(head_dim: int) -> tuple[int, int, int]:
    """BFL's RoPE split of a head (time, row, column): (16, 56, 56) for 128."""
    first = head_dim // 8
    rest = (head_dim - first) // 2
    return first, rest, head_dim - first - rest


def _shape_of(tensors: Mapping[str, TensorInfo], prefix: str):
    return lambda key: tensors[prefix + key].shape


def _block_sizes(tensors: Mapping[str, TensorInfo], prefix: str) -> tuple[int, int, int, int, int, int]:
    """(double blocks, single blocks, width, input channels, head dim, MLP width): the sizes Flux and
    Chroma share, read from BFL-layout keys."""
    shape = _shape_of(tensors, prefix)
    depth, single = cv.count_blocks([k[len(prefix):] for k in tensors if k.startswith(prefix)], "bfl")
    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0] if depth else \
        shape("single_blocks.0.norm.query_norm.scale")[0]
    mlp = shape("double_blocks.0.img_mlp.0.weight")[0] if depth else shape("single_blocks.0.linear2.weight")[1] - hidden
    return depth, single, hidden, in_channels, head_dim, mlp


def bfl_params(tensors: Mapping[str, TensorInfo], prefix: str = "") -> FluxParams:
    """Transformer shape from BFL-layout keys (any number of blocks, any width)."""
    shape = _shape_of(tensors, prefix)
    depth, single, hidden, in_channels, head_dim, mlp = _block_sizes(tensors, prefix)
    return FluxParams(
        in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
        vec_in_dim=shape("vector_in.in_layer.weight")[1], context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden, mlp_ratio=mlp / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=single, axes_dim=_axes_dim(head_dim),
        qkv_bias=prefix + "double_blocks.0.img_attn.qkv.bias" in tensors or depth == 0,
        guidance_embed=prefix + "guidance_in.in_layer.weight" in tensors)


def chroma_params(tensors: Mapping[str, TensorInfo], prefix: str = "") -> FluxParams:
    """Chroma's shape from BFL-layout keys (no modulation Linears; the approximator's sizes)."""
    from .chroma import ChromaParams

    shape = _shape_of(tensors, prefix)
    depth, single, hidden, in_channels, head_dim, mlp = _block_sizes(tensors, prefix)
    approx_hidden, approx_in = shape("distilled_guidance_layer.in_proj.weight")
    return ChromaParams(
        in_channels=in_channels, out_channels=shape("final_layer.linear.weight")[0],
        context_in_dim=shape("txt_in.weight")[1], hidden_size=hidden, mlp_ratio=mlp / hidden,
        num_heads=hidden // head_dim, depth=depth, depth_single_blocks=single, axes_dim=_axes_dim(head_dim),
        qkv_bias=prefix + "double_blocks.0.img_attn.qkv.bias" in tensors or depth == 0,
        approximator_in_dim=approx_in, approximator_hidden_size=approx_hidden,
        approximator_depth=cv._approximator_layers([k[len(prefix):] for k in tensors if k.startswith(prefix)]))


def diffusers_params(tensors: Mapping[str, TensorInfo], prefix: str = "") -> FluxParams:
    def shape(key: str) -> tuple[int, ...]:
        return tensors[prefix + key].shape

    keys = [k[len(prefix):] for k in tensors if k.startswith(prefix)]
    depth, single = cv.count_blocks(keys, "diffusers")
    hidden, in_channels = shape("x_embedder.weight")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0] if depth else \
        shape("single_transformer_blocks.0.attn.norm_q.weight")[0]
    mlp = shape("transformer_blocks.0.ff.net.0.proj.weight")[0] if depth else \
        shape("single_transformer_blocks.0.proj_mlp.weight")[0]
    return FluxParams(
        in_channels=in_channels, out_channels=shape("proj_out.weight")[0],
        vec_in_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
        context_in_dim=shape("context_embedder.weight")[1], hidden_size=hidden, mlp_ratio=mlp / hidden,
        num_heads=hidden // head_dim, depth=depth, depth_single_blocks=single, axes_dim=_axes_dim(head_dim),
        qkv_bias=prefix + "transformer_blocks.0.attn.to_q.bias" in tensors or depth == 0,
        guidance_embed=prefix + "time_text_embed.guidance_embedder.linear_1.weight" in tensors)


def is_flux_lora(keys) -> bool:
    return any(m in k for k in keys for m in _LORA_MARKERS) and any(
        n in k for k in keys for n in ("double_blocks", "single_blocks", "transformer_blocks"))


def inspect(tensors: Mapping[str, TensorInfo], name: str) -> FluxFileInfo | None:
    """The Flux parts of a file, None when it holds none; refusals raise UnsupportedModelError."""
    keys = set(tensors)
    if not keys:
        return None
    if any(m in k for k in keys for m in _LORA_MARKERS) or any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        if is_flux_lora(keys):
            raise UnsupportedModelError(
                f"{name} is a LoRA for Flux, not a model; put it in models/Lora and {REMEDY}")
        return None  # an SD LoRA: the SD checks name it
    if any(k.endswith(("double_stream_modulation_img.lin.weight", "single_stream_modulation.lin.weight"))
           for k in keys):
        raise refuse(name, "a FLUX.2 model")
    info = FluxFileInfo(name=name)
    found = cv.transformer_prefix(keys)
    if found is not None:
        prefix, layout = found
        if any(m in k for k in keys for m in _BNB_MARKERS) or any(
                tensors[k].dtype in ("U8", "I8") and len(tensors[k].shape) == 2 for k in keys if k.startswith(prefix)):
            raise refuse(name, "a Flux model quantised to NF4/int8 (bitsandbytes)",
                         "choose the bf16 or fp8 transformer file (e.g. flux1-dev.safetensors or "
                         "flux1-dev-fp8.safetensors) as the model.")
        chroma = prefix + "distilled_guidance_layer.in_proj.weight" in tensors
        try:
            if chroma and layout == "bfl":
                params = chroma_params(tensors, prefix)
            else:
                params = bfl_params(tensors, prefix) if layout == "bfl" else diffusers_params(tensors, prefix)
        except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
            raise UnsupportedModelError(
                f"{name} looks like a Flux transformer but lacks weights it needs ({exc}); the file is incomplete "
                f"or another model, so download it again or {REMEDY}") from None
        if params.in_channels == 384:
            raise refuse(name, "FLUX.1 Fill (an inpainting model with 384 input channels)")
        if params.in_channels == 128:
            raise refuse(name, "a FLUX.1 Canny or Depth control model (128 input channels)")
        if params.in_channels != params.out_channels:
            raise refuse(name, f"a Flux variant with {params.in_channels} input channels")
        if "kontext" in name.lower():
            # Kontext's weights have exactly dev's names and shapes; only the file name tells.
            raise refuse(name, "FLUX.1 Kontext (an image-editing model)")
        info.prefixes[TRANSFORMER] = prefix
        info.layout = layout
        info.params = params
        info.family = Family.CHROMA if chroma else Family.FLUX1
        info.variant = "" if chroma else ("dev" if params.guidance_embed else "schnell")
        probe = "double_blocks.0.img_attn.qkv.weight" if layout == "bfl" else "transformer_blocks.0.attn.to_q.weight"
        info.formats[TRANSFORMER] = _format(tensors, prefix, probe)
    clip = cv.find_prefix(keys, [_CLIP_MARKER], cv.CLIP_PREFIXES)
    if clip is not None:
        info.prefixes[CLIP_L] = clip
        info.formats[CLIP_L] = _format(tensors, clip, _CLIP_MARKER)
    t5 = cv.find_prefix(keys, [_T5_MARKER], cv.T5_PREFIXES)
    if t5 is not None:
        info.prefixes[T5] = t5
        info.formats[T5] = _format(tensors, t5, _T5_MARKER)
    vae = cv.find_prefix(keys, _VAE_MARKERS, cv.VAE_PREFIXES)
    if vae is not None:
        info.prefixes[VAE] = vae
        info.vae_channels = tensors[vae + "decoder.conv_in.weight"].shape[1]
        info.formats[VAE] = _format(tensors, vae, "decoder.conv_in.weight")
        info.vae_layout = "diffusers" if vae + "decoder.up_blocks.0.resnets.0.conv1.weight" in tensors else "ldm"
    if not info.prefixes:
        return None
    if TRANSFORMER not in info.prefixes and not _only_parts(keys, info.prefixes):
        return None  # e.g. an SD checkpoint, whose CLIP and VAE look like Flux's parts
    return info


_PART_ROOTS = {CLIP_L: ("text_model.", "text_projection", "logit_scale", "vision_model.", "visual_projection"),
               T5: ("encoder.", "shared.", "decoder.", "lm_head."),
               VAE: ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")}


def _only_parts(keys, prefixes: Mapping[str, str]) -> bool:
    """Every key belongs to one of the parts found (text encoders / VAE files, alone or together)."""
    starts = tuple(p + r for part, p in prefixes.items() for r in _PART_ROOTS[part])
    return all(k.startswith(starts) or k == "scaled_fp8" for k in keys)


def component_only_error(info: FluxFileInfo, name: str) -> UnsupportedModelError | None:
    """The refusal for a text encoder or VAE file given as the model (None: not such a file)."""
    if TRANSFORMER in info.prefixes or (info.parts == [VAE] and info.vae_channels != 16):
        return None
    options = {CLIP_L: "--clip-l", T5: "--t5", VAE: "--vae"}
    given = " and ".join(options[p] for p in info.parts)
    return UnsupportedModelError(
        f"{name} is {info.describe()}, not a Flux model; pass it with {given} and choose the Flux "
        "transformer (e.g. flux1-dev.safetensors) as the model.")


def check_part(info: FluxFileInfo | None, part: str, name: str, option: str,
               tensors: Mapping[str, TensorInfo] | None = None) -> None:
    """Refuse a file given for `part` (e.g. --t5) that does not hold it, naming what it holds."""
    if info is not None and part in info.prefixes:
        if tensors is not None:
            _check_width(info, part, name, tensors)
        return
    what = info.describe() if info is not None else "not a Flux component"
    raise UnsupportedModelError(
        f"{name}, given as {PART_LABELS[part]} ({option}), is {what}; pass the right file with {option}.")


def _check_width(info: FluxFileInfo, part: str, name: str, tensors: Mapping[str, TensorInfo]) -> None:
    prefix = info.prefixes[part]
    if part == CLIP_L:
        width = tensors[prefix + _CLIP_MARKER].shape[1]
        if width == 1280:
            raise UnsupportedModelError(
                f"{name} is a CLIP-G text encoder (SDXL/SD3), not Flux's CLIP-L; pass clip_l.safetensors.")
    if part == VAE:
        channels = tensors[prefix + "decoder.conv_in.weight"].shape[1]
        if channels != 16:
            raise UnsupportedModelError(
                f"{name} is a VAE with {channels} latent channels (Stable Diffusion's), not Flux's; "
                "pass Flux's ae.safetensors as the VAE.")
