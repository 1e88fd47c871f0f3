"""Flux.1 (dev, schnell) as a training family: kohya's `flux_train_network.py` math on our BFL-layout
transformer (`models.flux.FluxTransformer`).

- Conditioning: CLIP-L's pooled output (`pooled`, 77 tokens) and T5-XXL's last hidden state (`t5`,
  512 tokens for dev, 256 for schnell, or `t5_max_token_length`), as kohya's FluxTextEncodingStrategy
  (no T5 attention mask, kohya's default).
- Objective: rectified flow (`train/flow.py`): σ from `timestep_sampling`, x_σ = (1 - σ)x₀ + σε, target
  ε - x₀, prediction read per `model_prediction_type`; latents packed into 2x2 patches; the model gets σ
  as its timestep (kohya's `timesteps / 1000`, rounded through the training dtype as kohya's are) and,
  for dev, the distilled guidance `guidance_scale` (1.0 = off while training).
- Memory plan (`FluxPlacement`): fp8 base weights and block swap are applied block by block while the
  transformer goes to the GPU, so neither the bf16 model nor the whole fp8 model need fit there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import ConfigError
from . import flow
from .family import Batch, ModelPlacement, StepInputs, TrainFamily, register


def kohya_swap_split(blocks_to_swap: int, n_double: int = 19, n_single: int = 38) -> tuple[int, int]:
    """kohya's `--blocks_to_swap N` as (double, single) blocks: N // 2 double and 2 * (N - N // 2) single
    (a single block is about half a double one)."""
    double = min(n_double, blocks_to_swap // 2)
    single = min(n_single, 2 * (blocks_to_swap - blocks_to_swap // 2))
    return double, single


class FlowObjective:
    """Rectified-flow draws for one run (kohya's `get_noisy_model_input_and_timesteps`)."""

    def __init__(self, config: Any, device: torch.device):
        self.config = config
        self.device = device

    def draw(self, latents: torch.Tensor) -> Batch:
        c = self.config
        noise = torch.randn_like(latents)  # kohya: noise first, then σ
        sigmas = flow.sample_sigmas(latents.shape[0], tuple(latents.shape[-2:]), latents.device,
                                    method=c.timestep_sampling, sigmoid_scale=c.sigmoid_scale,
                                    shift=c.discrete_flow_shift, weighting_scheme=c.weighting_scheme,
                                    logit_mean=c.logit_mean, logit_std=c.logit_std, mode_scale=c.mode_scale)
        out = {"noise": noise, "sigmas": sigmas.float()}
        if c.model_prediction_type == "sigma_scaled":
            out["weights"] = flow.loss_weighting(c.weighting_scheme, sigmas.float())
        return out


def _fingerprint(module: torch.nn.Module, h: Any) -> None:
    config = getattr(module, "config", None)
    h.update(json.dumps(config.to_dict() if hasattr(config, "to_dict") else str(config), sort_keys=True,
                        default=str).encode())
    for name, p in list(module.named_parameters())[-2:]:  # small tensors read from the file, not the whole model
        if p.device.type != "meta":
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes()[:1 << 16])


