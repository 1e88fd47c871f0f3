"""Forge's loaded model -> a trainable ModelBundle that shares Forge's weight storage.

Forge (lllyasviel/stable-diffusion-webui-forge, `backend/`) keeps its model in
`sd_model.forge_objects`: the UNet with LDM names at `unet.model.diffusion_model`, HF CLIP text
encoders at `clip.cond_stage_model.clip_l|clip_h|clip_g.transformer`, an LDM-named VAE at
`vae.first_stage_model`, the noise schedule and prediction type at `unet.model.predictor`.
Its weights are *inference tensors* (loaded under `torch.inference_mode()`), its Linear layers
are not `nn.Linear` and its forward is not autograd-safe, so we never train on its modules.
Instead we build diffusers/transformers skeletons on the meta device and give each of their
parameters a fresh tensor `set_()` onto the same storage as Forge's: zero copy, an ordinary
(non-inference) tensor autograd accepts, and Forge's own tensors stay untouched.

On the CPU, training computes in fp32. Forge keeps CLIP in fp16 there, and Neo's `--bf16-unet` /
`--fp16-unet` keep the UNet in half precision: each such Linear becomes a `quant.QuantLinear` over
the very same half-precision tensor, widened to fp32 for one product at a time (forward and
backward), exactly as Forge's own layers cast per call; only the small rest (convolutions, norms,
embeddings) is copied to fp32.

This module reads Forge's objects by attribute only (no `backend.*` import), so the tests can
drive it with Forge-shaped stand-ins.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import quant
from ..errors import UnsupportedModelError
from ..models.bundle import EPSILON, V_PREDICTION, Family, ModelBundle, Schedule
from . import forge_storage

log = logging.getLogger(__name__)

TRAINABLE_DTYPES = forge_storage.TRAINABLE_DTYPES
# kohya/diffusers order of the text encoders per family, by Forge's JointTextEncoder keys.
_TEXT_KEYS = {Family.SD1: ("clip_l",), Family.SD2: ("clip_h",), Family.SDXL: ("clip_l", "clip_g")}


class LowBitModelError(UnsupportedModelError):
    """The loaded weights are stored in fp8/nf4/fp4/GGUF: no exact tensors to train on."""

    def __init__(self, cause: str, remedy: str) -> None:
        super().__init__(f"{cause}; {remedy}")
        self.cause = cause


# ---------------------------------------------------------------- tensors
def alias(tensor: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on the same storage as `tensor` (which may be an inference tensor).

    Views or `detach()` of an inference tensor are inference tensors, and autograd refuses to
    save those for backward; `set_()` onto the storage is not, on torch 2.1 up to the newest.
    """
    with torch.inference_mode(False):
        out = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        out.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return out


def is_low_bit(tensor: torch.Tensor) -> bool:
    """fp8 storage, bitsandbytes 4-bit or GGUF parameters (Forge's "Diffusion in Low Bits")."""
    return not forge_storage.is_trainable(forge_storage.tensor_format(tensor))


def check_storage(sd_model: Any) -> None:
    """Raise LowBitModelError when any weight of UNet, text encoders or VAE is not plain fp32/fp16/bf16.

    fp8 (plain or scaled), int8 (Neo), nf4/fp4 (bitsandbytes), GGUF and Nunchaku SVDQ hold no exact
    weights to train on (forge_storage.probe_forge_model names each part's format).
    """
    report = forge_storage.probe_forge_model(sd_model)
    if not report.trainable_in_place:
        raise LowBitModelError(
            f"The loaded model is stored in low bits ({report.low_bit_text()}), which cannot be trained exactly",
            "set 'Diffusion in Low Bits' to 'Automatic' (fp16/bf16) to train on the loaded model, or train from "
            "the checkpoint file.")


# ---------------------------------------------------------------- Forge state
def forge_tensors(sd_model: Any) -> dict[str, torch.Tensor]:
    """Every weight of Forge's UNet, text encoders and VAE (Forge's own tensors, for hashing)."""
    fo = sd_model.forge_objects_original
    out: dict[str, torch.Tensor] = {}
    for prefix, module in (("unet.", fo.unet.model.diffusion_model), ("clip.", fo.clip.cond_stage_model),
                           ("vae.", fo.vae.first_stage_model)):
        out.update({prefix + k: v for k, v in module.named_parameters()})
    return out


