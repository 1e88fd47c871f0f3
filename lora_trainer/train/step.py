"""One optimizer step, apart from the loop that repeats it: the batch drawn from the caches (every random
draw of the step made there, so the loss is a pure function of the batch: CUDA graphs replay it, see
accel/), the family's loss on it, gradient accumulation over micro-batches.

`StepMixin` holds `_Run`'s step methods (they use the run's config, dataset, models, position and the
text-cache settings of `caching.py`); the loop in `engine.py` calls `_step` once per optimizer step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from typing import Any

import torch

from ..errors import TrainingError
from ..models.bundle import ModelBundle
from . import noise as noise_math
from .cache import CachedLatent
from .captions import process_caption
from .family import StepInputs, TrainFamily, stack_conditioning


@dataclasses.dataclass
class StepContext:
    """What every step of a run shares: the model, where and in which dtype it runs, the objective, the
    cached latents."""

    bundle: ModelBundle
    device: torch.device
    dtype: torch.dtype  # autocast dtype (fp32 = none)
    objective: Any  # the family's Objective for this run
    latents: list[CachedLatent]
    family: TrainFamily

    @property
    def unet_dtype(self) -> torch.dtype:
        return next(self.bundle.unet.parameters()).dtype


class StepMixin:
    """`_Run`'s optimizer step (see the module's docstring)."""

    @staticmethod
    def _autocast(device: torch.device, dtype: torch.dtype):
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _step(self, ctx: StepContext, chunk: list[list[int]], runner) -> float:
        """One optimizer step over `chunk` (gradient accumulation); returns the mean loss."""
        total = 0.0
        for i, batch in enumerate(chunk):
            inputs = self.dist.take(self._make_batch(ctx, batch))  # several GPUs: this rank's slice
            self.models.before_step()
            inputs["scale"] = torch.full((), 1.0 / len(chunk), device=ctx.device)
            with self.dist.no_sync(accumulating=i < len(chunk) - 1):
                loss = float(runner.step(inputs, apply=i == len(chunk) - 1))
            if not math.isfinite(loss):
                raise TrainingError(
                    f"The loss became {'NaN' if math.isnan(loss) else 'infinite'} at step {self.pos.step + 1}; "
                    "lower the learning rate or use bf16/fp32 (the last good save is kept).")
            total += loss
        return total

    def _make_batch(self, ctx: StepContext, batch: list[int]) -> dict[str, torch.Tensor]:
        """Everything random or data-dependent for one batch, drawn here (before the step) so the
        loss is a pure function of these tensors (CUDA graphs replay it; see accel/)."""
        config, items = self.config, self.dataset.items
        flips = [config.flip_aug and random.random() < 0.5 for _ in batch]
        latents = torch.stack([
            ctx.latents[k].flipped if flip and ctx.latents[k].flipped is not None else ctx.latents[k].latent
            for k, flip in zip(batch, flips)]).to(ctx.device)
        out: dict[str, torch.Tensor] = {"latents": latents}
        if self.text_cache is not None:
            out.update(stack_conditioning([self.text_cache[k] for k in batch], ctx.device))
        if self.step_keys:
            captions = [process_caption(items[k].caption, shuffle=config.shuffle_caption,
                                        keep_tokens=config.keep_tokens,
                                        caption_dropout_rate=config.caption_dropout_rate,
                                        tag_dropout_rate=config.caption_tag_dropout_rate) for k in batch]
            tokens = ctx.family.tokenize(ctx.bundle, captions, **self._tokenize_keys)
            out.update({k: v.to(ctx.device) for k, v in tokens.items()})
        drawn = ctx.objective.draw(latents)  # noise, timesteps/sigmas: the step's random draws
        objective_weights = drawn.pop("weights", None)
        out.update(drawn)
        weights = torch.tensor([config.prior_loss_weight if items[k].is_reg else 1.0 for k in batch],
                               device=ctx.device)
        if objective_weights is not None:
            weights = weights * objective_weights
        out["weights"] = weights
        extras = ctx.family.batch_extras(ctx.bundle, [items[k] for k in batch], flips)
        out.update({k: v.to(ctx.device) for k, v in extras.items()})
        return out

    def _loss(self, ctx: StepContext, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on one prepared batch (no host syncs, no random draws)."""
        config, family = self.config, ctx.family
        with self._autocast(ctx.device, ctx.dtype):
            cond = {k: b[k] for k in family.cond_keys if k in b} if self.text_cache is not None else {}
            if self.step_keys:
                with torch.enable_grad() if config.train_text_encoder or config.train_t5 else torch.no_grad():
                    cond.update(family.encode_tokens(ctx.bundle, b, clip_skip=config.clip_skip))
            pred, target = family.prediction_and_target(StepInputs(ctx.bundle, b, cond, ctx.objective,
                                                                   ctx.unet_dtype))
            loss = noise_math.per_sample_loss(pred, target, config.loss_type, config.huber_c)
            return (loss * b["weights"]).mean() * b["scale"]

