"""Diffusers/transformers modules built on the meta device with a checkpoint's own tensors assigned into
them (renamed, reshaped as views; copied only to change dtype or device): SD1/SD2/SDXL UNet, VAE and CLIP
text encoders from an LDM/SGM state dict, and the helpers the Flux loader shares (`empty_module`,
`move_buffers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedModelError
from . import ldm_convert as lc
from .bundle import Family
from .ldm_config import ModelConfig
from .unet_keys import unet_state_dict_to_diffusers


def init_kwargs(cls: type, config: Mapping[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted and not k.startswith("_")}


def empty_module(factory):
    """Build a module with parameters on the meta device (buffers stay real: CLIP's position_ids)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def config_remedy(cfg: ModelConfig) -> str:
    if cfg.source == "bundled":
        return (f"it is not a standard {cfg.family.label} model, so put its .yaml beside the checkpoint "
                "(same name) or choose a standard checkpoint.")
    return "the file is incomplete or its .yaml describes another model; fix or remove the .yaml."


def move_buffers(module: torch.nn.Module, device: str | torch.device | None,
                 weights: Mapping[str, torch.Tensor]) -> None:
    """Put every buffer of `module` on `device`, or (device None) where the assigned `weights` are."""
    target = torch.device(device) if device is not None else next((t.device for t in weights.values()), None)
    if target is not None:
        for sub in module.modules():
            for bname, buf in sub._buffers.items():
                if buf is not None and buf.device != target:
                    sub._buffers[bname] = buf.to(target)


def assign(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], component: str, name: str,
            cfg: ModelConfig, dtype: torch.dtype | None,
            device: str | torch.device | None) -> torch.nn.Module:
    expected = module.state_dict()
    buffers = {n for n, _ in module.named_buffers()}
    ready: dict[str, torch.Tensor] = {}
    for key, target in expected.items():
        if key not in weights:
            continue
        tensor = weights[key]
        try:
            tensor = lc.fit_shape(tensor, target.shape)
        except ValueError:
            raise UnsupportedModelError(
                f"{name}: {component} weight {key} has shape {tuple(tensor.shape)} but the model config "
                f"expects {tuple(target.shape)}; {config_remedy(cfg)}") from None
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        if device is not None and tensor.device != torch.device(device):
            tensor = tensor.to(device)
        ready[key] = tensor
    missing = [k for k in expected if k not in weights and k not in buffers]
    if missing:
        raise UnsupportedModelError(
            f"{name} lacks {len(missing)} {component} weights the model config expects (e.g. {missing[0]}); "
            f"{config_remedy(cfg)}")
    module.load_state_dict(ready, strict=False, assign=True)
    # Buffers the file does not hold (CLIP's position_ids) were built on the CPU: move them to where
    # the weights are, also when the host's tensors already sit on its GPU (device=None).
    move_buffers(module, device, ready)
    module.eval().requires_grad_(False)
    return module


def build_unet(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], name: str, dtype, device):
    from diffusers import UNet2DConditionModel

    config = dict(cfg.unet)
    proj = sd.get(lc.UNET_PREFIX + "input_blocks.4.1.proj_in.weight")
    if proj is None:
        proj = next((v for k, v in sd.items() if k.startswith(lc.UNET_PREFIX) and k.endswith("proj_in.weight")), None)
    if proj is not None:  # both layouts occur in SD2 files; follow the file
        config["use_linear_projection"] = proj.dim() == 2
    try:
        weights = unet_state_dict_to_diffusers(sd, config, prefix=lc.UNET_PREFIX)
    except KeyError as exc:
        raise UnsupportedModelError(
            f"{name} has UNet weights the model config does not know ({exc.args[0]}); "
            f"{config_remedy(cfg)}") from None
    unet = empty_module(lambda: UNet2DConditionModel(**init_kwargs(UNet2DConditionModel, config)))
    return assign(unet, weights, "UNet", name, cfg, dtype, device)


