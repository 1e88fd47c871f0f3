"""The model-family interface: what the training engine asks of a family, and nothing more.

The engine loop, caching, saving, stop/resume, progress and jobs are shared by every family; what
differs between SD1/SD2/SDXL and Flux lives behind `TrainFamily`:

- text: how captions become conditioning tensors (`encode_text`, batched, cacheable per caption),
  or token tensors drawn per step when captions change or a text encoder trains (`tokenize`, then
  `encode_tokens` inside the loss);
- per-batch extras that come from the data, not the random stream (SDXL's size/crop `time_ids`);
- the objective (`make_objective`): random draws of a step (`draw`) and the loss terms
  (`prediction_and_target`), e.g. DDPM epsilon/v or rectified flow;
- sampling during training (`generate`), latent encoding (`latent_shift`, `vae_dtype`), extra
  `ss_*` metadata, and the memory plan (`swappable_blocks`).

`family_for(bundle)` finds a bundle's family in a registry (no `if family == ...` in the engine).
A family module registers itself with `register(key, factory)`; `train/family_sd.py` holds
SD1/SD2/SDXL, `train/family_flux.py` Flux.1, `train/family_chroma.py` Chroma.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    """One family's training objective, set up for a run (schedules on the device, settings read).

    `draw` makes every random draw of a step (noise, timesteps/sigmas) before the step, so the loss is
    a pure function of the batch (CUDA graphs replay it); it may add a per-sample `weights` tensor
    (e.g. min-SNR), which the engine multiplies with the prior-loss weights.
    """

    def draw(self, latents: torch.Tensor) -> Batch: ...


@dataclass
class StepInputs:
    """What a family's model call gets inside the loss (all on the training device)."""

    bundle: Any
    batch: Batch  # the prepared batch: latents, noise, timesteps, conditioning, extras
    cond: Batch  # text conditioning (from the cache or encoded this step)
    objective: Any
    model_dtype: torch.dtype  # the dtype of the denoiser's weights


class ModelPlacement:
    """Where a family's parts go for training, through the engine's `train.placement.Placement`.

    The default moves whole modules (SD): the UNet may upload during latent caching (`start_early`),
    the text encoders go to the device for caching (`text_encoders`), the denoiser before LoRA injection
    (`denoiser`). A family with a memory plan (fp8 base weights, block swap) overrides these;
    `ready()` runs once adapters, checkpointing and accel are in place; `before_step()` runs before every optimizer step (e.g. restore swap slots after sampling) and
    `close()` at the end of the run. `quantizes_base`: the plan already stored frozen weights in fp8.
    """

    quantizes_base = False

    def __init__(self, bundle: Any, placement: Any, device: torch.device, config: Any, own: bool):
        self.bundle, self.placement, self.device, self.config, self.own = bundle, placement, device, config, own

    def start_early(self, then: Callable[[], Any] | None = None) -> bool:
        """Start the denoiser's upload beside latent caching where the GPU has room; `then` runs after it in the
        upload's thread (`Placement.upload_in_background`). False: nothing started (`then` did not run)."""
        return self.placement.upload_in_background(self.bundle.unet, then)

    def text_encoders(self, only: Sequence[torch.nn.Module] | None = None) -> None:
        """Put the text encoders (or `only` these) on the device."""
        for te in self.bundle.text_encoders if only is None else only:
            self.placement.to(te, self.device)

    def denoiser(self) -> None:
        self.placement.to(self.bundle.unet, self.device)

    def ready(self) -> None:
        """Adapters injected, checkpointing and accel applied; the optimizer comes next."""

    def before_step(self) -> None:
        pass

    def close(self) -> None:
        pass


