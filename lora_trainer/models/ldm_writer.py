"""Write a ModelBundle as an A1111/Forge-style single-file checkpoint (+ its yaml), or as a diffusers folder.

Used for tiny test/demo models; the layout is what A1111, Forge and Civitai files use:
`model.diffusion_model.*`, `first_stage_model.*`, and `cond_stage_model.transformer.text_model.*`
(SD1), `cond_stage_model.model.*` (SD2, OpenCLIP with fused `attn.in_proj_weight`),
`conditioner.embedders.{0,1}.*` (SDXL).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from . import ldm_convert as lc
from .bundle import V_PREDICTION, Family, ModelBundle
from .ldm_config import unet_params_to_ldm, vae_ddconfig_to_ldm
from .unet_keys import unet_state_dict_to_ldm


def _vae_shape(bundle: ModelBundle) -> tuple[int, int]:
    cfg = bundle.vae.config
    return len(cfg.block_out_channels), int(cfg.layers_per_block)


def _extra_open_clip_layer(encoder: Any, index: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random resblock after the last one: SD2 files hold one layer more than SD2 conditions on."""
    d = encoder.config.hidden_size
    inter = encoder.config.intermediate_size
    shapes = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
              "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
              "mlp.c_fc.weight": (inter, d), "mlp.c_fc.bias": (inter,), "mlp.c_proj.weight": (d, inter),
              "mlp.c_proj.bias": (d,)}
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=generator) / (shape[-1] ** 0.5 if len(shape) > 1 else 50)
        if name.startswith("ln_") and name.endswith("weight"):
            t += 1
        out[f"transformer.resblocks.{index}.{name}"] = t
    return out


def _schedule_buffers(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The DDPM buffers LDM checkpoints carry, computed as LDM's register_schedule does (float64)."""
    betas = bundle.noise_scheduler().betas.to(torch.float64)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1 - ac_prev) / (1 - ac)
    buffers = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def bundle_to_ldm_state_dict(bundle: ModelBundle, seed: int = 0) -> dict[str, torch.Tensor]:
    """The LDM/SGM single-file state dict of a bundle (tensors are contiguous copies or originals)."""
    g = torch.Generator().manual_seed(seed + 1)
    sd: dict[str, torch.Tensor] = {}
    sd.update(unet_state_dict_to_ldm(bundle.unet.state_dict(), bundle.unet.config, prefix=lc.UNET_PREFIX))
    sd.update(lc.vae_to_ldm(bundle.vae.state_dict(), *_vae_shape(bundle)))
    if bundle.family is Family.SD1:
        te = bundle.text_encoders[0]
        sd.update(lc.clip_to_ldm(te.state_dict(), lc.SD1_TEXT_PREFIX))
        n = te.config.max_position_embeddings
        sd[lc.SD1_TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n).unsqueeze(0)
    elif bundle.family is Family.SD2:
        te = bundle.text_encoders[0]
        p = lc.SD2_TEXT_PREFIX
        sd.update(lc.open_clip_to_ldm(te.state_dict(), p))
        sd.update({p + k: v for k, v in _extra_open_clip_layer(te, te.config.num_hidden_layers, g).items()})
        d = te.config.hidden_size
        sd[p + "text_projection"] = torch.randn(d, d, generator=g) / d**0.5
        sd[p + "logit_scale"] = torch.tensor(4.6052)
    else:
        te1 = bundle.text_encoders[0]
        sd.update(lc.clip_to_ldm(te1.state_dict(), lc.SDXL_TEXT1_PREFIX))
        sd.update(lc.open_clip_to_ldm(bundle.text_encoders[1].state_dict(), lc.SDXL_TEXT2_PREFIX))
        sd[lc.SDXL_TEXT2_PREFIX + "logit_scale"] = torch.tensor(4.6052)
    if bundle.family is not Family.SDXL:
        sd.update(_schedule_buffers(bundle))
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _text_folder_config(encoder: Any, extra_layers: int = 0) -> dict[str, Any]:
    cfg = encoder.config.to_dict()
    cfg["num_hidden_layers"] = cfg["num_hidden_layers"] + extra_layers
    cfg["architectures"] = [type(encoder).__name__]
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
              "_attn_implementation_autoset", "id2label", "label2id"):
        cfg.pop(k, None)
    return cfg


def write_text_encoder_folders(bundle: ModelBundle, folder: Path) -> list[Path]:
    """One folder per text encoder with config.json + tokenizer files (what a yaml `version` names).

    Holds the whole encoder as the file stores it (SD2: one layer more than the module we train).
    """
    out = []
    for i, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers)):
        path = folder / f"text_encoder{'' if i == 0 else f'_{i + 1}'}"
        path.mkdir(parents=True, exist_ok=True)
        extra = 1 if bundle.family is Family.SD2 else 0
        atomic_write_text(path / "config.json", json.dumps(_text_folder_config(te, extra), indent=2) + "\n")
        write_tokenizer_files(tok, path)
        out.append(path)
    return out


