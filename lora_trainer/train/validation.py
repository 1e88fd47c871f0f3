""""Did it learn?": the scores behind the report (train/report.py): a validation loss and a leakage measure
after every epoch, from the model being trained and nothing else.

A fixed set of (image, timestep, noise) triples is scored after each epoch:
- **validation loss** (with the trigger): the denoising loss on the images' own captions. The run
  starts by scoring the base model (LoRA off), so every epoch reads as *improvement* = how far below
  the base model's loss it is. A LoRA that has not learned its concept yet barely moves it.
- **leakage**, two measures (the report names the one it used, `LearnReport.leak_measure`):
  - with a leak-check set (`leak_check_dir`: pictures of other concepts with their captions, never trained
    on; `other_source` "leak_check"), else with regularisation images (kohya's class images: pictures of what
    the trigger must not override, with their captions, trained on; `other_source` "regularisation"),
    **"other concepts"**: how much the LoRA changes the prediction on those pictures with
    their own captions, relative to how much it changes it on the trigger's pictures with theirs, both
    noised with the same fixed noise to the middle of the schedule (timestep 500):
    Σ|LoRA(o) - base(o)|² / Σ|LoRA(t) - base(t)|². A LoRA bound to its trigger leaves other prompts mostly
    alone (0.24-0.47 on the demo models; 0.26-0.35 for the demo's runs trained with the other shapes as
    regularisation images); one that draws its concept whatever is asked moves them about as much as its
    own (0.5-1.1); this follows what the LoRA draws for other prompts, as a shape classifier reads it
    (bench/results/demo_lora_cpu/candidate_lesson_and_leakage_2026-12-05.md, §2 and §4). The first epoch or
    two of a good run read higher (0.5-0.87): the LoRA's change is still small and not yet bound to its trigger.
    Regularisation images are also trained on, which pulls the LoRA's change on them towards the base model;
    a leak-check set reads the LoRA without that pull (the demo's runs 0.40-0.44 at the last epoch, 0.29-0.57
    from the third; over-trained ones 0.94-1.14, every epoch over 0.6: §5 of the results file).
  - without them, leakage is **not checked** (`leak_measure` "not_checked"): nothing the engine has tells a
    LoRA that draws its concept whatever the prompt from one bound to its trigger (the captions without the
    trigger, on the training images or on pure noise, read about 1.0 for every run, good ones included:
    bench/results/learn_thresholds_demo_cpu.md, demo_lora_cpu/shipped_candidate_2026-12-05.md §2). The report
    then says leakage was not checked and how to check it.

Images: `validation_split` > 0 holds that share of the training images out (scored, never trained
on); otherwise the training images themselves are scored with fixed noise. The best epoch is the
latest one that does not leak and scores within the noise of the lowest validation loss (train/report.py);
its LoRA file is kept.

The verdict and its thresholds (`LEARNED_MIN_IMPROVEMENT`, `LEAK_MAX_OTHER`) are in train/report.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .report import (
    LEAK_CHECK,
    NOT_CHECKED,
    OTHER_CONCEPTS,
    REGULARISATION,
    EpochCheck,
    LearnReport,
    candidates,
    thresholds_for,
)

log = logging.getLogger(__name__)

PAIRS = 16  # (image, timestep) pairs scored per epoch for the validation loss: 1 forward pass each
LEAK_PAIRS = 16  # "other concepts": pictures scored on each side (the trigger's and the other concepts')
# "other concepts" (regularisation images): both sides at the middle of the schedule (DDPM timestep 500, flow
# sigma 0.5), where the picture still holds its layout and the prediction shows what the LoRA adds to it
MID_LEVEL = 0.5
MAX_IMAGES = 8
# a kept epoch's LoRA in config.candidates_dir(): a kohya file, not named .safetensors so no WebUI lists it
CANDIDATE_SUFFIX = ".candidate"


# ---------------------------------------------------------------------------------- triggers in captions
def trigger_words(activation_text: str, class_tokens: list[str]) -> list[str]:
    """The phrases that call the LoRA: the activation text's comma-separated parts, else the
    dataset's `<N>_<name>` folder names."""
    source = [p.strip() for p in activation_text.split(",")] if activation_text.strip() else class_tokens
    return [p for p in dict.fromkeys(s.strip() for s in source) if p]


