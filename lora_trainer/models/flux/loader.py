"""Load Flux.1 into a ModelBundle: the transformer (BFL single file with or without
`model.diffusion_model.`, diffusers-layout file or folder; bf16/fp16/fp32/fp8/scaled fp8) plus
CLIP-L, T5-XXL and the VAE, each from its own file, from an all-in-one checkpoint, or found
beside the model where WebUIs and ComfyUI keep them.

Modules are built on the meta device and hold the files' own tensors (memory-mapped; copied only
to change dtype or device), as for SD. The `build_*` functions take BFL/transformers-keyed tensors
already in memory (a host's) and do the same without files.
"""

from __future__ import annotations

import inspect as _inspect
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import UnsupportedModelError
from .. import ldm_convert as lc
from ..build import empty_module, move_buffers
from ..bundle import FLOW, Family, ModelBundle
from ..detect import read_safetensors_header
from ..ldm_config import bundled_config
from . import convert as cv
from . import detect as fd
from .fp8 import SCALE, dequantize, is_fp8
from .model import FluxParams, FluxTransformer
from .tokenizers import flux_clip_tokenizer, t5_tokenizer

log = logging.getLogger(__name__)

MIN_DIFFUSERS = (0, 30)
OPTIONS = {fd.CLIP_L: "--clip-l", fd.T5: "--t5", fd.VAE: "--vae"}
_SHORT = {fd.CLIP_L: "CLIP-L text encoder", fd.T5: "T5-XXL text encoder", fd.VAE: "VAE (ae.safetensors)"}
_NAMES = {fd.CLIP_L: ("clip_l*.safetensors", "clip-l*.safetensors", "ViT-L-14*.safetensors", "clip_l*.sft"),
          fd.T5: ("t5xxl*.safetensors", "t5-xxl*.safetensors", "t5_xxl*.safetensors", "t5-v1_1-xxl*.safetensors",
                  "t5xxl*.sft"),
          fd.VAE: ("ae.safetensors", "ae.sft", "flux*vae*.safetensors", "flux*ae*.safetensors", "FLUX*ae*.safetensors")}
_PART_DIRS = {fd.CLIP_L: ("text_encoder", "text_encoders", "clip", "CLIP"),
              fd.T5: ("text_encoder", "text_encoders", "clip", "CLIP"),
              fd.VAE: ("VAE", "vae")}


def check_diffusers() -> None:
    """Flux's VAE config (no quant convs) and the LoRA consumers need diffusers >= 0.30."""
    import diffusers

    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_DIFFUSERS:
        raise UnsupportedModelError(
            f"Flux needs diffusers 0.30 or newer but this environment has {diffusers.__version__} (the "
            "AUTOMATIC1111 WebUI pins it); train Flux in Forge or with the standalone CLI.")