class TrainFamily:
    """Base class: defaults shared by families; subclasses override what differs. One instance per run
    (`family_for(bundle, config)`), so it may keep the run's settings in `self.config`."""

    key: str = ""
    # conditioning tensors `encode_text` returns (cached per caption; batched by the engine)
    cond_keys: tuple[str, ...] = ("hidden",)

    def __init__(self, config: Any = None):
        self.config = config

    # ---------------------------------------------------------------- text
    def encode_text(self, bundle: Any, captions: list[str], *, clip_skip: int = 1) -> Batch:
        """Conditioning for a batch of captions, on the text encoders' device (caller: no_grad/autocast)."""
        raise NotImplementedError

    def tokenize(self, bundle: Any, captions: list[str]) -> Batch:
        """Token tensors (CPU) for captions encoded inside the step; keys must not clash with others."""
        raise NotImplementedError

    def encode_tokens(self, bundle: Any, tokens: Batch, *, clip_skip: int = 1) -> Batch:
        """As `encode_text`, from `tokenize`'s tensors already on the device (inside the loss)."""
        raise NotImplementedError

    def cacheable_cond_keys(self, config: Any) -> tuple[str, ...]:
        """The conditioning keys whose encoders stay frozen in this run: cached once per caption (when captions
        never change); the others are encoded every step. A family whose keys come from separate encoders
        (Flux: CLIP-L `pooled`, T5 `t5`) may cache part of them; it then takes `keys=` in `encode_text`,
        `tokenize` and `text_identity`, and names their encoders in `encoders_for`."""
        return () if config.train_text_encoder else self.cond_keys

    def encoders_for(self, bundle: Any, keys: Sequence[str]) -> list[torch.nn.Module]:
        """The text encoders that produce `keys`."""
        return list(bundle.text_encoders)

    def text_identity(self, bundle: Any, clip_skip: int = 1) -> str | None:
        """A short fingerprint of everything that decides `encode_text`'s output besides the caption
        (encoders, tokenizer lengths, settings), for the on-disk text cache; None: do not cache on disk."""
        return None

    # ---------------------------------------------------------------- data
    def batch_extras(self, bundle: Any, items: Sequence[Any], flips: Sequence[bool]) -> Batch:
        """Tensors a batch needs besides latents and text, from the data (no random draws)."""
        return {}

    def latent_shift(self, bundle: Any) -> float:
        """Subtracted from VAE samples before the scaling factor (Flux's AE: 0.1159)."""
        return float(getattr(bundle, "shift_factor", 0.0) or 0.0)

    def vae_dtype(self, bundle: Any, dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE encodes in, given the training dtype."""
        return dtype

    has_t5 = False  # a T5 text encoder that `train_t5` puts a LoRA on

    def check_config(self, config: Any) -> None:
        """Refuse settings this family cannot train with (ConfigError), before any heavy work."""
        if getattr(config, "train_t5", False) and not self.has_t5:
            from ..errors import ConfigError

            raise ConfigError("train_t5 trains Flux.1's or Chroma's T5-XXL text encoder, which this model does not "
                              "have; turn it off (train_text_encoder trains its CLIP text encoder).")

    # ---------------------------------------------------------------- objective
    def make_objective(self, bundle: Any, config: Any, device: torch.device) -> Objective:
        raise NotImplementedError

    def prediction_and_target(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's prediction and the regression target for one batch (inside autocast)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- samples, metadata, memory
    def generate(self, bundle: Any, prompts: list[str], *, seed: int, steps: int, cfg_scale: float,
                 width: int, height: int, negative_prompt: str = "", clip_skip: int = 1,
                 on_step: Callable[[int, int], None] | None = None) -> list:
        """One PIL image per prompt from the modules being trained."""
        raise NotImplementedError

    def metadata_extras(self, config: Any) -> dict[str, str]:
        """Family-specific `ss_*` keys added to the LoRA's metadata (kohya's `update_metadata`)."""
        return {}

    def swappable_blocks(self, model: torch.nn.Module) -> list[torch.nn.ModuleList]:
        """The denoiser's block lists a block swapper may stream from host memory, in execution order."""
        return []

    def placement(self, bundle: Any, placement: Any, device: torch.device, config: Any, own: bool) -> ModelPlacement:
        """The memory plan for this run (`own`: the engine may replace/cast the bundle's modules)."""
        return ModelPlacement(bundle, placement, device, config, own)


_REGISTRY: dict[str, Callable[..., TrainFamily]] = {}


def register(key: str, factory: Callable[..., TrainFamily]) -> None:
    _REGISTRY[key] = factory


def _load_builtin() -> None:
    from . import family_sd  # noqa: F401 - registers sd1, sd2, sdxl

    with contextlib.suppress(ImportError):  # Flux needs models.flux
        from . import family_chroma, family_flux  # noqa: F401


def family_for(bundle: Any, config: Any = None) -> TrainFamily:
    """A TrainFamily for a ModelBundle (by `bundle.family`'s value), set up with the run's `config`."""
    key = getattr(bundle.family, "value", bundle.family)
    if key not in _REGISTRY:
        _load_builtin()
    if key not in _REGISTRY:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"Training is not available for {key} models yet; pick an SD1.x, SD2.x, "
                                    "SDXL, Flux.1 or Chroma model.")
    return _REGISTRY[key](config)


def stack_conditioning(entries: Sequence[Batch], device: torch.device) -> Batch:
    """Per-caption cached conditioning (CPU) -> one batch on the device, key by key."""
    return {k: to_device(torch.stack([e[k] for e in entries]), device) for k in entries[0]}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on `device`; from the CPU to CUDA without waiting for the work queued there (a plain copy waits for
    the stream): through pinned memory, whose block torch's host allocator keeps until the copy has run."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