def build_vae(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], name: str, dtype, device):
    from diffusers import AutoencoderKL

    config = dict(cfg.vae)
    config["scaling_factor"] = cfg.scaling_factor
    weights = lc.vae_to_diffusers(sd, len(config["block_out_channels"]), int(config.get("layers_per_block", 2)))
    vae = empty_module(lambda: AutoencoderKL(**init_kwargs(AutoencoderKL, config)))
    return assign(vae, weights, "VAE", name, cfg, dtype, device)


def text_prefix(family: Family, index: int) -> str:
    if family is Family.SDXL:
        return (lc.SDXL_TEXT1_PREFIX, lc.SDXL_TEXT2_PREFIX)[index]
    return lc.SD2_TEXT_PREFIX if family is Family.SD2 else lc.SD1_TEXT_PREFIX


def build_text_encoders(cfg: ModelConfig, sd: Mapping[str, torch.Tensor], name: str, dtype, device) -> list:
    encoders = []
    for i, spec in enumerate(cfg.text_encoders):
        prefix = text_prefix(cfg.family, i)
        config = dict(spec.config)
        with_projection = cfg.family is Family.SDXL and i == 1
        if prefix.endswith(".model."):  # OpenCLIP layout
            layers = lc.open_clip_layer_count(sd, prefix)
            keep = layers - 1 if spec.penultimate else layers
            weights = lc.open_clip_to_diffusers(sd, prefix, keep, with_projection)
            proj = sd.get(prefix + "text_projection")
            if with_projection and proj is not None:
                config["projection_dim"] = int(proj.shape[1])
        else:
            weights = lc.clip_to_diffusers(sd, prefix)
            keep = 1 + max((int(k.split(".")[3]) for k in weights if k.startswith("text_model.encoder.layers.")),
                           default=-1)
        if keep <= 0:
            raise UnsupportedModelError(f"{name} has no text encoder layers under {prefix}; the file is incomplete.")
        config["num_hidden_layers"] = keep
        module = empty_text_encoder(config, with_projection)
        encoders.append(assign(module, lc.module_text_keys(weights, module), f"text encoder {i + 1}", name,
                                cfg, dtype, device))
    return encoders


def empty_text_encoder(config: Mapping[str, Any], with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    te_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    if _skips_init_on_meta():
        # Built under the meta device, transformers skips initialising weights the checkpoint replaces anyway
        # (0.07 s per CLIP-L on the development CPU); older versions would initialise them there too, slower.
        with torch.device("meta"):
            module = cls(te_config)
        if _real_position_ids(module):
            return module
    return empty_module(lambda: cls(te_config))  # parameters alone on the meta device, real buffers


def _skips_init_on_meta() -> bool:
    """transformers >= 5: `init_weights` does nothing under a meta device context."""
    import transformers

    try:
        return int(transformers.__version__.split(".")[0]) >= 5
    except ValueError:
        return False


def _real_position_ids(module: torch.nn.Module) -> bool:
    """Give a CLIP built on the meta device its real `position_ids` (0..n-1, as transformers makes them; the only
    buffer it has). False when another buffer is left on the meta device."""
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is None or not buf.is_meta:
                continue
            if name != "position_ids" or buf.dtype != torch.int64 or buf.dim() != 2 or buf.shape[0] != 1:
                return False
            sub._buffers[name] = torch.arange(buf.shape[1]).unsqueeze(0)
    return True


def meta_modules(config: ModelConfig) -> dict[str, torch.nn.Module]:
    """The modules a config describes, parameters on the meta device (sizes, names; no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    modules = {"unet": empty_module(lambda: UNet2DConditionModel(**init_kwargs(UNet2DConditionModel, config.unet))),
               "vae": empty_module(lambda: AutoencoderKL(**init_kwargs(AutoencoderKL, config.vae)))}
    for i, spec in enumerate(config.text_encoders):
        te = dict(spec.config)
        te["num_hidden_layers"] -= int(spec.penultimate)
        modules[f"te{i + 1}"] = empty_text_encoder(te, config.family is Family.SDXL and i == 1)
    return modules
