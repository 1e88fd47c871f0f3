"""Tiny random Flux.1 models with the real structure, and writers for the file layouts users have.

Same block types, key names and text/VAE parts as FLUX.1 dev/schnell, with widths shrunk so a CPU
step takes milliseconds: tests, the CLI and benchmarks load these files through the real loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..bundle import FLOW, Family, ModelBundle
from ..ldm_convert import canonical_text_keys, vae_to_ldm
from ..tiny import _randomize
from . import convert as cv
from .model import FluxParams, FluxTransformer
from .tokenizers import flux_clip_tokenizer, t5_tokenizer

CLIP_WIDTH = 64  # one 64-wide head, as the loader derives heads = width // 64
T5_WIDTH = 32


def tiny_params(variant: str = "dev", *, depth: int = 2, depth_single: int = 2, hidden: int = 64,
                num_heads: int = 2) -> FluxParams:
    head = hidden // num_heads
    first = head // 8
    rest = (head - first) // 2
    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=CLIP_WIDTH, context_in_dim=T5_WIDTH,
                      hidden_size=hidden, mlp_ratio=4.0, num_heads=num_heads, depth=depth,
                      depth_single_blocks=depth_single, axes_dim=(first, rest, head - first - rest),
                      qkv_bias=True, guidance_embed=variant == "dev")


def clip_config() -> dict[str, Any]:
    return {"vocab_size": 49408, "hidden_size": CLIP_WIDTH, "intermediate_size": 2 * CLIP_WIDTH,
            "num_hidden_layers": 2, "num_attention_heads": 1, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "projection_dim": CLIP_WIDTH, "bos_token_id": 0, "eos_token_id": 2,
            "pad_token_id": 1}


def t5_config() -> dict[str, Any]:
    return {"vocab_size": 32128, "d_model": T5_WIDTH, "d_kv": 8, "d_ff": 2 * T5_WIDTH, "num_layers": 2,
            "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True, "layer_norm_epsilon": 1e-6,
            "tie_word_embeddings": False, "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1}


def vae_config() -> dict[str, Any]:
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [32, 32, 64, 64],
            "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 64,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}


def tiny_chroma_params(*, depth: int = 2, depth_single: int = 2, hidden: int = 64, num_heads: int = 2):
    from .chroma import ChromaParams

    p = tiny_params("schnell", depth=depth, depth_single=depth_single, hidden=hidden, num_heads=num_heads)
    return ChromaParams(**{**p.to_dict(), "axes_dim": p.axes_dim, "vec_in_dim": 0, "guidance_embed": False},
                        approximator_in_dim=64, approximator_depth=2, approximator_hidden_size=hidden)


def build_tiny_flux_bundle(variant: str = "dev", seed: int = 0, *, depth: int = 2, depth_single: int = 2,
                           hidden: int = 64, num_heads: int = 2) -> ModelBundle:
    """A random tiny Flux.1 in memory (fp32, CPU): BFL-layout transformer, CLIP-L, T5, VAE.
    variant "chroma": a tiny Chroma (approximator instead of modulation Linears; T5 and VAE only)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if variant not in ("dev", "schnell", "chroma"):
        raise ValueError(f"variant must be 'dev', 'schnell' or 'chroma', not {variant!r}")
    g = torch.Generator().manual_seed(seed)
    sizes = {"depth": depth, "depth_single": depth_single, "hidden": hidden, "num_heads": num_heads}
    if variant == "chroma":
        from .chroma import ChromaTransformer

        transformer = ChromaTransformer(tiny_chroma_params(**sizes))
        encoders = [T5EncoderModel(T5Config(**t5_config()))]
    else:
        transformer = FluxTransformer(tiny_params(variant, **sizes))
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_config())), T5EncoderModel(T5Config(**t5_config()))]
    vae = AutoencoderKL(**vae_config())
    for m in (transformer, *encoders, vae):
        _randomize(m, g)
        m.eval().requires_grad_(False)
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(0.35)  # decoded pixels mostly inside [-1, 1]
        for m in encoders[-1].modules():  # T5's RMS norms have no bias: keep them near 1 like a trained model
            if type(m).__name__.endswith("LayerNorm") and hasattr(m, "weight"):
                m.weight.fill_(1.0)
    t5_tok = t5_tokenizer(max_length=256 if variant == "schnell" else 512)
    chroma = variant == "chroma"
    return ModelBundle(
        family=Family.CHROMA if chroma else Family.FLUX1, prediction_type=FLOW, unet=transformer, vae=vae,
        text_encoders=encoders, tokenizers=[t5_tok] if chroma else [flux_clip_tokenizer(), t5_tok],
        scaling_factor=0.3611, shift_factor=0.1159, name=f"tiny-{variant}" if chroma else f"tiny-flux-{variant}",
        source="built in memory", variant="" if chroma else variant,
        weight_formats={"unet": "fp32", **({} if chroma else {"te1": "fp32"}), "te3": "fp32", "vae": "fp32"})