def strip_trigger(caption: str, triggers: list[str]) -> str | None:
    """The caption without the trigger phrases (whole words, any case), or None when it holds none."""
    text = caption
    for phrase in sorted(triggers, key=len, reverse=True):
        text = re.sub(rf"(?<![\w]){re.escape(phrase)}(?![\w])", "", text, flags=re.IGNORECASE)
    if text == caption:
        return None
    parts = [re.sub(r"\s+", " ", p).strip() for p in text.split(",")]
    return ", ".join(p for p in parts if p)


def split_held_out(dataset, fraction: float, seed: int) -> None:
    """Move `fraction` of the training images (at least one, never all) to `dataset.held_out`:
    scored after every epoch, never trained on. The pick depends only on the seed."""
    if fraction <= 0:
        return
    import numpy as np

    train = [k for k, item in enumerate(dataset.items) if not item.is_reg]
    n = min(len(train) - 1, max(1, round(len(train) * fraction)))
    if n < 1:
        dataset.warnings.append("validation_split needs at least two training images; scoring the training "
                                "images with fixed noise instead.")
        return
    chosen = set(np.random.default_rng([seed, 7919]).choice(train, size=n, replace=False).tolist())
    dataset.held_out = [item for k, item in enumerate(dataset.items) if k in chosen]
    dataset.items = [item for k, item in enumerate(dataset.items) if k not in chosen]


# ---------------------------------------------------------------------------------- the validator
def scoring_batch(config) -> int:
    """Pairs per scoring forward pass. An epoch scores 16-48 pairs (the first scored epoch twice: the base model
    too), and at a small batch each pass costs mostly overhead (Python, kernel launches): at least 4 per pass.
    Measured: 2.5x faster than 1 per pass on the CPU (bench/results/e2e_vs_kohya_h200.md); on an H100 a batch-1 run
    of 400 steps took 22.7 s with 4 per pass and 26.0 s scoring at its own batch of 1
    (bench/results/e2e_vs_kohya_h100_scoring.md). A pass without gradients holds far less than a training step, which
    keeps every layer's activations for the backward pass, so 4 pairs fit wherever one training image does; with
    gradient checkpointing (the low-VRAM presets) the step keeps little, so the training batch there."""
    batch = max(1, int(config.batch_size))
    return batch if getattr(config, "gradient_checkpointing", False) else max(batch, 4)


@dataclass
class _Pair:
    latent: torch.Tensor  # (C, h, w), scaled, CPU
    caption: str
    plain: str | None  # caption without the trigger (None: the caption holds none)
    item: Any  # ImageItem (the family's per-image extras, e.g. SDXL's size conditioning)
    draws: dict[str, torch.Tensor] = field(default_factory=dict)  # noise, timesteps/sigmas: fixed, CPU
    probe: dict[str, torch.Tensor] = field(default_factory=dict)  # leakage draws: fixed noise at MID_LEVEL


