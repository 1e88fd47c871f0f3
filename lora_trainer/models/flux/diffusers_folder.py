"""FluxPipeline folders (diffusers layout: transformer/, text_encoder/, text_encoder_2/, vae/,
tokenizer_2/): loaded into the same BFL-layout bundle as single files. Rare on users' disks, so
the transformer is converted (its q/k/v are fused into BFL's qkv, a copy)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ...errors import UnsupportedModelError
from ..bundle import FLOW, Family, ModelBundle
from ..detect import read_safetensors_header
from . import convert as cv
from . import detect as fd
from .tokenizers import flux_clip_tokenizer, t5_tokenizer


def _read_folder(folder: Path, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of the .safetensors files in `folder` (shards too), memory-mapped, and their infos."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(
            f"The Flux folder has no .safetensors weights in {folder.name}/ ({what}); download the folder again.")
    tensors: dict[str, torch.Tensor] = {}
    infos: dict = {}
    for f in files:
        header, _ = read_safetensors_header(f)
        infos.update(header)
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in header:
                tensors[key] = handle.get_tensor(key)
    return tensors, infos


def load_flux_folder(folder: Path, *, clip_l=None, t5=None, vae=None, t5_tokenizer_dir=None,
                     host_roots: Iterable[str | os.PathLike] = (), dtype=torch.float32, device="cpu") -> ModelBundle:
    from .loader import _open, build_clip_l, build_t5, build_transformer, build_vae

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    kind = index.get("_class_name") or "pipeline"
    if kind not in ("FluxPipeline", "FluxImg2ImgPipeline", "pipeline") or (
            index.get("transformer") or [None, None])[1] != "FluxTransformer2DModel":
        raise fd.refuse(folder.name, f"a diffusers {kind} folder")
    tensors, infos = _read_folder(folder / "transformer", "transformer")
    params = fd.diffusers_params(infos)
    transformer = build_transformer(cv.diffusers_to_bfl(tensors), params=params, name=folder.name, dtype=dtype,
                                    device=device)
    formats = {"unet": fd._format(infos, "", "transformer_blocks.0.attn.to_q.weight")}

    def part(given, sub: str, kind: str):
        if given is not None:
            f = _open(given, "The file")
            fd.check_part(f.info, kind, f.path.name, {fd.CLIP_L: "--clip-l", fd.T5: "--t5", fd.VAE: "--vae"}[kind],
                          f.tensors)
            return f.read(f.info.prefixes[kind]), f.info.formats.get(kind, "unknown"), str(f.path), f.info.vae_layout
        sd, sd_infos = _read_folder(folder / sub, sub)
        probe = {fd.CLIP_L: "text_model.encoder.layers.0.self_attn.q_proj.weight",
                 fd.T5: "encoder.block.0.layer.0.SelfAttention.q.weight", fd.VAE: "decoder.conv_in.weight"}[kind]
        return sd, fd._format(sd_infos, "", probe), str(folder / sub), "diffusers"

    clip_sd, formats["te1"], clip_src, _ = part(clip_l, "text_encoder", fd.CLIP_L)
    t5_sd, formats["te3"], t5_src, _ = part(t5, "text_encoder_2", fd.T5)
    vae_sd, formats["vae"], vae_src, vae_layout = part(vae, "vae", fd.VAE)
    clip = build_clip_l(clip_sd, name=folder.name, dtype=dtype, device=device)
    t5_model = build_t5(t5_sd, name=folder.name, dtype=dtype, device=device)
    vae_model = build_vae(vae_sd, layout=vae_layout, name=folder.name, dtype=dtype, device=device)
    if dtype is not None:
        from .loader import _dtype_name

        formats = {k: _dtype_name(dtype) for k in formats}
    variant = "dev" if params.guidance_embed else "schnell"
    tokenizer_dir = t5_tokenizer_dir
    if tokenizer_dir is None and (folder / "tokenizer_2").is_dir():
        tokenizer_dir = folder / "tokenizer_2"
    return ModelBundle(
        family=Family.FLUX1, prediction_type=FLOW, unet=transformer, vae=vae_model, text_encoders=[clip, t5_model],
        tokenizers=[flux_clip_tokenizer(), t5_tokenizer(tokenizer_dir, host_roots=host_roots,
                                                        max_length=512 if variant == "dev" else 256)],
        scaling_factor=float(vae_model.config.scaling_factor), shift_factor=float(vae_model.config.shift_factor),
        name=folder.name, source=str(folder), variant=variant, weight_formats=formats,
        component_sources={"clip_l": clip_src, "t5": t5_src, "vae": vae_src})
