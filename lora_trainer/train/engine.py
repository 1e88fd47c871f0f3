"""The training run: plan, load, cache, inject LoRA, loop, save, sample, stop/resume.

Contract (used by jobs.py, the CLI and the demo):
    run_training(config, *, bundle=None, on_event=None, stop=None) -> TrainResult
    plan_training(config) -> TrainingPlan          (no model needed; planning.py, re-exported here)
A `bundle` handed in (the WebUI's model) is trained in place through peft adapters that are
removed at the end; its VAE/text encoders go back to the device they came from; base weights
are never cast or written.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import ConfigError, LoraTrainerError, TrainingError
from ..gc_freeze import building, run_scope, thaw
from ..models.bundle import ModelBundle
from ..prefetch import in_background
from ..quiet import quiet_known_warnings
from .caching import CachingMixin
from .data import Dataset, epoch_batches
from .distributed import SINGLE, Group
from .epoch_samples import SamplingMixin
from .events import ProgressEvent, RunClock, Schedule, TrainingPlan, TrainResult
from .family import family_for
from .optim import build_optimizer, build_scheduler, check_optimizer_available
from .outputs import OutputClaim, claim_outputs
from .placement import Placement
from .planning import check_model_file, model_components, planned_files, prepare_dataset
from .saving import SavingMixin, epoch_tag, step_tag
from .saving import rng_guard as _rng_guard
from .state import Position, load_state, position_from, set_rng_state
from .step import StepContext, StepMixin
from .validation import Validator

if TYPE_CHECKING:
    from ..accel import AccelOptions

log = logging.getLogger(__name__)

EventCallback = Callable[[ProgressEvent], None]


# ---------------------------------------------------------------------------------- entry point
@run_scope()  # the collector skips what lives through the run (gc_freeze.py)
def run_training(config: TrainConfig, *, bundle: ModelBundle | None = None,
                 on_event: EventCallback | None = None, stop: threading.Event | None = None,
                 owns_bundle: bool = False, dist: Group | None = None) -> TrainResult:
    """Train a LoRA (see the module docstring). `owns_bundle=True` hands a bundle over for good
    (benchmarks, the demo): the engine may then replace its frozen modules (fp8 base weights) and
    leaves its parts where training left them; a host's bundle (False) is given back as it came.
    `dist`: this process's place in a multi-GPU run (`train.distributed`); only rank 0 reports."""
    from .distributed import check_processes, match_resume

    dist = dist or SINGLE
    emit = (on_event if dist.is_main else None) or (lambda event: None)
    quiet_known_warnings()
    check_processes(config, dist, hosted=bundle is not None)
    config = match_resume(config)
    config.validate(need_model=bundle is None)
    check_optimizer_available(config.optimizer)
    if bundle is None:
        with building():
            check_model_file(config.model, model_components(config))  # the header alone, before anything heavy
    # The scan decodes every image in threads that release the GIL: it runs while this thread imports what the
    # model's load needs first (transformers, for the tokenizer: 0.5-1 s), as the header check used to before it.
    scan = in_background(prepare_dataset, config, name="dataset-scan")
    if bundle is None:
        with building():
            _import_loader_libraries()
    dataset, plan = scan.result()
    resume = load_state(config.resume, config.hash()) if config.resume else None
    already = set(position_from(resume).saved) if resume else set()
    # OUT writable, our names claimed against concurrent runs, nothing overwritten: before any heavy work
    # (several GPUs: rank 0 alone writes, so it alone claims; a refusal there stops the others as PeerFailed)
    claims: list[OutputClaim] = []
    dist.build_once(lambda: claims.append(claim_outputs(config, planned_files(config, plan), resumed=already)))
    claim = claims[0] if claims else None
    with claim or contextlib.nullcontext():
        emit(ProgressEvent("plan", total_steps=plan.total_steps, total_epochs=plan.epochs, message=plan.text(),
                           plan=plan))
        run = _Run(config, dataset, plan, emit, stop or threading.Event(), resume, dist)
        run.claim = claim
        try:
            return run.execute(bundle, owns_bundle)
        except LoraTrainerError as e:
            emit(ProgressEvent("error", step=run.pos.step, total_steps=plan.total_steps, message=str(e)))
            raise
        except Exception as e:  # unexpected: report, keep the traceback for the log
            emit(ProgressEvent("error", step=run.pos.step, total_steps=plan.total_steps,
                               message=f"{e.__class__.__name__}: {e}"))
            raise