class FluxFamily(TrainFamily):
    key = "flux1"
    cond_keys = ("pooled", "t5")

    # ---------------------------------------------------------------- text
    def _t5_length(self, bundle: Any, config: Any | None = None) -> int:
        n = int(getattr(config, "t5_max_token_length", 0) or 0) if config is not None else 0
        return n or int(bundle.tokenizers[-1].model_max_length)

    def tokenize(self, bundle: Any, captions: list[str], keys: Sequence[str] | None = None) -> Batch:
        keys = self.cond_keys if keys is None else keys
        clip_tok, t5_tok = bundle.tokenizers
        out = {}
        if "pooled" in keys:
            out["clip_ids"] = clip_tok(captions, max_length=77, padding="max_length", truncation=True,
                                       return_tensors="pt").input_ids
        if "t5" in keys:
            out["t5_ids"] = t5_tok(captions, max_length=self._t5_length(bundle, self.config), padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids
        return out

    def encode_tokens(self, bundle: Any, tokens: Batch, *, clip_skip: int = 1) -> Batch:
        """What `tokens` hold ids for: `pooled` from `clip_ids`, `t5` from `t5_ids`."""
        clip, t5 = bundle.text_encoders
        out = {}
        if "clip_ids" in tokens:
            out["pooled"] = clip(tokens["clip_ids"].to(_device(clip)), output_hidden_states=False).pooler_output
        if "t5_ids" in tokens:
            trains_t5 = any(p.requires_grad for p in t5.parameters())
            with torch.enable_grad() if trains_t5 and torch.is_grad_enabled() else torch.no_grad():
                out["t5"] = t5(tokens["t5_ids"].to(_device(t5))).last_hidden_state
        return out

    def encode_text(self, bundle: Any, captions: list[str], *, clip_skip: int = 1,
                    keys: Sequence[str] | None = None) -> Batch:
        return self.encode_tokens(bundle, self.tokenize(bundle, captions, keys))

    def cacheable_cond_keys(self, config: Any) -> tuple[str, ...]:
        # kohya: T5 outputs are cached while only CLIP-L trains; nothing is cached while T5 trains
        if getattr(config, "train_t5", False):
            return ()
        return ("t5",) if config.train_text_encoder else self.cond_keys

    def encoders_for(self, bundle: Any, keys: Sequence[str]) -> list[torch.nn.Module]:
        return ([bundle.text_encoders[0]] if "pooled" in keys else []) + (
            [bundle.text_encoders[-1]] if "t5" in keys else [])

    def text_identity(self, bundle: Any, clip_skip: int = 1, keys: Sequence[str] | None = None) -> str | None:
        h = hashlib.sha256(b"flux1-text-v1")
        h.update(str(self._t5_length(bundle, self.config)).encode())
        if keys is not None and tuple(keys) != self.cond_keys:  # a partial entry (T5 only) is another entry
            h.update(",".join(keys).encode())
        for te in self.encoders_for(bundle, self.cond_keys if keys is None else keys):
            _fingerprint(te, h)
        return h.hexdigest()[:24]

    # ---------------------------------------------------------------- data, config
    has_t5 = True

    def check_config(self, config: Any) -> None:
        for key, what in (("min_snr_gamma", "min-SNR weighting"), ("noise_offset", "noise offset"),
                          ("multires_noise_iterations", "multires noise"), ("min_timestep", "min_timestep"),
                          ("max_timestep", "max_timestep")):
            if getattr(config, key):
                raise ConfigError(f"{key} ({what}) applies to SD models, not to Flux's rectified flow; set it to 0 "
                                  "and use timestep_sampling / discrete_flow_shift instead.")
        if config.clip_skip > 1:
            raise ConfigError("clip_skip does not apply to Flux (it uses CLIP-L's pooled output); set it to 1.")
        if config.resolution % 16:
            raise ConfigError(f"Flux needs a resolution divisible by 16 (got {config.resolution}); use e.g. 512, "
                              "768 or 1024.")
        if config.enable_bucket and config.bucket_reso_steps % 16:
            raise ConfigError(f"Flux needs bucket_reso_steps divisible by 16 (got {config.bucket_reso_steps}); "
                              "use 64.")

    def make_objective(self, bundle: Any, config: Any, device: torch.device) -> FlowObjective:
        return FlowObjective(config, device)

    # ---------------------------------------------------------------- the model call
    def text_inputs(self, cond: Batch, bsz: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The transformer's text arguments from one batch of conditioning (`encode_text`'s keys)."""
        from ..models.flux.model import text_ids

        t5 = cond["t5"].to(device, dtype)
        return {"txt": t5, "txt_ids": text_ids(bsz, t5.shape[1], device=device), "y": cond["pooled"].to(device, dtype)}

    def train_guidance(self, config: Any) -> float:
        """The guidance input while training (Flux.1 dev's distilled guidance; schnell ignores it)."""
        return float(config.guidance_scale)

    def prediction_and_target(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        from ..models.flux.model import image_ids, pack_latents, unpack_latents

        b, c, dtype = inputs.batch, inputs.objective.config, inputs.model_dtype
        x0, noise, sigmas = b["latents"], b["noise"], b["sigmas"]
        bsz, _, h, w = x0.shape
        noisy = flow.noisy_input(x0, noise, sigmas)
        # kohya hands the model `timesteps / 1000` with timesteps = σ·1000 in the training dtype
        timesteps = (sigmas * 1000).to(dtype) / 1000
        guidance = torch.full((bsz,), self.train_guidance(c), device=x0.device, dtype=dtype)
        pred = inputs.bundle.unet(img=pack_latents(noisy.to(dtype)), img_ids=image_ids(bsz, h, w, device=x0.device),
                                  timesteps=timesteps, guidance=guidance,
                                  **self.text_inputs(inputs.cond, bsz, x0.device, dtype))
        pred = unpack_latents(pred, h, w)
        pred, _ = flow.apply_prediction_type(c.model_prediction_type, pred, noisy, sigmas)
        return pred, flow.flow_target(x0, noise)

    # ---------------------------------------------------------------- samples, metadata, memory
    def generate(self, bundle: Any, prompts: list[str], *, seed: int = 1234, steps: int = 20,
                 cfg_scale: float = 3.5, width: int = 1024, height: int = 1024, negative_prompt: str = "",
                 clip_skip: int = 1, on_step: Callable[[int, int], None] | None = None) -> list:
        from .flux_sampling import generate

        return generate(bundle, self, prompts, seed=seed, steps=steps, guidance=cfg_scale, width=width,
                        height=height, on_step=on_step)

    model_type = "flux"  # kohya's --model_type
    t5_attention_mask = False  # kohya's --apply_t5_attn_mask

    def metadata_extras(self, config: Any) -> dict[str, str]:
        # kohya's FluxNetworkTrainer.update_metadata (str() of each value, as all ss_* keys)
        values = {"ss_model_type": self.model_type, "ss_apply_t5_attn_mask": self.t5_attention_mask,
                  "ss_weighting_scheme": config.weighting_scheme, "ss_logit_mean": config.logit_mean,
                  "ss_logit_std": config.logit_std, "ss_mode_scale": config.mode_scale,
                  "ss_guidance_scale": self.train_guidance(config), "ss_timestep_sampling": config.timestep_sampling,
                  "ss_sigmoid_scale": config.sigmoid_scale, "ss_model_prediction_type": config.model_prediction_type,
                  "ss_discrete_flow_shift": config.discrete_flow_shift}
        return {k: str(v) for k, v in values.items()}

    def swappable_blocks(self, model: torch.nn.Module) -> list[torch.nn.ModuleList]:
        return [model.double_blocks, model.single_blocks]

    def placement(self, bundle: Any, placement: Any, device: torch.device, config: Any, own: bool) -> ModelPlacement:
        return FluxPlacement(self, bundle, placement, device, config, own)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class FluxPlacement(ModelPlacement):
    """fp8 base weights and block swap for a Flux model the engine owns, applied while it is placed.

    `fp8_base`: every frozen Linear of the transformer blocks (and of T5-XXL) becomes fp8 with one scale
    per row, on the device, layer by layer (files already in fp8 stay as stored). `blocks_to_swap`:
    kohya's count of blocks kept in CPU memory and streamed in (accel/swap.py), spread through the
    double and single blocks. Without either (or for a host's model) the parts move whole, as for SD."""

    def __init__(self, family: FluxFamily, bundle: Any, placement: Any, device: torch.device, config: Any,
                 own: bool):
        super().__init__(bundle, placement, device, config, own)
        self.family = family
        # Also on the CPU when asked (no speed or memory gain there, but the same arithmetic: tests)
        self.fp8 = bool(config.fp8_base and own)
        self.swap = int(config.blocks_to_swap) if own else 0
        formats = getattr(bundle, "weight_formats", {}) or {}
        self.stored_fp8 = {k for k, v in formats.items() if str(v).startswith("fp8")}
        self.blockwise = own and (self.fp8 or self.swap > 0 or "unet" in self.stored_fp8)
        self.quantizes_base = self.fp8
        self.swappers: list[Any] = []
        self._dtype = getattr(placement, "_dtypes", {}).get(id(bundle.unet)) or torch.float32

    def start_early(self, then: Callable[[], Any] | None = None) -> bool:
        return False if self.blockwise else super().start_early(then)

    def text_encoders(self, only: Sequence[torch.nn.Module] | None = None) -> None:
        from .lowmem import has_fp8_weights, place_module

        for te in self.bundle.text_encoders if only is None else only:
            if self.own and (self.fp8 or has_fp8_weights(te)):  # idempotent: fp8 layers are kept
                # T5-XXL is 9.5 GB in bf16: fp8 with fp8_base (kohya's advice for small cards), fp8 files as stored
                place_module(te, self.device, self._te_dtype(te), fp8=self.fp8)
            else:
                self.placement.to(te, self.device)

    def _te_dtype(self, te: torch.nn.Module) -> torch.dtype:
        return getattr(self.placement, "_dtypes", {}).get(id(te)) or self._dtype

    def denoiser(self) -> None:
        if not self.blockwise:
            return super().denoiser()
        from ..accel.swap import BlockSwapper, spread
        from .lowmem import place_module

        model, device, dtype = self.bundle.unet, self.device, self._dtype
        lists = self.family.swappable_blocks(model)
        for child in model.children():  # embedders, final layer: small, always resident
            if all(child is not blocks for blocks in lists):
                place_module(child, device, dtype, fp8=False)
        counts = kohya_swap_split(self.swap, len(lists[0]), len(lists[1]))
        for blocks, n, name in zip(lists, counts, ("double blocks", "single blocks")):
            swapped = set(spread(len(blocks), n))
            for i, block in enumerate(blocks):
                if i not in swapped:
                    place_module(block, device, dtype, fp8=self.fp8)
            if swapped:
                self.swappers.append(BlockSwapper(
                    blocks, sorted(swapped), device, name=name,
                    prepare=lambda i, block: place_module(block, device, dtype, fp8=self.fp8)))
        return None

    def ready(self) -> None:
        model = self.bundle.unet
        if self.config.cpu_offload_checkpointing and getattr(model, "gradient_checkpointing", False):
            from ..accel.offload import OffloadedCheckpoint

            model._gradient_checkpointing_func = OffloadedCheckpoint()

    def before_step(self) -> None:
        for s in self.swappers:
            s.prepare()

    def close(self) -> None:
        for s in self.swappers:
            s.remove(to="cpu")
        self.swappers = []



register("flux1", FluxFamily)
