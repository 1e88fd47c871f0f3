"""What a run saves, apart from the step loop: LoRA files (epoch, step, stop and final saves, the best
epoch's kept file), the resumable state, kohya's ss_* metadata and the WebUI's `<name>.json`.

`SavingMixin` holds `_Run`'s saving methods (they use the run's config, plan, position, network and
events); the file names (`lora_file`, `epoch_tag`, `step_tag`) are the fixed names of docs/internals.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..lora.errors import LoraFileError
from ..lora.kohya_file import publish_kohya, write_kohya_temp
from ..models.bundle import ModelBundle
from ..prefetch import in_background
from .data import Dataset
from .events import ProgressEvent, TrainingPlan
from .state import rng_state, save_state, set_rng_state
from .usermeta import write_user_metadata

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def lora_file(config: TrainConfig, tag: str = "") -> Path:
    return Path(config.output_dir) / f"{config.name}{tag}.safetensors"


def epoch_tag(epoch: int) -> str:
    return f"-{epoch:06d}"  # kohya: name-000004.safetensors


def step_tag(step: int) -> str:
    return f"-step{step:08d}"  # kohya: name-step00000500.safetensors


@contextlib.contextmanager
def rng_guard():
    """Run side work (saves, samples) without consuming python/numpy/torch random numbers."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