def _import_loader_libraries() -> None:
    from ..models import tokenizers  # noqa: F401 - transformers and its CLIP tokenizer, for load_model


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    text = str(e).lower()
    return (oom is not None and isinstance(e, oom)) or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


class _Run(CachingMixin, StepMixin, SavingMixin, SamplingMixin):
    def __init__(self, config: TrainConfig, dataset: Dataset, plan: TrainingPlan, emit: EventCallback,
                 stop: threading.Event, resume: dict[str, Any] | None, dist: Group = SINGLE):
        self.config, self.dataset, self.plan, self.emit, self.stop = config, dataset, plan, emit, stop
        self.resume, self.dist = resume, dist
        self.device: torch.device | None = None
        self.pos = position_from(resume) if resume else Position()
        self.saved: list[Path] = []
        self.samples: list[Path] = []
        self.state_path: Path | None = None
        self.network = None
        self.own_bundle: ModelBundle | None = None
        self.precision = config.mixed_precision
        self.started_at = time.time()
        self.clock = RunClock(Schedule.of(config, plan))
        self.validator: Validator | None = None
        self._between_steps: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.session_id = int.from_bytes(os.urandom(4), "little")  # kohya's ss_session_id, not from the seeded RNG
        self.claim: OutputClaim | None = None  # our names in OUT (train/outputs.py); checks disk room before step 1

    # ------------------------------------------------------------------ setup
    def _device(self, bundle: ModelBundle | None) -> torch.device:
        if bundle is not None:
            return next(bundle.unet.parameters()).device
        if self.dist.device is not None:
            return self.dist.device
        if self.config.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.config.device)
        except RuntimeError as e:
            raise ConfigError(f"Device '{self.config.device}' is not a torch device; use auto, cpu or cuda.") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("CUDA was requested but torch sees no GPU; use --device cpu or install CUDA torch.")
        return device

    def _weight_dtype(self, device: torch.device) -> torch.dtype:
        mp = self.config.mixed_precision
        if device.type != "cuda":
            if mp != "no":
                log.info("mixed precision %s does not apply on %s; training in fp32", mp, device.type)
            return torch.float32
        if mp == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16; using fp16 with loss scaling instead")
            return torch.float16
        return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]

    def _load(self, device: torch.device, dtype: torch.dtype) -> ModelBundle:
        from ..models.loader import load_model

        # The file's tensors, memory-mapped: each part is read and cast as it goes to the device (placement.py).
        with building():
            bundle = load_model(self.config.model, dtype=None, device=None, **model_components(self.config))
        self.placement = Placement(bundle, device, dtype)
        return bundle

    # ------------------------------------------------------------------ main
    def execute(self, given: ModelBundle | None, owns_bundle: bool = False) -> TrainResult:
        config = self.config
        device = self.device = self._device(given)
        own = given is None or owns_bundle
        weight_dtype = self._weight_dtype(device) if given is None else next(given.unet.parameters()).dtype
        bundle = self._load(device, weight_dtype) if given is None else given
        assert bundle is not None
        if given is not None:
            self.placement = Placement(bundle, device, None)
        self.own_bundle = bundle if own else None
        self.family = family_for(bundle, config)
        self.family.check_config(config)
        self.models = self.family.placement(bundle, self.placement, device, config, own)
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype, "no")
        homes = {id(m): (next(m.parameters()).device, m.training)
                 for m in (bundle.unet, bundle.vae, *bundle.text_encoders)}
        from ..accel import AccelOptions

        try:
            return self._train(bundle, device, weight_dtype, AccelOptions.from_config(config))
        except Exception as e:
            if _is_oom(e):
                # The traceback's frames hold the activations/optimizer state: drop them, then free.
                traceback.clear_frames(e.__traceback__)
                self._free(device)
                where = "The GPU" if device.type == "cuda" else f"Training on {device.type}"
                raise TrainingError(
                    f"{where} ran out of memory at step {self.pos.step} (resolution {config.resolution}, batch "
                    f"{config.batch_size}); lower the batch size or resolution, turn on gradient checkpointing, "
                    "or pick a low-VRAM preset.") from e
            raise
        finally:
            self._drop_final_write()
            self.placement.close()
            if getattr(self, "models", None) is not None:
                self.models.close()
            if self.network is not None:
                self.network.remove()
                self.network = None
            if hasattr(bundle.unet, "disable_gradient_checkpointing"):
                bundle.unet.disable_gradient_checkpointing()
            for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
                home_device, was_training = homes[id(m)]
                if not own:
                    m.to(home_device)
                m.train(was_training)
            del bundle
            thaw()  # cycles among what the run loaded are collected now
            self._free(device)

    @staticmethod
    def _free(device: torch.device) -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _train(self, bundle: ModelBundle, device: torch.device, weight_dtype: torch.dtype,
               opts: AccelOptions) -> TrainResult:
        from ..lora.network import LoraSpec, inject_lora

        config, plan = self.config, self.plan

        # --- latents, once, then the VAE leaves the GPU (the UNet may upload meanwhile: placement.py)
        sampling = bool(config.sample_prompts and config.sample_every_n_epochs)
        sampling = sampling and self.dist.is_main  # only rank 0 samples
        spec = LoraSpec(rank=config.rank, alpha=config.alpha, conv_rank=config.conv_rank or None,
                        conv_alpha=config.conv_alpha if config.conv_rank else None,
                        train_unet=config.train_unet, train_text_encoder=config.train_text_encoder,
                        train_t5=config.train_t5)
        from .. import accel

        own = bundle is self.own_bundle  # a host's: fp8 would replace the Linear modules in its skeleton, and
        # channels_last make an NHWC copy of every convolution weight beside its own (fp8: no gain on CPU either)
        opts.fp8_base = opts.fp8_base and own and device.type == "cuda" and not self.models.quantizes_base
        opts.channels_last = opts.channels_last and own
        checks = accel.check_kernels_early(opts, device, weight_dtype)  # (off by default: accel/options.py)
        inject = functools.partial(inject_lora, bundle, spec, seed=config.seed, dtype=torch.float32)
        early: list[Any] = []
        # accel's early_lora: the adapters added in the upload's thread, beside the caching below, where only the
        # UNet of an SD model trains (the text encoders are in use for caching; Flux's layers have their own plans)
        beside = (opts.early_lora and config.train_unet and not (config.train_text_encoder or config.train_t5)
                  and self.family.key in ("sd1", "sdxl"))
        self.models.start_early(then=(lambda: early.append(inject())) if beside else None)
        latents = self._cache_latents(bundle, device, weight_dtype, sampling)
        # --- text: outputs of frozen encoders cached when captions never change, the rest encoded per step
        self._cache_text(bundle, device, weight_dtype, sampling)

        self.models.denoiser()  # waits for the upload (and the adapters added beside it)

        # --- adapters (fp32) on the modules being trained
        self.network = network = early[0] if early else inject()
        if self.resume:
            network.load_kohya_state_dict(self.resume["lora"], strict=True)
        groups = []
        if config.train_unet:
            groups.append({"params": list(network.parameters("unet")), "lr": config.learning_rate})
        trained_tes = [network.roots[c] for c in network.components() if c != "unet"]  # CLIP, T5 (train_t5)
        if trained_tes:
            groups.append({"params": list(network.parameters("te")),
                           "lr": config.text_encoder_lr or config.learning_rate})
        trainable = [p for g in groups for p in g["params"]]
        bundle.unet.train(config.train_unet)
        for te in bundle.text_encoders:
            te.train(any(te is t for t in trained_tes))
        if config.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            bundle.unet.train()  # diffusers only checkpoints in training mode
            for te in trained_tes:
                _te_checkpointing(te)

        if checks is not None:
            checks.result()  # the early kernel checks' launches end before any capture
        for component in network.components():
            accel.prepare_model(network.roots[component], opts, device=device)
        self.models.ready()
        logging.getLogger(accel.__name__).info(accel.describe(opts, device))  # internal: the CLI shows it with -v
        optimizer = build_optimizer(config.optimizer, groups, lr=config.learning_rate,
                                    weight_decay=config.weight_decay, args=config.optimizer_args,
                                    extra=accel.optimizer_kwargs(device) if opts.enabled else None)
        scheduler = build_scheduler(config.lr_scheduler, optimizer, warmup_steps=config.lr_warmup_steps,
                                    total_steps=plan.total_steps, num_cycles=config.lr_scheduler_num_cycles,
                                    power=config.lr_scheduler_power)
        scaler = _grad_scaler() if weight_dtype == torch.float16 and device.type == "cuda" else None
        if self.claim is not None:
            self._check_room(trainable)
        if self.resume:
            optimizer.load_state_dict(self.resume["optimizer"])
            scheduler.load_state_dict(self.resume["scheduler"])
            if scaler is not None and self.resume.get("scaler"):
                scaler.load_state_dict(self.resume["scaler"])
            set_rng_state(self.resume["rng"], device=device)
            self.saved = [Path(p) for p in self.pos.saved]
        else:
            # Seeded here, after all setup, so the training stream (data flips, caption shuffles,
            # noise, timesteps) depends only on the seed, not on how many modules got adapters.
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
            torch.manual_seed(config.seed)
            if device.type == "cuda":
                torch.cuda.manual_seed_all(config.seed)
        objective = self.family.make_objective(bundle, config, device)
        ctx = StepContext(bundle, device, weight_dtype, objective, latents, self.family)
        # several GPUs: the loss runs through torch's DDP, which all-reduces the LoRA gradients
        loss_fn = self.dist.wrap(lambda b: self._loss(ctx, b), [network.roots[c] for c in network.components()])
        opts.graph_warmup = max(opts.graph_warmup, self.dist.graph_warmup)
        runner = accel.StepRunner(loss_fn, trainable, optimizer, opts,
                                  max_grad_norm=config.max_grad_norm, scaler=scaler, device=device)
        # the epoch's scoring and samples use the CUDA graphs' idle pool, not memory beside it (accel/graphs.py)
        self._between_steps = runner.scratch
        if self.validator is not None:
            with _rng_guard():
                self.models.before_step()
                self.validator.start(network, objective, resumed=self.resume is not None, history=self.pos.report,
                                     candidates_dir=config.candidates_dir())
        stopped = False
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        while self.pos.epoch < plan.epochs and self.pos.step < plan.total_steps:
            batches = epoch_batches(self.dataset, config.global_batch_size, config.seed, self.pos.epoch)
            accum = config.gradient_accumulation_steps
            chunks = [batches[i:i + accum] for i in range(0, len(batches), accum)]
            while self.pos.chunk < len(chunks) and self.pos.step < plan.total_steps:
                # the next step's batch, made while this one runs (train/step.py), where it is in this epoch
                after = self.pos.chunk + 1
                ahead = chunks[after] if after < len(chunks) and self.pos.step + 1 < plan.total_steps else None
                loss = self._step(ctx, chunks[self.pos.chunk], runner, ahead)
                loss = self.dist.mean(loss)  # several GPUs: the loss of the whole (global) batch
                scheduler.step()
                self.pos.step += 1
                self.pos.chunk += 1
                self.pos.losses.append(loss)
                self.pos.smoothed = loss if self.pos.smoothed is None else 0.9 * self.pos.smoothed + 0.1 * loss
                self.clock.step(self.pos.step)
                self._emit_step(scheduler, device)
                if config.save_every_n_steps and self.pos.step % config.save_every_n_steps == 0 \
                        and self.pos.step < plan.total_steps:
                    self.drop_ahead(device)  # the state saved holds the random streams as after this step
                    self._save(step_tag(self.pos.step), optimizer, scheduler, scaler)
                if self.dist.any(self.stop.is_set()):  # several GPUs: a stop asked on any rank stops all here
                    self.drop_ahead(device)
                    stopped = True
                    break
            if self.pos.chunk >= len(chunks):
                self.pos.epoch += 1
                self.pos.chunk = 0
                self._epoch_end(bundle, optimizer, scheduler, scaler, device)
                self.dist.barrier()  # the other GPUs wait here while rank 0 saves and samples
            if stopped:
                break

        final_loss = self.pos.losses[-1] if self.pos.losses else None
        stopped = stopped and self.pos.step < plan.total_steps
        path, report = self._save_end(stopped, bundle, optimizer, scheduler, scaler, final_loss)
        self.dist.barrier()  # several GPUs: no process ends before rank 0 has written everything
        return TrainResult(lora_path=path, saved=list(self.saved), samples=list(self.samples),
                           state_dir=self.state_path, stopped=stopped, steps=self.pos.step, final_loss=final_loss,
                           plan=plan, losses=list(self.pos.losses),
                           report=report.to_dict() if report is not None else None)

    # ------------------------------------------------------------------ reporting, saving, samples
    def _emit_step(self, scheduler, device: torch.device) -> None:
        # what the process holds on the GPU (torch's cache included), as nvidia-smi would show it
        vram = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        if self.config.log_every and (self.pos.step % self.config.log_every == 0
                                      or self.pos.step == self.plan.total_steps):
            self.emit(ProgressEvent("step", step=self.pos.step, total_steps=self.plan.total_steps,
                                    epoch=self.pos.epoch + 1, total_epochs=self.plan.epochs,
                                    loss=self.pos.losses[-1], smoothed_loss=self.pos.smoothed,
                                    lr=scheduler.get_last_lr()[0], it_per_s=self.clock.rate(),
                                    eta_s=self.clock.eta(self.pos.step), vram_bytes=vram, phase="train",
                                    phase_done=self.pos.step, phase_total=self.plan.total_steps))

    def _shown_epoch(self) -> int:
        """The epoch as the last step showed it (1-based), also mid-epoch at a stop or save."""
        return self.pos.epoch + (1 if self.pos.chunk else 0)

    def _emit_phase(self, phase: str, done: int, total: int, message: str) -> None:
        self.emit(ProgressEvent("phase", step=self.pos.step, total_steps=self.plan.total_steps,
                                epoch=self._shown_epoch(), total_epochs=self.plan.epochs, message=message, phase=phase,
                                phase_done=done, phase_total=total, it_per_s=self.clock.rate(),
                                eta_s=self.clock.eta(self.pos.step)))

    def _epoch_end(self, bundle: ModelBundle, optimizer, scheduler, scaler, device: torch.device) -> None:
        config, epoch = self.config, self.pos.epoch
        self.emit(ProgressEvent("epoch", step=self.pos.step, total_steps=self.plan.total_steps, epoch=epoch,
                                total_epochs=self.plan.epochs, loss=self.pos.losses[-1] if self.pos.losses else None,
                                smoothed_loss=self.pos.smoothed))
        last = epoch >= self.plan.epochs or self.pos.step >= self.plan.total_steps
        every = config.validate_every_n_epochs
        if self.validator is not None and every and (epoch % every == 0 or last):
            if self.pos.step >= self.plan.total_steps:
                self._start_final_write()  # the final LoRA's file written while its epoch is scored
            with _rng_guard(), self._between_steps():
                self.models.before_step()
                self.validator.epoch(epoch, self.pos.step, self._snapshot,
                                     final=self.pos.step >= self.plan.total_steps)
            self.pos.report = self.validator.history()
        if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0 and not last:
            self._save(epoch_tag(epoch), optimizer, scheduler, scaler)
        if config.sample_every_n_epochs and config.sample_prompts and self.dist.is_main and (
                epoch % config.sample_every_n_epochs == 0):
            with _rng_guard(), self._between_steps():
                self._sample(bundle, device, epoch)

    def _emit_validation(self, report: dict[str, Any]) -> None:
        self.emit(ProgressEvent("validation", step=self.pos.step, total_steps=self.plan.total_steps,
                                epoch=self.pos.epoch, total_epochs=self.plan.epochs, message=report["message"],
                                report=report))


def _grad_scaler():
    amp = getattr(torch, "amp", None)
    with contextlib.suppress(TypeError):  # torch < 2.3 takes no device argument here
        if amp is not None and hasattr(amp, "GradScaler"):
            return amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()


def _te_checkpointing(te) -> None:
    try:
        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except TypeError:  # transformers < 4.35: reentrant checkpointing needs inputs that require grad
        te.gradient_checkpointing_enable()
        te.enable_input_require_grads()
