"""One optimizer step, apart from the loop that repeats it: the batch drawn from the caches (every random
draw of the step made there, so the loss is a pure function of the batch: CUDA graphs replay it, see
accel/), the family's loss on it, gradient accumulation over micro-batches.

`StepMixin` holds `_Run`'s step methods (they use the run's config, dataset, models, position and the
text-cache settings of `caching.py`); the loop in `engine.py` calls `_step` once per optimizer step.

Where `AHEAD_DEVICES` holds the device type, the next step's batch is made while the device runs this one (`_step`'s
`next_chunk`): its copies to the device do not wait for the queued step (pinned memory, `to_device`), and the step's
loss is read (which waits for the device) only after it, so the device does not idle between steps for the host's
batch work. The random draws happen in the same order as one step at a time; where the next step is not taken next
(a stop, a save, an error) `drop_ahead()` puts the random streams back as they were before its draws, so saves and
resumes are unchanged (bit for bit on the CPU: tests/test_train_engine.py). Measured on an H100
(bench/results/e2e_vs_kohya_h100_ahead.md): SD1.5 batch 8 128 vs 99 img/s between the epochs' scorings, batch 1
39.6 vs 36.7 it/s over the loop. On a GPU each step gets the very batch of one step at a time, straight and
stopped/resumed (bench/results/ahead_check_h100.json), and tests/test_train_cuda.py's stop/resume runs both ways.
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
from .family import StepInputs, TrainFamily, stack_conditioning, to_device
from .state import rng_state, set_rng_state

# device types where the next step's batch is made while the device runs the step (module docstring); not the CPU:
# it runs each operation as it is called, so there is nothing to overlap
AHEAD_DEVICES: tuple[str, ...] = ("cuda",)


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


@dataclasses.dataclass
class _Ahead:
    """The next step's micro-batches, made while the device ran the step before, and the random streams' state
    before their draws."""

    chunk: list[list[int]]
    inputs: list[dict[str, torch.Tensor]]
    rng: dict[str, Any]


class StepMixin:
    """`_Run`'s optimizer step (see the module's docstring)."""

    _ahead: _Ahead | None = None

    @staticmethod
    def _autocast(device: torch.device, dtype: torch.dtype):
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _step(self, ctx: StepContext, chunk: list[list[int]], runner,
              next_chunk: list[list[int]] | None = None) -> float:
        """One optimizer step over `chunk` (gradient accumulation); returns the loss (the sum of the micro-batches'
        scaled losses). `next_chunk`: the next step's micro-batches, made while the device runs this step (on CUDA;
        module docstring)."""
        if self._ahead is not None and self._ahead.chunk is not chunk:
            self.drop_ahead(ctx.device)  # made for another step: its draws are undone
        ahead, self._ahead = self._ahead, None
        total: torch.Tensor | None = None
        for i, batch in enumerate(chunk):
            # several GPUs: this rank's slice
            inputs = ahead.inputs[i] if ahead is not None else self.dist.take(self._make_batch(ctx, batch))
            self.models.before_step()
            inputs["scale"] = torch.full((), 1.0 / len(chunk), device=ctx.device)
            with self.dist.no_sync(accumulating=i < len(chunk) - 1):
                loss = runner.step(inputs, apply=i == len(chunk) - 1).detach()
            total = loss if total is None else total + loss
        if next_chunk is not None and ctx.device.type in AHEAD_DEVICES:
            drawn_from = rng_state(ctx.device)
            self._ahead = _Ahead(next_chunk, [self.dist.take(self._make_batch(ctx, b)) for b in next_chunk],
                                 drawn_from)
        value = float(total)  # waits for the device: the step's end
        if not math.isfinite(value):
            self.drop_ahead(ctx.device)
            raise TrainingError(
                f"The loss became {'NaN' if math.isnan(value) else 'infinite'} at step {self.pos.step + 1}; "
                "lower the learning rate or use bf16/fp32 (the last good save is kept).")
        return value

    def drop_ahead(self, device: torch.device) -> None:
        """The next step's batch was made but that step is not taken next (a stop, a save): its random draws are
        undone, so the streams are as after this step alone (a save records them; a resume goes on from them)."""
        if self._ahead is not None:
            set_rng_state(self._ahead.rng, device)
            self._ahead = None

    def _make_batch(self, ctx: StepContext, batch: list[int]) -> dict[str, torch.Tensor]:
        """Everything random or data-dependent for one batch, drawn here (before the step) so the
        loss is a pure function of these tensors (CUDA graphs replay it; see accel/)."""
        config, items = self.config, self.dataset.items
        flips = [config.flip_aug and random.random() < 0.5 for _ in batch]
        latents = torch.stack([
            ctx.latents[k].flipped if flip and ctx.latents[k].flipped is not None else ctx.latents[k].latent
            for k, flip in zip(batch, flips)])
        latents = to_device(latents, ctx.device)
        out: dict[str, torch.Tensor] = {"latents": latents}
        if self.text_cache is not None:
            out.update(stack_conditioning([self.text_cache[k] for k in batch], ctx.device))
        if self.step_keys:
            captions = [process_caption(items[k].caption, shuffle=config.shuffle_caption,
                                        keep_tokens=config.keep_tokens,
                                        caption_dropout_rate=config.caption_dropout_rate,
                                        tag_dropout_rate=config.caption_tag_dropout_rate) for k in batch]
            tokens = ctx.family.tokenize(ctx.bundle, captions, **self._tokenize_keys)
            out.update({k: to_device(v, ctx.device) for k, v in tokens.items()})
        drawn = ctx.objective.draw(latents)  # noise, timesteps/sigmas: the step's random draws
        objective_weights = drawn.pop("weights", None)
        out.update(drawn)
        weights = to_device(torch.tensor([config.prior_loss_weight if items[k].is_reg else 1.0 for k in batch]),
                            ctx.device)
        if objective_weights is not None:
            weights = weights * objective_weights
        out["weights"] = weights
        extras = ctx.family.batch_extras(ctx.bundle, [items[k] for k in batch], flips)
        out.update({k: to_device(v, ctx.device) for k, v in extras.items()})
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