def shared_fraction(bundle: ModelBundle, sd_model: Any) -> float:
    """Share of the bundle's weights (by bytes) that live in Forge's own storage (1.0 = zero copy);
    Linears read per layer (QuantLinear) count with their stored tensors."""
    theirs = {t.untyped_storage().data_ptr() for t in forge_tensors(sd_model).values()}
    total = shared = 0
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        for p in (*module.parameters(), *quant.stored_tensors(module).values()):
            size = p.numel() * p.element_size()
            total += size
            shared += size if p.untyped_storage().data_ptr() in theirs else 0
    return shared / total if total else 0.0


def widened_per_layer(bundle: ModelBundle) -> str:
    """e.g. "UNet bf16, text encoders fp16": the parts whose Linears are read in half precision and
    widened one layer at a time ("" when none is)."""
    parts = []
    for what, modules in (("UNet", [bundle.unet]), ("text encoders", bundle.text_encoders)):
        counts = sum((quant.formats(m) for m in modules if m is not None), Counter())
        if counts:
            parts.append(f"{what} {'/'.join(sorted(counts))}")
    return ", ".join(parts)


def restore_clean_weights(sd_model: Any) -> None:
    """Undo merged LoRAs: Forge merges them by swapping in patched Parameters, with a backup.

    `forge_objects_original` holds patchers without LoRA patches that share the model and its
    LoraLoader; refreshing them puts the backed-up (clean) Parameters back and drops online LoRAs.
    """
    fo = sd_model.forge_objects_original
    fo.unet.refresh_loras()
    fo.clip.patcher.refresh_loras()


def reset_lora_state(sd_model: Any) -> None:
    """Make the next generation rebuild its LoRA set from scratch (new files, clean weights)."""
    sd_model.current_lora_hash = str([])
    original = sd_model.forge_objects_original
    sd_model.forge_objects = original.shallow_copy()
    sd_model.forge_objects_after_applying_lora = original.shallow_copy()


def family_of(sd_model: Any) -> Family:
    if getattr(sd_model, "is_sdxl", False):
        encoders = dict(sd_model.forge_objects_original.clip.cond_stage_model.named_children())
        if getattr(sd_model, "is_sdxl_refiner", False) or "clip_l" not in encoders:
            raise UnsupportedModelError(
                "The loaded model is an SDXL refiner, which LoRAs are not trained for; load an SDXL base "
                "model or an SD1/SD2 model.")
        return Family.SDXL
    if getattr(sd_model, "is_sd2", False):
        return Family.SD2
    if getattr(sd_model, "is_sd1", False):
        return Family.SD1
    kind = type(sd_model).__name__
    raise UnsupportedModelError(
        f"The loaded model ({kind}) is not SD1, SD2 or SDXL, the families LoRA Trainer supports; "
        "load one of those in the checkpoint menu.")