class Validator:
    """Scores the fixed pairs with the base model (at the first scored epoch) and after every epoch, through the
    model family's own text encoding, objective draws and prediction (train/family.py).

    The engine calls: `create` (latents cached), `captions`/`set_text` (frozen text encoders: the
    captions go through the run's text cache), `start` (adapters injected, objective made), `epoch`
    (an epoch's end), `finish` (the run's end).
    """

    def __init__(self, pairs: list[_Pair], method: str, images: int, trigger: str, bundle, family,
                 device: torch.device, dtype: torch.dtype, clip_skip: int, seed: int, emit: Callable[[dict], None],
                 batch: int = 8, others: list[_Pair] | None = None, other_source: str = REGULARISATION):
        self.pairs, self.bundle, self.family = pairs, bundle, family
        # other concepts' pictures with their captions: leakage is "other concepts", else not checked (module
        # docstring)
        self.others = list(others or [])
        self.batch = max(1, batch)  # pairs per forward pass (scoring_batch)
        self.device, self.dtype, self.clip_skip, self.seed, self.emit = device, dtype, clip_skip, seed, emit
        measure = OTHER_CONCEPTS if self.others and trigger else NOT_CHECKED
        self.report = LearnReport(method=method, images=images, pairs=len(pairs), trigger=trigger, base_loss=None,
                                  leak_measure=measure, other_images=len({id(p.item) for p in self.others})
                                  if measure == OTHER_CONCEPTS else 0, thresholds=thresholds_for(measure),
                                  other_source=other_source if measure == OTHER_CONCEPTS else "")
        self.fixed_text: dict[str, dict[str, torch.Tensor]] | None = None
        self.objective: Any = None
        self.network: Any = None
        # the base model's leakage predictions, "own"/"other" (other concepts)
        self.base: dict[Any, torch.Tensor] | None = None
        with_trigger = [k for k, p in enumerate(pairs) if p.plain is not None]  # probes spread over the images
        self.probes = [with_trigger[int(n * len(with_trigger) / LEAK_PAIRS)]
                       for n in range(min(LEAK_PAIRS, len(with_trigger)))]
        # the LoRA files of the epochs the report could still pick (report.candidates), written when scored
        # (config.candidates_dir(), kept for a resume), removed when they no longer can be
        self.candidates_dir: Path | None = None
        self.kept: dict[int, Path] = {}
        # writes the last scored epoch's file (removes the unwanted) while training goes on: 0.2-0.3 s each
        self._writing: threading.Thread | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, config, dataset, latents: list, bundle, family, device: torch.device, dtype: torch.dtype,
               emit: Callable[[dict], None], cache: Callable[[list], list]) -> Validator | None:
        if not getattr(config, "validate_every_n_epochs", 1):
            return None
        held = list(getattr(dataset, "held_out", []) or [])
        if held:
            items, lats, method = held, cache(held), "held-out"
        else:
            train = [(i, item) for i, item in enumerate(dataset.items) if not item.is_reg]
            stride = max(1, len(train) / MAX_IMAGES)
            chosen = [train[int(k * stride)] for k in range(min(MAX_IMAGES, len(train)))]
            items, lats, method = [c[1] for c in chosen], [latents[c[0]] for c in chosen], "training images, fixed noise"
        if not items:
            return None
        from .captions import process_caption

        triggers = trigger_words(config.activation_text, dataset.class_tokens())
        per_image = max(1, math.ceil(PAIRS / len(items)))
        pairs = []
        for k in range(per_image * len(items)):
            item, cached = items[k % len(items)], lats[k % len(items)]
            caption = process_caption(item.caption)
            pairs.append(_Pair(cached.latent, caption, strip_trigger(caption, triggers), item))
        trigger = ", ".join(triggers) if any(p.plain is not None for p in pairs) else ""
        # "other concepts": up to LEAK_PAIRS pictures spread over the leak-check set (`leak_check_dir`, never
        # trained on: its latents cached here, as the held-out ones) or else over the regularisation images (their
        # latents the ones cached for training); cycled, each with its own noise, when there are fewer
        check = list(getattr(dataset, "leak_check", []) or [])
        if check and trigger:
            source, other = LEAK_CHECK, list(zip(check, cache(check)))
        else:
            source, other = REGULARISATION, [(item, latents[i]) for i, item in enumerate(dataset.items) if item.is_reg]
        others = [_Pair(cached.latent, process_caption(item.caption), None, item)
                  for item, cached in (other[int(n * len(other) / LEAK_PAIRS)]
                                       for n in range(LEAK_PAIRS if other else 0))]
        return cls(pairs, method, len(items), trigger, bundle, family, device, dtype, int(config.clip_skip),
                   int(config.seed), emit, batch=scoring_batch(config), others=others, other_source=source)

    # ------------------------------------------------------------------ text
    def captions(self) -> list[str]:
        """Every caption scored (the trigger's pictures' and the other concepts'), for the run's text cache."""
        return list(dict.fromkeys([p.caption for p in self.pairs] + [p.caption for p in self.others]))

    def set_text(self, captions: list[str], conditioning: list[dict[str, torch.Tensor]]) -> None:
        """Frozen text encoders: the conditioning of `captions()` from the run's text cache."""
        self.fixed_text = dict(zip(captions, conditioning))

    def _text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from .family import stack_conditioning

        if self.fixed_text is not None:
            cond = stack_conditioning([self.fixed_text[c] for c in captions], self.device)
            missing = tuple(k for k in self.family.cond_keys if k not in cond)
            if missing:  # partly cached (Flux: T5 while CLIP-L trains): the rest from its encoder, on the device
                with torch.no_grad(), self._autocast():
                    cond.update(self.family.encode_text(self.bundle, captions, clip_skip=self.clip_skip, keys=missing))
            return cond
        with torch.no_grad(), self._autocast():
            return self.family.encode_text(self.bundle, captions, clip_skip=self.clip_skip)

    # ------------------------------------------------------------------ scoring
    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _draw(self, objective) -> None:
        """The objective's own draws (noise, timesteps or sigmas) per pair, once, from a fixed seed."""
        devices = [self.device] if self.device.type == "cuda" else []
        for k, pair in enumerate(self.pairs):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed * 7919 + k)
                drawn = objective.draw(pair.latent.unsqueeze(0).to(self.device))
            drawn.pop("weights", None)  # a plain, unweighted loss is scored
            pair.draws = {name: value[0].detach().cpu() for name, value in drawn.items()}
        if self.report.leak_measure != OTHER_CONCEPTS:
            return
        # the n-th probe of each side draws from the same seed: the same noise where the latents' shapes match
        for side in ([self.pairs[k] for k in self.probes], self.others):
            for n, pair in enumerate(side):
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(self.seed * 7919 + 104729 + n)
                    drawn = objective.draw(pair.latent.unsqueeze(0).to(self.device))
                drawn.pop("weights", None)
                drawn = {name: value[0].detach().cpu() for name, value in drawn.items()}
                pair.probe = {**drawn, **_high_level(drawn, MID_LEVEL, objective)}

    @torch.no_grad()
    def _predict(self, pairs: list[_Pair], *, probe: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(prediction, target) per pair, on the CPU in fp32, with the pair's own caption and its scoring draws or
        its leakage draws (`probe`)."""
        from .family import StepInputs

        out: list[Any] = [None] * len(pairs)
        groups: dict[tuple, list[int]] = {}
        for j, p in enumerate(pairs):
            groups.setdefault(tuple(p.latent.shape), []).append(j)
        model_dtype = next(self.bundle.unet.parameters()).dtype
        for group in groups.values():
            for start in range(0, len(group), self.batch):
                part = group[start:start + self.batch]
                chunk = [pairs[j] for j in part]
                latents = torch.stack([p.latent for p in chunk]).to(self.device)
                batch = {"latents": latents}
                for name in (chunk[0].probe if probe else chunk[0].draws):
                    batch[name] = torch.stack([(p.probe if probe else p.draws)[name] for p in chunk]).to(self.device)
                extras = self.family.batch_extras(self.bundle, [p.item for p in chunk], [False] * len(chunk))
                batch.update({name: v.to(self.device) for name, v in extras.items()})
                cond = self._text([p.caption for p in chunk])
                with self._autocast():
                    pred, target = self.family.prediction_and_target(
                        StepInputs(self.bundle, batch, cond, self.objective, model_dtype))
                for i, j in enumerate(part):
                    out[j] = (pred[i].float().cpu(), target[i].float().cpu())
        return out

    def _score(self) -> tuple[list[float], dict[Any, torch.Tensor]]:
        """Each pair's validation loss, and the leakage predictions ("other concepts"): the trigger's pictures
        ("own", k) and the other concepts' pictures ("other", n), each with its own caption."""
        modules = [self.bundle.unet, *self.bundle.text_encoders]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            scored = self._predict(self.pairs)
            val = [float(torch.mean((pred - target) ** 2)) for pred, target in scored]
            leak: dict[Any, torch.Tensor] = {}
            if self.report.leak_measure == OTHER_CONCEPTS:
                probes = [self.pairs[k] for k in self.probes]
                leak.update({("own", k): v[0] for k, v in zip(self.probes, self._predict(probes, probe=True))})
                leak.update({("other", n): v[0] for n, v in enumerate(self._predict(self.others, probe=True))})
            return val, leak
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def start(self, network, objective, *, resumed: bool = False, history: dict[str, Any] | None = None,
              candidates_dir: Path | None = None) -> None:
        """Fix the pairs' draws; the base model is scored later, at the first scored epoch (`_score_base`),
        so that these forward passes do not delay the first training step. `candidates_dir`: where the epochs
        the report could still pick keep their LoRA files (a resumed run finds its earlier ones there)."""
        self.network, self.objective = network, objective
        self._draw(objective)
        if resumed and history and history.get("epochs"):
            earlier = LearnReport.from_dict(history)
            if earlier.leak_measure != self.report.leak_measure:  # another measure (an older version's): not comparable
                for e in earlier.epochs:
                    e.leak = None
            self.report.epochs = earlier.epochs
            self.report.best_epoch, self.report.best_path = earlier.best_epoch, earlier.best_path
        self.candidates_dir, self.kept = candidates_dir, {}
        if candidates_dir is not None and resumed:
            scored = {e.epoch for e in self.report.epochs}
            for path in candidates_dir.glob(f"epoch-*{CANDIDATE_SUFFIX}"):
                epoch = int(path.name[len("epoch-"):-len(CANDIDATE_SUFFIX)])
                if epoch in scored:
                    self.kept[epoch] = path
        elif candidates_dir is not None:
            shutil.rmtree(candidates_dir, ignore_errors=True)  # an earlier run's of the same name
        log.info("validation: %d pairs on %d %s", len(self.pairs), self.report.images, self.report.method)

    def _score_base(self) -> None:
        """The base model's scores: the adapters at multiplier 0 (the same as the model before training)."""
        if self.base is not None:
            return
        self.network.set_multiplier(0.0)
        try:
            losses, self.base = self._score()
            self.report.base_loss = _mean(losses)
        finally:
            self.network.set_multiplier(1.0)
        log.info("validation: base model loss %.5f", self.report.base_loss)

    def epoch(self, epoch: int, step: int, snapshot: Callable[[], Any], *, final: bool = False) -> LearnReport:
        """Score the LoRA as it is after `epoch`; keep its file (`snapshot()`: its state dict and metadata, CPU
        copies) while the report could pick it, written in a thread while training goes on. `final`: the run's last
        step is done and its final LoRA is saved next."""
        self._score_base()
        losses, predictions = self._score()
        val = _mean(losses)
        leak = None
        if self.report.trigger and self.report.leak_measure == OTHER_CONCEPTS:
            leak = _other_ratio(self.base, predictions)
        self.report.epochs = [e for e in self.report.epochs if e.epoch != epoch]
        self.report.epochs.append(EpochCheck(epoch=epoch, step=step, val_loss=val,
                                             improvement=1.0 - val / self.report.base_loss, leak=leak,
                                             pair_losses=[float(f"{x:.6g}") for x in losses]))
        self.report.judge()
        wanted = candidates(self.report)
        self.wait_for_files()  # the previous epoch's: one write at a time, in the order scored
        write = None
        # the run's last epoch needs no candidate: the final LoRA, saved next, holds the same weights (finish())
        if epoch in wanted and self.candidates_dir is not None and not final:
            write = (epoch, self.candidates_dir / f"epoch-{epoch:06d}{CANDIDATE_SUFFIX}", *snapshot())
            self.kept[epoch] = write[1]  # a write that fails leaves no file: keep_best's `keep` says so
        gone = [self.kept.pop(e) for e in list(self.kept) if e not in wanted]
        if write is not None or gone:
            self._writing = threading.Thread(target=_write_and_remove, args=(write, gone), name="lora-candidate")
            self._writing.start()
        self.emit(self.report.to_dict())
        return self.report

    def wait_for_files(self) -> None:
        """Wait until the candidate files being written or removed are (the run's end, a stop, the next epoch)."""
        self._writing, writing = None, self._writing
        if writing is not None:
            writing.join()

    def keep_best(self, keep: Callable[[int, Path | None], Path | None]) -> None:
        """Make the best epoch's LoRA a file of its own: `keep(epoch, its candidate file or None)` -> the epoch's
        file, or None when there is none (then the report names no file). `finish` calls it, its files written."""
        if self.report.best_epoch is not None:
            path = keep(self.report.best_epoch, self.kept.get(self.report.best_epoch))
            self.report.best_path = str(path) if path is not None else None

    def finish(self, final_path: Path | None, last_epoch: int, keep: Callable[[int, Path | None], Path | None],
               *, done: bool = True) -> LearnReport:
        """Keep the best epoch's file: the final LoRA when it is the last epoch, else its kept candidate as that
        epoch's save. `done`: the run ended (not stopped to resume), so the candidates go."""
        self.wait_for_files()
        self.report.judge()
        if self.report.best_epoch is not None:
            if self.report.best_epoch == last_epoch and final_path is not None:
                self.report.best_path = str(final_path)
            else:
                self.keep_best(keep)
        if done and self.candidates_dir is not None:
            shutil.rmtree(self.candidates_dir, ignore_errors=True)
            self.kept = {}
        return self.report

    def history(self) -> dict[str, Any]:
        return self.report.to_dict()


def _write_and_remove(write: tuple[int, Path, dict[str, torch.Tensor], dict[str, str]] | None,
                      gone: list[Path]) -> None:
    """The candidate thread: write an epoch's LoRA file (atomically), then remove the files no longer wanted."""
    if write is not None:
        from ..lora.kohya_file import save_kohya

        epoch, path, state, metadata = write
        try:
            save_kohya(path, state, metadata)
        except Exception as e:  # noqa: BLE001 - (e.g. the disk is full) training goes on; only this file is missing
            log.warning("epoch %d not kept as a candidate for the best epoch's file: %s", epoch, e)
    for path in gone:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _high_level(draws: dict[str, torch.Tensor], level: float, objective) -> dict[str, torch.Tensor]:
    """A probe's noise level: `level` of the way up the objective's schedule (1.0: pure noise), in the
    objective's own terms (DDPM timesteps or flow sigmas)."""
    if "timesteps" in draws:
        last = int(getattr(getattr(objective, "scheduler", None), "config", {}).get("num_train_timesteps", 1000)) - 1
        return {"timesteps": torch.tensor(round(level * last), dtype=draws["timesteps"].dtype)}
    if "sigmas" in draws:
        return {"sigmas": torch.tensor(level, dtype=draws["sigmas"].dtype).reshape(draws["sigmas"].shape)}
    return {}


def _other_ratio(base: dict[Any, torch.Tensor], lora: dict[Any, torch.Tensor]) -> float:
    """Other concepts: Σ|LoRA(o) - base(o)|² over the regularisation images / Σ|LoRA(t) - base(t)|² over the
    trigger's pictures (0: other prompts untouched; 1: moved as much as the trigger's own)."""
    change = {"own": 0.0, "other": 0.0}
    for key, reference in base.items():
        change[key[0]] += float(((lora[key] - reference) ** 2).sum())
    return change["other"] / change["own"] if change["own"] > 0 else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