LAYOUTS = ("bfl", "prefixed", "diffusers", "all-in-one", "folder")
FP8 = (None, "fp8_e4m3fn", "fp8_scaled")


def quantize_fp8(state_dict: dict[str, torch.Tensor], scaled: bool) -> dict[str, torch.Tensor]:
    """Linear weights of the blocks in float8_e4m3fn, as fp8 Flux files store them (scaled: with a
    per-tensor `scale_weight` and ComfyUI's `scaled_fp8` marker)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and value.dim() == 2 and "_blocks." in f".{key}":
            if scaled:
                scale = value.abs().max().float().clamp(min=1e-12) / 448.0
                out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
                out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            else:
                out[key] = value.to(torch.float8_e4m3fn)
        else:
            out[key] = value
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def component_state_dicts(bundle: ModelBundle) -> dict[str, dict[str, torch.Tensor]]:
    """The parts as their own files hold them: BFL transformer, CLIP-L (`text_model.*`), T5
    (`shared.weight` + `encoder.*`), ae.safetensors (LDM-style VAE keys)."""
    vae = bundle.vae
    levels = len(vae.config.block_out_channels)
    t5 = {k: v for k, v in bundle.text_encoders[-1].state_dict().items() if k != "encoder.embed_tokens.weight"}
    parts = {"transformer": dict(bundle.unet.state_dict()), "t5": t5,
             "vae": vae_to_ldm(vae.state_dict(), levels, vae.config.layers_per_block, prefix="")}
    if len(bundle.text_encoders) == 2:
        parts["clip_l"] = canonical_text_keys(bundle.text_encoders[0].state_dict())
    return parts


def _save(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    from ..ldm_writer import _publish, _temp_beside

    tmp = _temp_beside(path)
    save_file({k: v.detach().clone() for k, v in state_dict.items()}, tmp, metadata=metadata)  # clone: shared scales
    _publish(tmp, path)
    return path


def write_tiny_flux_checkpoint(folder: str | Path, variant: str = "dev", seed: int = 0, *, layout: str = "bfl",
                               fp8: str | None = None, name: str | None = None,
                               parts: bool = True, **sizes: int) -> Path:
    """Write `build_tiny_flux_bundle(variant, seed, **sizes)` as users keep Flux on disk.

    layout "bfl": `<name>.safetensors` with BFL keys (ComfyUI models/unet); "prefixed": the same under
    `model.diffusion_model.`; "diffusers": diffusers' FluxTransformer2DModel keys in one file;
    "all-in-one": transformer, CLIP-L, T5 and VAE in one file (Forge/ComfyUI checkpoints); "folder":
    a diffusers FluxPipeline folder `<name>/` (returned instead of a file).
    fp8 "fp8_e4m3fn" / "fp8_scaled" stores the blocks' Linear weights in fp8 (as fp8 Flux files).
    parts: also write `clip_l.safetensors`, `t5xxl.safetensors` and `ae.safetensors` beside it
    (not for all-in-one). Returns the model file.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if variant == "chroma" and layout in ("diffusers", "folder"):
        raise ValueError("Chroma is written in BFL layout only")
    if fp8 not in FP8:
        raise ValueError(f"fp8 must be one of {FP8}, not {fp8!r}")
    bundle = build_tiny_flux_bundle(variant, seed, **sizes)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sds = component_state_dicts(bundle)
    transformer = sds["transformer"]
    if fp8 is not None:
        transformer = quantize_fp8(transformer, scaled=fp8 == "fp8_scaled")
    if name is None:
        name = ("tiny-chroma" if variant == "chroma" else f"tiny-flux-{variant}") + ("" if layout == "bfl" else f"-{layout}") + (f"-{fp8}" if fp8 else "")
    meta = {"lora_trainer": f"tiny random FLUX.1 {variant}", "seed": str(seed)}
    if layout == "folder":
        return _save_pipeline_folder(bundle, transformer, folder / name)
    path = folder / f"{name}.safetensors"
    if layout == "diffusers":
        converted = cv.bfl_to_diffusers(transformer, bundle.unet.params.hidden_size)
        if "scaled_fp8" in transformer:
            converted["scaled_fp8"] = transformer["scaled_fp8"]
        _save(converted, path, meta)
    elif layout == "prefixed":
        _save({"model.diffusion_model." + k: v for k, v in transformer.items()}, path, meta)
    elif layout == "all-in-one":
        merged = {"model.diffusion_model." + k: v for k, v in transformer.items()}
        merged.update({"text_encoders.clip_l.transformer." + k: v for k, v in sds.get("clip_l", {}).items()})
        merged.update({"text_encoders.t5xxl.transformer." + k: v for k, v in sds["t5"].items()})
        merged.update({"vae." + k: v for k, v in sds["vae"].items()})
        return _save(merged, path, meta)
    else:
        _save(transformer, path, meta)
    if parts:
        if "clip_l" in sds:
            _save(sds["clip_l"], folder / "clip_l.safetensors")
        _save(sds["t5"], folder / "t5xxl.safetensors")
        _save(sds["vae"], folder / "ae.safetensors")
    return path