# ---------------------------------------------------------------- files
class _File:
    """A safetensors file: header (names, shapes, dtypes) now, tensors memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = path
        self.tensors, self.metadata = read_safetensors_header(path)
        self.info = fd.inspect(self.tensors, path.name)

    def read(self, prefix: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                for key in self.tensors:
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise UnsupportedModelError(
                f"{self.path.name} could not be read ({exc}); download or copy it again.") from exc
        return out


def _open(path: str | os.PathLike, what: str) -> _File:
    path = Path(path)
    if not path.is_file():
        raise UnsupportedModelError(f"{what} {path} does not exist; check the path.")
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise UnsupportedModelError(
            f"{path.name} is not a .safetensors file; Flux parts load from .safetensors files (convert it first).")
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            raise fd.refuse(path.name, "a GGUF-quantised model",
                            "choose the bf16 or fp8 .safetensors file of the same model.")
    return _File(path)


def search_dirs(model: Path) -> list[Path]:
    """Folders searched for text encoders and the VAE: the model's own, then the sibling folders a
    WebUI or ComfyUI keeps them in (models/text_encoder, models/clip, models/VAE, ...)."""
    start = model if model.is_dir() else model.parent
    dirs = [start]
    for parent in list(start.parents)[:3]:
        for name in sorted({d for ds in _PART_DIRS.values() for d in ds}):
            if (parent / name).is_dir():
                dirs.append(parent / name)
        if parent.name.lower() == "models":
            break
    return list(dict.fromkeys(dirs))


def find_part(part: str, dirs: Iterable[Path]) -> Path | None:
    """The file for `part` in `dirs` (first folder that has one; full precision before fp8)."""
    for d in dirs:
        hits = sorted({p for pattern in _NAMES[part] for p in d.glob(pattern) if p.is_file()})
        if hits:
            hits.sort(key=lambda p: ("fp8" in p.name.lower(), p.name))
            return hits[0]
    return None


# ---------------------------------------------------------------- module building
def _cast(tensor: torch.Tensor, scale: torch.Tensor | None, dtype, device) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point() and (tensor.dtype != dtype or scale is not None):
        tensor = dequantize(tensor, scale, dtype) if (is_fp8(tensor) or scale is not None) else tensor.to(dtype)
    if device is not None and tensor.device != torch.device(device):
        tensor = tensor.to(device)
    return tensor


def _assign(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str, name: str,
            dtype, device) -> torch.nn.Module:
    """Put `weights` into the meta `module` (load_state_dict assign). fp8 `scale_weight`s stay as
    buffers beside their weight when dtype is None, else the weight is dequantised with them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights and k not in dict(module.named_buffers())]
    if missing:
        raise UnsupportedModelError(
            f"{name} lacks {len(missing)} {what} weights (e.g. {missing[0]}); the file is incomplete or another "
            "model, so download it again or choose the right file.")
    ready: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key not in weights:
            continue
        tensor = weights[key]
        if tuple(tensor.shape) != tuple(target.shape):
            try:
                tensor = lc.fit_shape(tensor, target.shape)
            except ValueError:
                raise UnsupportedModelError(
                    f"{name}: {what} weight {key} has shape {tuple(weights[key].shape)} where "
                    f"{tuple(target.shape)} was expected; the file is damaged or another model.") from None
        scale = weights.get(key[: -len("weight")] + SCALE) if key.endswith("weight") else None
        ready[key] = _cast(tensor, scale if dtype is not None else None, dtype, device)
    module.load_state_dict(ready, strict=False, assign=True)
    if dtype is None:
        _widen_fp8_non_linear(module)
    if dtype is None:  # keep scaled-fp8 scales beside their weights, named as in the file
        for key, scale in weights.items():
            if key.endswith("." + SCALE) and key[: -len(SCALE)] + "weight" in ready:
                owner = module.get_submodule(key[: -len(SCALE) - 1])
                owner.register_buffer(SCALE, scale if device is None else scale.to(device))
    move_buffers(module, device, ready)
    module.eval().requires_grad_(False)
    return module