def write_tokenizer_files(tokenizer: Any, folder: Path) -> None:
    """Slow-tokenizer files (vocab.json, merges.txt, configs) every transformers version reads.

    transformers 5's save_pretrained writes only tokenizer.json, which transformers 4.30 (A1111)
    cannot read, so the files are written directly from the bundled BPE files.
    """
    import shutil
    from importlib import resources

    folder = Path(folder)
    src = resources.files("lora_trainer.models") / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        with resources.as_file(src / name) as p:
            shutil.copyfile(p, folder / name)
    pad = str(tokenizer.pad_token)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    config = {**special, "add_prefix_space": False, "errors": "replace", "do_lower_case": True,
              "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


def ldm_yaml(bundle: ModelBundle, text_encoder_dirs: list[Path]) -> dict[str, Any]:
    """The A1111 inference yaml for a bundle, shaped like v1-inference.yaml / v2-inference(-v).yaml /
    sd_xl_base.yaml with this model's sizes."""
    fam = bundle.family
    sched = bundle.schedule
    unet = {"target": ("sgm" if fam is Family.SDXL else "ldm") + ".modules.diffusionmodules.openaimodel.UNetModel",
            "params": unet_params_to_ldm(dict(bundle.unet.config), fam)}
    ddconfig = vae_ddconfig_to_ldm(dict(bundle.vae.config))
    versions = [str(p.resolve()) for p in text_encoder_dirs]
    if fam is Family.SDXL:
        ddconfig = {"attn_type": "vanilla", **ddconfig}
        v = bundle.prediction_type == V_PREDICTION
        time_dim = int(bundle.unet.config.addition_time_embed_dim)
        te1 = bundle.text_encoders[0]
        params: dict[str, Any] = {
            "scale_factor": bundle.scaling_factor,
            "disable_first_stage_autocast": True,
            "denoiser_config": {
                "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {
                    "num_idx": sched.num_train_timesteps,
                    "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting."
                                                   + ("VWeighting" if v else "EpsWeighting")},
                    "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling."
                                                 + ("VScaling" if v else "EpsScaling")},
                    "discretization_config": {
                        "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                        "params": {"linear_start": sched.beta_start, "linear_end": sched.beta_end,
                                   "num_timesteps": sched.num_train_timesteps}},
                },
            },
            "network_config": unet,
            "conditioner_config": {
                "target": "sgm.modules.GeneralConditioner",
                "params": {"emb_models": [
                    {"is_trainable": False, "input_key": "txt",
                     "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                     "params": {"layer": "hidden", "layer_idx": te1.config.num_hidden_layers - 1,
                                "version": versions[0]}},
                    {"is_trainable": False, "input_key": "txt",
                     "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                     "params": {"arch": "ViT-bigG-14", "version": versions[1], "freeze": True,
                                "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
                    *({"is_trainable": False, "input_key": key,
                       "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                       "params": {"outdim": time_dim}}
                      for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")),
                ]},
            },
            "first_stage_config": {
                "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": ddconfig,
                           "lossconfig": {"target": "torch.nn.Identity"}},
            },
        }
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}

    params = {}
    if bundle.prediction_type == V_PREDICTION:
        params["parameterization"] = "v"
    params.update({
        "linear_start": sched.beta_start, "linear_end": sched.beta_end, "num_timesteps_cond": 1,
        "log_every_t": 200, "timesteps": sched.num_train_timesteps, "first_stage_key": "jpg",
        "cond_stage_key": "txt", "image_size": int(bundle.unet.config.sample_size), "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": bundle.scaling_factor, "use_ema": False,
        "unet_config": unet,
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": ddconfig,
                       "lossconfig": {"target": "torch.nn.Identity"}},
        },
    })
    if fam is Family.SD2:
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                       "params": {"freeze": True, "layer": "penultimate", "version": versions[0]}}
    else:
        params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                       "params": {"version": versions[0]}}
    return {"model": {"base_learning_rate": 1.0e-04, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _temp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _publish(tmp: str, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path, fmt: str,
                    metadata: dict[str, str] | None = None) -> None:
    """Atomically write `.safetensors` or a `.ckpt` ({"state_dict": ...}, as LDM training saves it)."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, tmp, metadata=metadata)
        else:
            torch.save({"state_dict": state_dict, "global_step": 0}, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_diffusers_folder(bundle: ModelBundle, folder: Path) -> Path:
    """A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = bundle.family is Family.SDXL
    bundle.unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    bundle.vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    vae_cfg["scaling_factor"] = bundle.scaling_factor  # the bundle's value, not the module default
    atomic_write_text(folder / "vae" / "config.json", json.dumps(vae_cfg, indent=2) + "\n")
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline",
        "_diffusers_version": "0.29.2",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    for i, (te, tok) in enumerate(zip(bundle.text_encoders, bundle.tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"
        te.save_pretrained(str(folder / f"text_encoder{suffix}"), safe_serialization=True)
        (folder / f"tokenizer{suffix}").mkdir(exist_ok=True)
        write_tokenizer_files(tok, folder / f"tokenizer{suffix}")
        index[f"text_encoder{suffix}"] = ["transformers", type(te).__name__]
        index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    bundle.noise_scheduler().save_pretrained(str(folder / "scheduler"))
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
    return folder