def _save_pipeline_folder(bundle: ModelBundle, transformer: dict[str, torch.Tensor], root: Path) -> Path:
    """A FluxPipeline folder as diffusers saves one (weights, component configs, tokenizer_2)."""
    import gzip
    import json

    from ..ldm_writer import atomic_write_text, write_tokenizer_files
    from .tokenizers import bundled_t5_tokenizer_file

    p = bundle.unet.params
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    _save(cv.bfl_to_diffusers(transformer, p.hidden_size), root / "transformer" / "diffusion_pytorch_model.safetensors")
    atomic_write_text(root / "transformer" / "config.json", json.dumps({
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": p.in_channels,
        "num_layers": p.depth, "num_single_layers": p.depth_single_blocks, "attention_head_dim": p.head_dim,
        "num_attention_heads": p.num_heads, "joint_attention_dim": p.context_in_dim,
        "pooled_projection_dim": p.vec_in_dim, "guidance_embeds": p.guidance_embed,
        "axes_dims_rope": list(p.axes_dim)}, indent=1))
    for sub, module in (("text_encoder", bundle.text_encoders[0]), ("text_encoder_2", bundle.text_encoders[1])):
        (root / sub).mkdir(exist_ok=True)
        sd = canonical_text_keys(module.state_dict()) if sub == "text_encoder" else dict(module.state_dict())
        _save(sd, root / sub / "model.safetensors")
        module.config.to_json_file(str(root / sub / "config.json"))
    (root / "vae").mkdir(exist_ok=True)
    _save(dict(bundle.vae.state_dict()), root / "vae" / "diffusion_pytorch_model.safetensors")
    atomic_write_text(root / "vae" / "config.json", json.dumps(dict(bundle.vae.config), indent=1, default=list))
    (root / "tokenizer").mkdir(exist_ok=True)
    write_tokenizer_files(bundle.tokenizers[0], root / "tokenizer")
    (root / "tokenizer_2").mkdir(exist_ok=True)
    packed = bundled_t5_tokenizer_file().read_bytes()
    atomic_write_text(root / "tokenizer_2" / "tokenizer.json", gzip.decompress(packed).decode("utf-8"))
    atomic_write_text(root / "model_index.json", json.dumps({
        "_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=1))
    return root