def _widen_fp8_non_linear(module: torch.nn.Module) -> None:
    """fp8 files may store embeddings and norms in fp8 too (t5xxl_fp8_e4m3fn); only Linear layers
    have an fp8 path (dequantised per layer), so those few small tensors become bf16 here."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            continue
        for pname, param in list(sub._parameters.items()):
            if param is not None and is_fp8(param):
                sub._parameters[pname] = torch.nn.Parameter(param.data.to(torch.bfloat16), requires_grad=False)


def build_transformer(state_dict: Mapping[str, torch.Tensor], *, params: FluxParams | None = None,
                      name: str = "model", dtype: torch.dtype | None = None,
                      device: str | torch.device | None = None) -> FluxTransformer:
    """A FluxTransformer holding `state_dict` (BFL keys, no prefix) as is; params from shapes."""
    from .chroma import ChromaParams, ChromaTransformer

    if params is None:
        infos = {k: _info(v) for k, v in state_dict.items()}
        params = fd.chroma_params(infos) if "distilled_guidance_layer.in_proj.weight" in infos else fd.bfl_params(infos)
    cls = ChromaTransformer if isinstance(params, ChromaParams) else FluxTransformer
    model = empty_module(lambda: cls(params))
    return _assign(model, state_dict, "Flux transformer", name, dtype, device)


def _info(t: torch.Tensor):
    from ..loader import tensor_infos

    return next(iter(tensor_infos({"x": t}).values()))


def build_clip_l(state_dict: Mapping[str, torch.Tensor], *, name: str = "clip_l", dtype=None, device=None):
    """CLIPTextModel (CLIP-L) from `text_model.*` keys; sizes from the shapes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = cv.clip_weights(state_dict)
    width = sd["text_model.embeddings.token_embedding.weight"].shape[1]
    config = bundled_config("clip_vit_l14")
    config.update(
        hidden_size=width, vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0],
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")),
        num_attention_heads=max(1, width // 64), projection_dim=width)
    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    module = empty_module(lambda: CLIPTextModel(te_config))
    return _assign(module, lc.module_text_keys(sd, module), "CLIP-L", name, dtype, device)


def build_t5(state_dict: Mapping[str, torch.Tensor], *, name: str = "t5xxl", dtype=None, device=None):
    """T5EncoderModel (T5-XXL) from `encoder.*`/`shared.weight` keys; sizes from the shapes."""
    from transformers import T5Config, T5EncoderModel

    sd = cv.t5_weights(state_dict)
    if "shared.weight" not in sd:
        raise UnsupportedModelError(f"{name} has no T5 token embedding (shared.weight); the file is incomplete.")
    config = bundled_config("t5_xxl")
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    d_model = sd["shared.weight"].shape[1]
    config.update(
        vocab_size=sd["shared.weight"].shape[0], d_model=d_model, num_heads=heads,
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block.")),
        relative_attention_num_buckets=sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[0])
    config["num_decoder_layers"] = config["num_layers"]
    t5_config = T5Config(**{k: v for k, v in config.items() if k not in ("architectures",)})
    module = empty_module(lambda: T5EncoderModel(t5_config))
    module = _assign(module, sd, "T5-XXL", name, dtype, device)
    return module


def build_vae(state_dict: Mapping[str, torch.Tensor], *, layout: str = "ldm", name: str = "ae",
              dtype=None, device=None):
    """diffusers AutoencoderKL with Flux's config (16 latent channels, scaling 0.3611, shift 0.1159)
    from ae.safetensors keys (layout "ldm") or diffusers keys; channel counts from the shapes."""
    from diffusers import AutoencoderKL

    if layout == "ldm":
        levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down."))
        per_level = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down.0.block."))
        channels = [state_dict[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
        weights = lc.vae_to_diffusers(state_dict, levels, per_level, prefix="")
    else:
        levels = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.down_blocks."))
        per_level = 1 + max(int(k.split(".")[4]) for k in state_dict if k.startswith("encoder.down_blocks.0.resnets."))
        channels = [state_dict[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
        weights = dict(state_dict)
    config = bundled_config("flux_vae")
    config.update(block_out_channels=channels, layers_per_block=per_level,
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  latent_channels=weights["decoder.conv_in.weight"].shape[1])
    accepted = _inspect.signature(AutoencoderKL.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in accepted}
    module = empty_module(lambda: AutoencoderKL(**kwargs))
    return _assign(module, weights, "VAE", name, dtype, device)


# ---------------------------------------------------------------- the whole model
@dataclass
class FluxFiles:
    """Which file (and key prefix) each part of a Flux model comes from; headers only."""

    model: _File
    parts: dict[str, tuple[_File, str]]  # part -> (file, prefix), for TRANSFORMER, CLIP_L, T5, VAE

    @property
    def info(self) -> fd.FluxFileInfo:
        return self.model.info

    def read(self, part: str) -> dict[str, torch.Tensor]:
        f, prefix = self.parts[part]
        return f.read(prefix)


def resolve_flux_files(model: str | os.PathLike, *, clip_l: str | os.PathLike | None = None,
                       t5: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                       search: bool = True) -> FluxFiles:
    """Check a Flux model file and find its text encoders and VAE from headers alone (fast: call it
    before any heavy work). Every problem is an UnsupportedModelError of one sentence."""
    model = Path(model)
    main = _open(model, "Model")
    info = main.info
    if info is None or fd.TRANSFORMER not in info.prefixes:
        reason = fd.component_only_error(info, model.name) if info is not None else None
        raise reason or UnsupportedModelError(f"{model.name} holds no Flux transformer weights; {fd.REMEDY}")
    parts: dict[str, tuple[_File, str]] = {fd.TRANSFORMER: (main, info.prefixes[fd.TRANSFORMER])}
    looked: list[Path] = []
    needed = fd.PARTS_NEEDED[info.family]
    if clip_l is not None and fd.CLIP_L not in needed:
        raise UnsupportedModelError(
            f"{model.name} is a Chroma model, which has no CLIP-L text encoder; leave --clip-l out.")
    for part, given in ((fd.CLIP_L, clip_l), (fd.T5, t5), (fd.VAE, vae)):
        if part not in needed:
            continue
        if given is not None:
            f = _open(given, f"The {_SHORT[part]} file")
            fd.check_part(f.info, part, f.path.name, OPTIONS[part], f.tensors)
            parts[part] = (f, f.info.prefixes[part])
        elif part in info.prefixes:
            fd.check_part(info, part, model.name, OPTIONS[part], main.tensors)
            parts[part] = (main, info.prefixes[part])
        elif search:
            looked = looked or search_dirs(model)
            found = find_part(part, looked)
            if found is not None:
                f = _open(found, "File")
                fd.check_part(f.info, part, found.name, OPTIONS[part], f.tensors)
                log.info("Flux %s: using %s", part, found)
                parts[part] = (f, f.info.prefixes[part])
    missing = [p for p in needed if p not in parts]
    if missing:
        what = " and ".join(_SHORT[p] for p in missing)
        where = ", ".join(str(d) for d in looked) if looked else "nowhere (search is off)"
        raise UnsupportedModelError(
            f"{'Chroma' if info.family is Family.CHROMA else 'Flux'} needs its {what}, which {model.name} does not contain and none was found beside it (looked in "
            f"{where}); pass the file{'s' if len(missing) > 1 else ''} with "
            + " and ".join(OPTIONS[p] for p in missing) + ".")
    return FluxFiles(main, parts)


def load_flux(model: str | os.PathLike, *, clip_l: str | os.PathLike | None = None,
              t5: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
              t5_tokenizer_dir: str | os.PathLike | None = None, host_roots: Iterable[str | os.PathLike] = (),
              dtype: torch.dtype | None = torch.float32, device: str | torch.device | None = "cpu",
              search: bool = True) -> ModelBundle:
    """Load a Flux.1 (or Chroma: T5 and VAE only) model. `clip_l`/`t5`/`vae`: separate files (None: the model file's own, else
    found beside it when `search`). `dtype=None, device=None`: tensors as stored, memory-mapped
    (fp8 stays fp8, see fp8.py); a dtype dequantises fp8 and casts everything."""
    check_diffusers()
    model = Path(model)
    if model.is_dir():
        from .diffusers_folder import load_flux_folder

        return load_flux_folder(model, clip_l=clip_l, t5=t5, vae=vae, t5_tokenizer_dir=t5_tokenizer_dir,
                                host_roots=host_roots, dtype=dtype, device=device)
    files = resolve_flux_files(model, clip_l=clip_l, t5=t5, vae=vae, search=search)
    info = files.info
    transformer_sd = files.read(fd.TRANSFORMER)
    if info.layout == "diffusers":
        try:
            transformer_sd = cv.diffusers_to_bfl(transformer_sd)
        except KeyError as exc:
            raise UnsupportedModelError(
                f"{model.name} has a diffusers-layout key this loader does not know ({exc.args[0]}); "
                f"{fd.REMEDY}") from None
    transformer = build_transformer(transformer_sd, params=info.params, name=model.name, dtype=dtype,
                                    device=device)
    chroma = info.family is Family.CHROMA
    source = {part: files.parts[part][0] for part in fd.PARTS_NEEDED[info.family]}
    encoders = [] if chroma else [
        build_clip_l(files.read(fd.CLIP_L), name=source[fd.CLIP_L].path.name, dtype=dtype, device=device)]
    encoders.append(build_t5(files.read(fd.T5), name=source[fd.T5].path.name, dtype=dtype, device=device))
    vae_model = build_vae(files.read(fd.VAE), layout=source[fd.VAE].info.vae_layout, name=source[fd.VAE].path.name,
                          dtype=dtype, device=device)
    formats = {"unet": info.formats.get(fd.TRANSFORMER, "unknown")}
    for part, key in ((fd.CLIP_L, "te1"), (fd.T5, "te3"), (fd.VAE, "vae")):
        if part in source:
            formats[key] = source[part].info.formats.get(part, "unknown")
    if dtype is not None:
        formats = {k: _dtype_name(dtype) for k in formats}
    t5_tok = t5_tokenizer(t5_tokenizer_dir, host_roots=host_roots,
                          max_length=256 if info.variant == "schnell" else 512)
    bundle = ModelBundle(
        family=info.family, prediction_type=FLOW, unet=transformer, vae=vae_model, text_encoders=encoders,
        tokenizers=[t5_tok] if chroma else [flux_clip_tokenizer(), t5_tok],
        scaling_factor=float(vae_model.config.scaling_factor), shift_factor=float(vae_model.config.shift_factor),
        name=model.stem, source=str(model), variant=info.variant, weight_formats=formats,
        component_sources={part: str(f.path) for part, f in source.items()})
    if model.stat().st_size <= 256 * 2**20:
        from ..loader import checkpoint_sha256

        bundle.model_hash = checkpoint_sha256(model)
    return bundle


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))

