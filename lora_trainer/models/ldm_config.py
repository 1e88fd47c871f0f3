"""Model configs: the bundled diffusers/transformers JSON files and LDM/SGM yaml <-> diffusers configs.

An A1111-style `<checkpoint>.yaml` describes the model in LDM terms (`unet_config.params`,
`first_stage_config.params.ddconfig`, `cond_stage_config` / `conditioner`, `parameterization`,
`scale_factor`, `linear_start`/`linear_end`/`timesteps`). `ModelConfig.from_yaml` turns it into the
diffusers configs we build modules from; `ldm_yaml` writes one for a bundle (tiny checkpoints).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from .bundle import EPSILON, V_PREDICTION, Family, Schedule

# Text-encoder kinds: which bundled config and which LDM/SGM embedder class they stand for.
CLIP_L = "clip_l"
OPEN_CLIP_H = "open_clip_h"
OPEN_CLIP_G = "open_clip_g"
_TEXT_CONFIG_FILES = {CLIP_L: "clip_vit_l14", OPEN_CLIP_H: "open_clip_vit_h14", OPEN_CLIP_G: "open_clip_vit_bigg14"}
_DEFAULT_VERSIONS = {CLIP_L: "openai/clip-vit-large-patch14", OPEN_CLIP_H: "laion2b_s32b_b79k",
                     OPEN_CLIP_G: "laion2b_s39b_b160k"}
FAMILY_TEXT_KINDS = {Family.SD1: (CLIP_L,), Family.SD2: (OPEN_CLIP_H,), Family.SDXL: (CLIP_L, OPEN_CLIP_G)}


@cache
def _bundled(name: str) -> dict[str, Any]:
    text = (resources.files("lora_trainer.models") / "configs" / f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def bundled_config(name: str) -> dict[str, Any]:
    """A fresh copy of configs/<name>.json (e.g. 'sd15_unet', 'sdxl_vae', 'clip_vit_l14')."""
    return copy.deepcopy(_bundled(name))


@dataclass
class TextEncoderSpec:
    kind: str  # CLIP_L / OPEN_CLIP_H / OPEN_CLIP_G
    config: dict[str, Any]  # transformers CLIPTextConfig kwargs of the whole encoder in the file
    penultimate: bool = False  # drop the last layer (SD2 conditions on the penultimate one)
    source: str = "bundled"  # where the config came from, for messages


@dataclass
class ModelConfig:
    """Everything needed to build the diffusers modules of one checkpoint."""

    family: Family
    prediction_type: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[TextEncoderSpec]
    schedule: Schedule = field(default_factory=Schedule)
    scaling_factor: float = 0.18215
    source: str = "bundled"

    @classmethod
    def bundled(cls, family: Family, prediction_type: str = EPSILON) -> ModelConfig:
        family = Family(family)
        unet = bundled_config({Family.SD1: "sd15_unet", Family.SD2: "sd2_unet", Family.SDXL: "sdxl_unet"}[family])
        if family is Family.SD2 and prediction_type == V_PREDICTION:
            unet.update(sample_size=96, upcast_attention=True)  # as diffusers' SD2.1 768-v config
        vae = bundled_config("sdxl_vae" if family is Family.SDXL else "sd_vae")
        encoders = [TextEncoderSpec(k, bundled_config(_TEXT_CONFIG_FILES[k]), penultimate=family is Family.SD2)
                    for k in FAMILY_TEXT_KINDS[family]]
        return cls(family, prediction_type, unet, vae, encoders, Schedule(), float(vae.pop("scaling_factor")))

    @classmethod
    def from_yaml(cls, data: Mapping, family: Family, source: str = "yaml",
                  base_dir: str | os.PathLike | None = None) -> ModelConfig:
        """Read an A1111 LDM (SD1/SD2) or SGM (SDXL) inference yaml (already parsed).

        base_dir: where relative text-encoder `version` folders are looked up when they are not
        found relative to the working directory (the yaml's folder).
        """
        params = dict((data.get("model") or {}).get("params") or {})
        family = Family(family)
        base = cls.bundled(family)
        unet_params = _params(params.get("network_config") or params.get("unet_config"))
        if not unet_params:
            raise ValueError("the yaml has no model.params.unet_config / network_config")
        time_dim = None
        encoders = base.text_encoders
        conditioner = _params(params.get("conditioner_config"))
        if family is Family.SDXL:
            emb = list(conditioner.get("emb_models") or [])
            text_models = [m for m in emb if "Embedder" in str(m.get("target", "")) and
                           "Timestep" not in str(m.get("target", ""))]
            time_models = [m for m in emb if "Timestep" in str(m.get("target", ""))]
            if time_models:
                time_dim = int(_params(time_models[0]).get("outdim", 256))
            encoders = [_text_spec(kind, _params(m), family, True, base_dir)
                        for kind, m in zip((CLIP_L, OPEN_CLIP_G), text_models)]
            encoders += base.text_encoders[len(encoders):]
        else:
            cond = params.get("cond_stage_config") or {}
            kind = OPEN_CLIP_H if "OpenCLIP" in str(cond.get("target", "")) or family is Family.SD2 else CLIP_L
            encoders = [_text_spec(kind, _params(cond), family, bool(cond), base_dir)]
        unet = unet_config_from_ldm(unet_params, addition_time_embed_dim=time_dim)
        if int(unet_params["model_channels"]) == base.unet["block_out_channels"][0]:
            unet["sample_size"] = base.unet["sample_size"]  # full size: 64 / 96 (768-v) / 128 latents
        elif "image_size" in params:
            unet["sample_size"] = int(params["image_size"])
        ddconfig = _params(params.get("first_stage_config")).get("ddconfig")
        vae = vae_config_from_ldm(ddconfig) if ddconfig else base.vae
        prediction = _prediction_from_yaml(params) or EPSILON
        if family is Family.SD2 and prediction == V_PREDICTION:
            unet.setdefault("upcast_attention", True)
            if unet.get("sample_size") == 64 and unet["block_out_channels"][0] == 320:
                unet["sample_size"] = 96  # v2-inference-v.yaml says 64, but the model is 768 px
        return cls(family, prediction, unet, vae, encoders, _schedule_from_yaml(params),
                   float(params.get("scale_factor", base.scaling_factor)), source)


def _params(node: Any) -> dict[str, Any]:
    if not node:
        return {}
    return dict(node.get("params") or {})


def _prediction_from_yaml(params: Mapping) -> str | None:
    if "parameterization" in params:
        return V_PREDICTION if params["parameterization"] == "v" else EPSILON
    scaling = str(((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config", {}).get(
        "target", ""))
    if scaling.endswith("VScaling"):
        return V_PREDICTION
    if scaling.endswith("EpsScaling"):
        return EPSILON
    return None


_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}


def _schedule_from_yaml(params: Mapping) -> Schedule:
    disc = _params(_params(params.get("denoiser_config")).get("discretization_config"))
    source = {**disc, **{k: v for k, v in params.items() if k in ("linear_start", "linear_end", "timesteps",
                                                                  "beta_schedule")}}
    num = source.get("timesteps", source.get("num_timesteps", _params(params.get("denoiser_config")).get(
        "num_idx", 1000)))
    return Schedule(
        num_train_timesteps=int(num),
        beta_start=float(source.get("linear_start", 0.00085)),
        beta_end=float(source.get("linear_end", 0.012)),
        # LDM's "linear" interpolates sqrt(beta): diffusers calls that "scaled_linear".
        beta_schedule=_BETA_SCHEDULES.get(str(source.get("beta_schedule", "linear")), "scaled_linear"),
    )


def _text_spec(kind: str, params: Mapping, family: Family, given: bool,
               base_dir: str | os.PathLike | None) -> TextEncoderSpec:
    version = params.get("version")
    config, where = resolve_text_config(version, kind, base_dir)
    # An embedder the yaml names uses its class default ("last"), as ldm would; none named: SD2's usual.
    layer = params.get("layer", "last" if given or family is not Family.SD2 else "penultimate")
    return TextEncoderSpec(kind, config, penultimate=kind == OPEN_CLIP_H and layer == "penultimate", source=where)


def resolve_text_config(version: str | None, kind: str,
                        base_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], str]:
    """The text encoder config a yaml `version` names: a local folder, a cached Hub id, or bundled.

    Never touches the network: a Hub id is looked up in the local Hugging Face cache only; ids and
    OpenCLIP pretrained tags we know fall back to the bundled config. No version means the
    embedder's default (openai/clip-vit-large-patch14 for CLIP-L), as in ldm/sgm.
    """
    version = version or _DEFAULT_VERSIONS[kind]
    if version:
        version = str(version)
        if base_dir is not None and not os.path.isabs(version) and not os.path.isdir(version):
            beside = os.path.join(base_dir, version)
            if os.path.isdir(beside):
                version = beside
        if os.path.isdir(version):
            path = os.path.join(version, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"text encoder folder {version} has no config.json")
            return _text_config_from_file(path), version
        if "/" in version and not version.startswith((".", "/")):
            cached = _cached_hub_file(version, "config.json")
            if cached:
                return _text_config_from_file(cached), f"{version} (local Hugging Face cache)"
            if version != _DEFAULT_VERSIONS.get(kind):
                raise FileNotFoundError(
                    f"text encoder '{version}' is neither a local folder nor in the local Hugging Face cache")
    return bundled_config(_TEXT_CONFIG_FILES[kind]), "bundled"


def _cached_hub_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    try:  # the cache folder is read now, so HF_HOME/HF_HUB_CACHE set after import count too
        hit = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - malformed ids raise validation errors; treat as not cached
        return None
    return hit if isinstance(hit, str) else None


def _text_config_from_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if "text_config" in data:  # a whole CLIPModel config (openai/clip-vit-large-patch14 and the like)
        data = data["text_config"]
    return {k: v for k, v in data.items() if not k.startswith("_")}


# ---------------------------------------------------------------- UNet
def unet_config_from_ldm(p: Mapping, addition_time_embed_dim: int | None = None) -> dict[str, Any]:
    """LDM/SGM `UNetModel` params -> diffusers `UNet2DConditionModel` config."""
    ch = int(p["model_channels"])
    mult = list(p.get("channel_mult", (1, 2, 4, 4)))
    n = len(mult)
    block_out = [ch * m for m in mult]
    resolutions = {int(r) for r in p.get("attention_resolutions") or ()}
    depth = p.get("transformer_depth", 1)
    depths = list(depth) if isinstance(depth, (list, tuple)) else [int(depth)] * n
    attn = [2**i in resolutions and depths[i] > 0 for i in range(n)]
    head_channels = p.get("num_head_channels", -1)
    if head_channels not in (None, -1):
        heads: Any = [c // int(head_channels) for c in block_out]
    else:
        heads = p.get("num_heads", 8)
        heads = list(heads) if isinstance(heads, (list, tuple)) else int(heads)
    cfg: dict[str, Any] = {
        "sample_size": int(p.get("image_size", 64)),
        "in_channels": int(p.get("in_channels", 4)),
        "out_channels": int(p.get("out_channels", 4)),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": block_out,
        "layers_per_block": int(p.get("num_res_blocks", 2)),
        "attention_head_dim": heads,
        "cross_attention_dim": int(p["context_dim"]) if p.get("context_dim") else None,
        "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": depths if isinstance(depth, (list, tuple)) else int(depth),
        "norm_num_groups": 32,
    }
    if p.get("num_classes") == "sequential":
        cfg["addition_embed_type"] = "text_time"
        cfg["addition_time_embed_dim"] = addition_time_embed_dim or 256
        cfg["projection_class_embeddings_input_dim"] = int(p["adm_in_channels"])
    return cfg


def unet_params_to_ldm(cfg: Mapping, family: Family) -> dict[str, Any]:
    """diffusers UNet config -> LDM/SGM `UNetModel` params (what a yaml carries)."""
    block_out = list(cfg["block_out_channels"])
    ch = block_out[0]
    n = len(block_out)
    attn = ["Attn" in t for t in cfg["down_block_types"]]
    depth = cfg.get("transformer_layers_per_block", 1)
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]
    p: dict[str, Any] = {
        "use_checkpoint": False,
        "image_size": 32,  # unused by LDM
        "in_channels": cfg.get("in_channels", 4),
        "out_channels": cfg.get("out_channels", 4),
        "model_channels": ch,
        "attention_resolutions": [2**i for i in range(n) if attn[i]][::-1],
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "channel_mult": [c // ch for c in block_out],
    }
    if isinstance(heads, (list, tuple)):
        head_dims = {c // h for c, h in zip(block_out, heads)}
        if len(head_dims) != 1:
            raise ValueError("LDM needs the same head width on every level")
        p["num_head_channels"] = head_dims.pop()
    else:
        p["num_heads"] = int(heads)
    p.update(use_spatial_transformer=True,
             use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
             transformer_depth=list(depth) if isinstance(depth, (list, tuple)) else int(depth),
             context_dim=cfg["cross_attention_dim"],
             legacy=False)
    if family is Family.SDXL:
        p.update(adm_in_channels=cfg["projection_class_embeddings_input_dim"], num_classes="sequential",
                 spatial_transformer_attn_type="softmax")
    return p


# ---------------------------------------------------------------- VAE
def vae_config_from_ldm(dd: Mapping) -> dict[str, Any]:
    ch = int(dd.get("ch", 128))
    mult = list(dd.get("ch_mult", (1, 2, 4, 4)))
    return {
        "in_channels": int(dd.get("in_channels", 3)),
        "out_channels": int(dd.get("out_ch", 3)),
        "down_block_types": ["DownEncoderBlock2D"] * len(mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(mult),
        "block_out_channels": [ch * m for m in mult],
        "layers_per_block": int(dd.get("num_res_blocks", 2)),
        "latent_channels": int(dd.get("z_channels", 4)),
        "norm_num_groups": 32,
        "sample_size": int(dd.get("resolution", 256)),
    }


def vae_ddconfig_to_ldm(cfg: Mapping) -> dict[str, Any]:
    block_out = list(cfg["block_out_channels"])
    ch = block_out[0]
    return {
        "double_z": True,
        "z_channels": cfg.get("latent_channels", 4),
        "resolution": cfg.get("sample_size", 256),
        "in_channels": cfg.get("in_channels", 3),
        "out_ch": cfg.get("out_channels", 3),
        "ch": ch,
        "ch_mult": [c // ch for c in block_out],
        "num_res_blocks": cfg.get("layers_per_block", 2),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