class SavingMixin:
    """`_Run`'s saves (see the module's docstring)."""

    _final_write: tuple[Path, Future] | None = None  # the final LoRA being written (`_start_final_write`)

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """This epoch's LoRA as it would be saved (CPU tensors + metadata): a candidate for the best epoch's file."""
        return self.network.kohya_state_dict(SAVE_DTYPES[self.config.save_precision]), self._metadata()

    def _keep_epoch(self, epoch: int, candidate: Path | None) -> Path | None:
        """The best epoch's LoRA as that epoch's save: the one saved already (`save_every_n_epochs`), else a copy
        of its kept candidate file (train/validation.py); None when there is neither or the name is taken."""
        path = lora_file(self.config, epoch_tag(epoch))
        if path in self.saved:
            return path
        if candidate is None or not candidate.is_file():
            log.warning("best epoch %d not kept: its weights were not kept", epoch)
            return None
        if path.exists() and not self.config.overwrite:
            log.warning("best epoch %d not kept: %s already exists", epoch, path)
            return None
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: a copy beside it, then renamed
        try:
            shutil.copyfile(candidate, tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise LoraFileError(f"Cannot write the best epoch's LoRA file {path} ({e.strerror or e}); free some "
                                f"space in its folder; that epoch's weights are in {candidate} until the next "
                                "run of this name.") from e
        finally:
            tmp.unlink(missing_ok=True)
        self.saved.append(path)
        self.pos.saved = [str(p) for p in self.saved]
        self.emit(ProgressEvent("save", step=self.pos.step, total_steps=self.plan.total_steps, epoch=self.pos.epoch,
                                total_epochs=self.plan.epochs, message=f"Saved {path} (best epoch)", path=str(path)))
        return path

    def _start_final_write(self) -> None:
        """Write the final LoRA in a thread, to a hidden temp file beside it, while its epoch is scored (the
        engine calls this after the last step): its hashes, serialising and sync (~0.5 s for SD1.5 at rank 32)
        leave the end of the run; `_write_lora` renames it into place. The weights and metadata are taken now."""
        if not self.dist.is_main:  # several GPUs: one writer
            return
        path = lora_file(self.config)
        state, meta = self._snapshot()
        self._final_write = (path, in_background(write_kohya_temp, path, state, meta, name="lora-final"))

    def _drop_final_write(self) -> None:
        """A final write the run did not publish (it failed after the last step): its temp file goes."""
        pending, self._final_write = self._final_write, None
        if pending is not None:
            with contextlib.suppress(Exception):
                os.unlink(pending[1].result())

    def _write_lora(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pending = None
        if self._final_write is not None and self._final_write[0] == path:
            pending, self._final_write = self._final_write[1], None
        self._emit_phase("save", 0, 1, f"Saving {path.name}…")
        with self.clock.phase("save"):
            if pending is not None:
                publish_kohya(pending.result(), path)  # its error (e.g. a full disk) raises here, as a save's
            elif self.dist.is_main:  # several GPUs: one writer
                self.network.save_kohya(path, self._metadata(), dtype=SAVE_DTYPES[self.config.save_precision])
        if path not in self.saved:
            self.saved.append(path)
        self.pos.saved = [str(p) for p in self.saved]
        self.emit(ProgressEvent("save", step=self.pos.step, total_steps=self.plan.total_steps,
                                epoch=self._shown_epoch(), total_epochs=self.plan.epochs, message=f"Saved {path}",
                                path=str(path)))
        return path

    def _save(self, tag: str, optimizer, scheduler, scaler, *, force_state: bool = False) -> Path:
        with rng_guard():  # saving must not move the training's random streams (resume exactness)
            path = self._write_lora(lora_file(self.config, tag))
        if (self.config.save_state or force_state) and not self.dist.is_main:
            self.state_path = self.config.state_dir()  # rank 0 writes it
        elif self.config.save_state or force_state:
            self.state_path = save_state(
                self.config.state_dir(), config_hash=self.config.hash(),
                config_json=json.dumps(self.config.to_dict(), indent=2, default=str),
                lora=self.network.kohya_state_dict(torch.float32), optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, position=dataclasses.replace(self.pos), device=self.device)
        return path

    def _save_end(self, stopped: bool, bundle: ModelBundle, optimizer, scheduler, scaler,
                  final_loss: float | None) -> tuple[Path, Any]:
        """The run's last files: stopped, a step save and the resumable state; done, the final LoRA and its
        `<name>.json`. The best epoch's file is kept before the state is saved (the resumed run lists it) and
        before "done" lists the files."""
        if stopped:
            report = self.validator.finish(None, self.pos.epoch, self._keep_epoch, done=False) \
                if self.validator else None
            path = self._save(step_tag(self.pos.step), optimizer, scheduler, scaler, force_state=True)
            self.emit(ProgressEvent("stopped", step=self.pos.step, total_steps=self.plan.total_steps,
                                    epoch=self._shown_epoch(), total_epochs=self.plan.epochs, loss=final_loss,
                                    message=f"Stopped at step {self.pos.step}; resume from {self.state_path}.",
                                    path=str(path)))
        else:
            path = self._write_lora(lora_file(self.config))
            self._write_user_metadata(path, bundle)
            report = self.validator.finish(path, self.pos.epoch, self._keep_epoch) if self.validator else None
            self.emit(ProgressEvent("done", step=self.pos.step, total_steps=self.plan.total_steps,
                                    epoch=self.pos.epoch, total_epochs=self.plan.epochs, loss=final_loss,
                                    smoothed_loss=self.pos.smoothed, message=f"Finished: {path}", path=str(path),
                                    paths=[str(p) for p in self.saved]))
        return path, report

    def _check_room(self, trainable: list[torch.Tensor]) -> None:
        """Disk room for the LoRA files, the state (weights + ~2 optimizer moments, fp32) and samples."""
        n = sum(p.numel() for p in trainable)
        rounds = self.plan.epochs // self.config.sample_every_n_epochs if self.config.sample_every_n_epochs else 0
        samples = rounds * len(self.config.sample_prompts) * 3 * self.config.resolution ** 2  # PNG ≤ raw RGB
        self.claim.check_room(lora_bytes=n * SAVE_DTYPES[self.config.save_precision].itemsize + (1 << 20),
                              state_bytes=n * 4 * 4, sample_bytes=samples)

    def _metadata(self) -> dict[str, str]:
        from ..lora.metadata import build_metadata

        facts = training_facts(self.config, self.dataset, self.plan, self.pos.step, self.pos.epoch, self.started_at)
        facts.session_id = self.session_id
        facts.mixed_precision = self.precision  # what ran (fp32 on the CPU whatever was asked)
        metadata = build_metadata(self.network.bundle, self.network.spec, facts)
        metadata.update(self.family.metadata_extras(self.config))
        return metadata

    def _write_user_metadata(self, path: Path, bundle: ModelBundle) -> None:
        if not self.dist.is_main:
            return
        activation = self.config.activation_text or ", ".join(self.dataset.class_tokens())
        write_user_metadata(path, activation_text=activation, preferred_weight=self.config.preferred_weight,
                            sd_version=bundle.family.label,
                            description=f"Trained with lora-trainer on {bundle.name} ({self.pos.step} steps).")


def training_facts(config: TrainConfig, dataset: Dataset, plan: TrainingPlan, step: int, epoch: int,
                   started_at: float) -> Any:
    """What kohya records about a run (ss_* metadata), from our settings and plan."""
    from ..lora.metadata import TrainingFacts

    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    tags: dict[str, dict[str, int]] = {}
    for item in dataset.items:
        entry = (reg_dirs if item.is_reg else dirs).setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
        entry["img_count"] += 1
        if not item.is_reg:
            freq = tags.setdefault(item.folder, {})
            for tag in (t.strip() for t in item.caption.split(",")):
                if tag:
                    freq[tag] = freq.get(tag, 0) + 1
    optimizer_names = {"AdamW": "torch.optim.adamw.AdamW", "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                       "Lion": "lion_pytorch.lion_pytorch.Lion", "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
                       "Prodigy": "prodigyopt.prodigy.Prodigy",
                       "Adafactor": "transformers.optimization.Adafactor"}
    optimizer = optimizer_names[config.optimizer]
    if config.optimizer == "AdamW8bit":
        from .optim import bitsandbytes_works

        if not bitsandbytes_works():
            optimizer = "lora_trainer.train.adamw8bit.AdamW8bit"
    if config.optimizer_args:
        optimizer += "(" + ",".join(f"{k}={v}" for k, v in config.optimizer_args.items()) + ")"
    return TrainingFacts(
        output_name=config.name, training_started_at=started_at, steps=step, epoch=epoch,
        num_epochs=plan.epochs, max_train_steps=plan.total_steps, num_train_images=plan.images_x_repeats,
        num_reg_images=plan.reg_x_repeats, num_batches_per_epoch=plan.batches_per_epoch,
        batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing, learning_rate=config.learning_rate,
        unet_lr=config.learning_rate if config.train_unet else None,
        text_encoder_lr=(config.text_encoder_lr or config.learning_rate) if config.train_text_encoder else None,
        lr_scheduler=config.lr_scheduler, lr_warmup_steps=config.lr_warmup_steps, optimizer=optimizer,
        max_grad_norm=config.max_grad_norm, mixed_precision=config.mixed_precision, seed=config.seed,
        clip_skip=config.clip_skip if config.clip_skip > 1 else None,
        noise_offset=config.noise_offset or None,
        multires_noise_iterations=config.multires_noise_iterations or None,
        multires_noise_discount=config.multires_noise_discount,
        min_snr_gamma=config.min_snr_gamma or None, prior_loss_weight=config.prior_loss_weight,
        caption_dropout_rate=config.caption_dropout_rate, caption_tag_dropout_rate=config.caption_tag_dropout_rate,
        min_timestep=config.min_timestep or None, max_timestep=config.max_timestep or None,
        resolution=config.resolution, enable_bucket=config.enable_bucket, min_bucket_reso=config.bucket_limits()[0],
        max_bucket_reso=config.bucket_limits()[1], bucket_no_upscale=config.bucket_no_upscale,
        bucket_info={"buckets": {str(i): {"resolution": [int(x) for x in k.split("x")], "count": v}
                                 for i, (k, v) in enumerate(plan.buckets.items())}},
        flip_aug=config.flip_aug, shuffle_caption=config.shuffle_caption, keep_tokens=config.keep_tokens,
        dataset_dirs=dirs, reg_dataset_dirs=reg_dirs, tag_frequency=tags,
        trigger_phrase=config.activation_text or ", ".join(dataset.class_tokens()) or None,
    )