# ---------------------------------------------------------------- configs
def diffusers_unet_config(cfg: Mapping[str, Any], family: Family, text_embed_dim: int | None = None
                          ) -> dict[str, Any]:
    """Forge's UNet config (huggingface_guess: per-resblock `transformer_depth`) -> diffusers config.

    text_embed_dim: SDXL's pooled text width (clip_g projection_dim); the rest of `adm_in_channels`
    is 6 time ids of `addition_time_embed_dim` each (256 in SDXL base).
    """
    ch = int(cfg["model_channels"])
    mult = [int(m) for m in cfg["channel_mult"]]
    n = len(mult)
    nrb = cfg["num_res_blocks"]
    nrb = [int(x) for x in nrb] if isinstance(nrb, (list, tuple)) else [int(nrb)] * n
    depth = cfg.get("transformer_depth", 1)
    if isinstance(depth, (list, tuple)):  # one entry per input resblock
        starts = [sum(nrb[:i]) for i in range(n)]
        level_depth = [int(depth[s]) if s < len(depth) else 0 for s in starts]
    else:
        level_depth = [int(depth)] * n
    attn = [d > 0 for d in level_depth]
    block_out = [ch * m for m in mult]
    head_ch = cfg.get("num_head_channels", -1)
    if head_ch not in (None, -1):
        heads: Any = [c // int(head_ch) for c in block_out]
    else:
        heads = int(cfg.get("num_heads", 8))
    layers = [max(d, 1) for d in level_depth]
    mid = cfg.get("transformer_depth_middle")
    if mid is not None and int(mid) >= 1 and int(mid) != layers[-1]:
        layers[-1] = int(mid)  # diffusers reads the middle block's depth from the last level
    out = {
        "sample_size": 128 if family is Family.SDXL else 64,
        "in_channels": int(cfg.get("in_channels", 4)),
        "out_channels": int(cfg.get("out_channels", 4)),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": block_out,
        "layers_per_block": nrb[0] if len(set(nrb)) == 1 else nrb,
        "attention_head_dim": heads,
        "cross_attention_dim": int(cfg["context_dim"]),
        "use_linear_projection": bool(cfg.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        "norm_num_groups": 32,
    }
    if cfg.get("adm_in_channels"):
        out["addition_embed_type"] = "text_time"
        adm = int(cfg["adm_in_channels"])
        out["addition_time_embed_dim"] = (adm - text_embed_dim) // 6 if text_embed_dim else 256
        out["projection_class_embeddings_input_dim"] = int(cfg["adm_in_channels"])
    return out


def schedule_of(predictor: Any) -> tuple[Schedule, str]:
    """(training schedule, prediction type) from Forge's k-diffusion predictor.

    Forge builds it from the diffusers scheduler (`k_prediction_from_diffusers_scheduler`): a
    "linear" LDM schedule, i.e. diffusers' scaled_linear; we read beta_start/beta_end back from
    `alphas_cumprod` and check the rebuilt schedule matches.
    """
    prediction = getattr(predictor, "prediction_type", EPSILON)
    if prediction not in (EPSILON, V_PREDICTION):
        raise UnsupportedModelError(
            f"The loaded model predicts '{prediction}', which LoRA Trainer cannot train; "
            "load an epsilon or v-prediction SD1/SD2/SDXL model.")
    ac = predictor.alphas_cumprod.detach().to("cpu", torch.float64)
    with torch.inference_mode(False):
        ac = ac.clone()
    betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    n = int(ac.numel())
    start, end = float(betas[0]), float(betas[-1])
    for known_start, known_end in ((0.00085, 0.012), (0.0001, 0.02)):  # SD, and DDPM's defaults
        if abs(start - known_start) < 1e-3 * known_start and abs(end - known_end) < 1e-3 * known_end:
            start, end = known_start, known_end
    schedule = Schedule(num_train_timesteps=n, beta_start=start, beta_end=end, beta_schedule="scaled_linear")
    rebuilt = torch.cumprod(1.0 - torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2, 0)
    if not torch.allclose(rebuilt, ac, rtol=1e-3, atol=1e-6):
        log.warning("Forge's noise schedule is not scaled_linear(%s, %s); training with that approximation.",
                    start, end)
    return schedule, prediction


# ---------------------------------------------------------------- assembly
def _meta(factory):
    with torch.device("meta"):
        return factory()


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor, *, parameter: bool) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    if parameter:
        setattr(parent, leaf, torch.nn.Parameter(value, requires_grad=False))
    else:
        parent._buffers[leaf] = value


def fit_shape(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A view of `tensor` in `shape` when only size-1 dims differ (LDM 1x1 conv vs Linear)."""
    if tensor.shape == shape:
        return tensor
    if tensor.numel() == shape.numel() and [d for d in tensor.shape if d != 1] == [d for d in shape if d != 1]:
        return tensor.view(shape)
    raise ValueError(f"shape {tuple(tensor.shape)} does not fit {tuple(shape)}")


def _place(value: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """Move to the training device; half weights on the CPU become fp32 copies.

    Forge keeps CLIP in fp16 even on the CPU and casts per layer (its own operations); CPU
    kernels for training need fp32, and Forge's tensor stays as it is either way.
    """
    if device is not None and value.device != device:
        value = value.to(device)
    if value.device.type == "cpu" and value.is_floating_point() and value.dtype != torch.float32:
        value = value.float()
    return value


def _widen_per_layer(src: torch.Tensor, device: torch.device | None) -> bool:
    """A half-precision weight that stays on the CPU: read in place, widened per product."""
    on_cpu = src.device.type == "cpu" and (device is None or device.type == "cpu")
    return on_cpu and src.dtype in (torch.float16, torch.bfloat16)


def assign_aliases(skeleton: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, what: str,
                   device: torch.device | None = None) -> torch.nn.Module:
    """Fill a meta-device skeleton with aliases of `tensors` (names in the skeleton's own layout).

    Every parameter must be given with a fitting shape. A Linear whose weight is half precision on
    the CPU becomes a QuantLinear over Forge's tensor (fp32 compute, widened one layer at a time);
    other tensors on another device than `device`, or half precision on the CPU, are copied (the copy
    is ours, Forge's tensor stays as it was).
    """
    params = dict(skeleton.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UnsupportedModelError(
            f"The loaded model's {what} lacks {len(missing)} weights LoRA Trainer expects (e.g. {missing[0]}); "
            "train from the checkpoint file instead.")

    def aliased(name: str, shape: torch.Size) -> torch.Tensor:
        try:
            return fit_shape(alias(tensors[name]), shape)
        except ValueError as e:
            raise UnsupportedModelError(
                f"The loaded model's {what} weight {name} has an unexpected shape ({e}); "
                "train from the checkpoint file instead.") from None

    for name, module in list(skeleton.named_modules()):
        if type(module) is nn.Linear and _widen_per_layer(tensors[f"{name}.weight"], device):
            weight = quant.PlainWeight(aliased(f"{name}.weight", module.weight.shape))
            bias = None if module.bias is None else _place(aliased(f"{name}.bias", module.bias.shape), device)
            quant.replace_linear(skeleton, name, weight, bias, dtype=torch.float32, device=weight.device,
                                 movable=False)
    for name, target in list(skeleton.named_parameters()):
        if target.is_meta:  # not set above (QuantLinear biases are)
            _set_tensor(skeleton, name, _place(aliased(name, target.shape), device), parameter=True)
    return skeleton


def widen_half_linears(bundle: ModelBundle) -> ModelBundle:
    """A model loaded as stored (`load_model(dtype=None)`: the file's tensors, memory-mapped) made
    trainable on the CPU: half-precision Linears become QuantLinears over the file's tensors, widened
    to fp32 one layer at a time; the rest (convolutions, norms, embeddings) becomes fp32 copies."""
    def plain(_name: str, layer: nn.Linear) -> quant.FrozenWeight | None:
        return quant.PlainWeight(layer.weight.detach()) if layer.weight.dtype in (torch.float16, torch.bfloat16) else None

    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        module.requires_grad_(False)
        quant.quantize_linears(module, plain, dtype=torch.float32, movable=False)
        module.float()  # QuantLinear keeps its stored weight as it is
    return bundle


def _fill_buffers(skeleton: torch.nn.Module, source: torch.nn.Module, device: torch.device | None) -> None:
    """Buffers left on meta (CLIP's position_ids): take Forge's, or rebuild the ones we know."""
    theirs = dict(source.named_buffers())
    for name, buf in list(skeleton.named_buffers()):
        if buf.device.type != "meta":
            continue
        if name.endswith("position_ids"):
            value = torch.arange(buf.shape[-1], dtype=torch.long).expand(buf.shape).clone()
        elif name in theirs:
            value = alias(theirs[name])
        else:
            raise UnsupportedModelError(
                f"The loaded model has no value for {name}; train from the checkpoint file instead.")
        _set_tensor(skeleton, name, _place(value, device) if value.is_floating_point() else
                    value.to(device) if device is not None else value, parameter=False)


def _unet(forge_unet: torch.nn.Module, family: Family, device: torch.device | None,
          text_embed_dim: int | None = None) -> Any:
    from diffusers import UNet2DConditionModel

    from ..models.unet_keys import unet_state_dict_to_diffusers

    config = diffusers_unet_config(dict(forge_unet.config), family, text_embed_dim)
    ldm = dict(forge_unet.named_parameters())
    try:
        tensors = unet_state_dict_to_diffusers(ldm, config)
    except KeyError as e:
        raise UnsupportedModelError(
            f"The loaded UNet has a weight LoRA Trainer does not know ({e}); train from the checkpoint file "
            "instead.") from None
    unet = _meta(lambda: UNet2DConditionModel(**config))
    return assign_aliases(unet, tensors, what="UNet", device=device).eval().requires_grad_(False)


def _vae(forge_vae: torch.nn.Module, device: torch.device | None) -> Any:
    from diffusers import AutoencoderKL

    from ..models.ldm_convert import vae_to_diffusers

    config = {k: v for k, v in dict(forge_vae.config).items() if not k.startswith("_")}
    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters)  # older diffusers lack some keys
    config = {k: v for k, v in config.items() if k in allowed}
    tensors = vae_to_diffusers(dict(forge_vae.named_parameters()), len(config["block_out_channels"]),
                               int(config.get("layers_per_block", 2)), prefix="")
    vae = _meta(lambda: AutoencoderKL(**config))
    return assign_aliases(vae, tensors, what="VAE", device=device).eval().requires_grad_(False)


def _text_encoder(forge_te: torch.nn.Module, with_projection: bool, device: torch.device | None) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hf = forge_te.transformer  # transformers CLIPTextModel built with Forge's operations
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    te = _meta(lambda: cls(hf.config))
    theirs = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
              for k, v in hf.named_parameters()}  # transformers 5's CLIPTextModel has no text_model level
    if not hasattr(te, "text_model"):
        theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assign_aliases(te, theirs, what="text encoder", device=device)
    _fill_buffers(te, hf, device)
    return te.eval().requires_grad_(False)


def tokenizers_for(family: Family) -> list[Any]:
    from ..models.tokenizers import PAD_ENDOFTEXT, PAD_EXCLAMATION, clip_tokenizer

    pads = {Family.SD1: [PAD_ENDOFTEXT], Family.SD2: [PAD_EXCLAMATION],
            Family.SDXL: [PAD_ENDOFTEXT, PAD_EXCLAMATION]}[family]
    return [clip_tokenizer(p) for p in pads]


def bundle_from_forge(sd_model: Any, *, device: torch.device | None = None, name: str | None = None,
                      model_hash: str | None = None) -> ModelBundle:
    """A ModelBundle whose weights alias Forge's (call restore_clean_weights() first)."""
    family = family_of(sd_model)
    check_storage(sd_model)
    fo = sd_model.forge_objects_original
    schedule, prediction = schedule_of(fo.unet.model.predictor)
    joint = dict(fo.clip.cond_stage_model.named_children())  # Forge's JointTextEncoder: a plain Module
    keys = _TEXT_KEYS[family]
    missing = [k for k in keys if k not in joint]
    if missing:
        raise UnsupportedModelError(
            f"The loaded {family.label} model has no '{missing[0]}' text encoder; train from the checkpoint file "
            "instead.")
    vae_module = fo.vae.first_stage_model
    pooled = joint[keys[-1]].transformer.config.projection_dim if family is Family.SDXL else None
    info = getattr(sd_model, "sd_checkpoint_info", None)
    filename = getattr(sd_model, "filename", None) or getattr(info, "filename", "")
    return ModelBundle(
        family=family,
        prediction_type=prediction,
        unet=_unet(fo.unet.model.diffusion_model, family, device, pooled),
        vae=_vae(vae_module, device),
        text_encoders=[_text_encoder(joint[k], with_projection=(family is Family.SDXL and k == "clip_g"),
                                     device=device) for k in keys],
        tokenizers=tokenizers_for(family),
        schedule=schedule,
        scaling_factor=float(getattr(vae_module, "scaling_factor", 0.18215)),
        name=name or (getattr(info, "model_name", None) or "forge-model"),
        source=f"forge:{filename}" if filename else "forge",
        model_hash=model_hash,
    )
