"""What the engine reports while it runs and what it returns: plain dataclasses, no torch objects,
plus the clock that turns step times into an honest speed and ETA (`RunClock`)."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENT_KINDS = ("plan", "cache", "step", "epoch", "validation", "phase", "sample", "save", "done", "stopped", "error")
# "cache": progress of the one-off latent / text-encoder caching before step 1
# "validation": after an epoch was scored ("did it learn?", train/report.py): `report` holds the
#          LearnReport so far as a dict, `message` its one-sentence verdict
# "phase": the run is busy with something other than a training step (sampling, saving), with its
#          progress in phase_done/phase_total; "sample"/"save" report the files once written
PHASES = ("cache", "train", "sample", "save")


@dataclass
class TrainingPlan:
    """The epochs/steps/repeats arithmetic, computed once before training (and shown to the user)."""

    num_images: int  # distinct training images
    num_reg_images: int  # distinct regularisation images
    images_x_repeats: int  # training images counted with their folder's repeats
    reg_x_repeats: int  # regularisation images used per epoch (kohya balances them to images_x_repeats)
    samples_per_epoch: int
    batch_size: int
    gradient_accumulation_steps: int
    batches_per_epoch: int  # sums ceil(n / batch) over buckets: a batch never mixes buckets
    steps_per_epoch: int  # optimizer steps
    epochs: int
    total_steps: int
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" -> images in it (with repeats)
    folders: list[str] = field(default_factory=list)  # "10_name: 12 images × 10 repeats"

    def text(self) -> str:
        lines = ["Dataset:"]
        lines += [f"  {f}" for f in self.folders]
        lines.append(f"  {self.num_images} images × repeats = {self.images_x_repeats} samples per epoch"
                     + (f" + {self.reg_x_repeats} regularisation samples" if self.reg_x_repeats else ""))
        lines.append("Buckets: " + ", ".join(f"{k} ({v})" for k, v in self.buckets.items()))
        accum = (f" / {self.gradient_accumulation_steps} accumulation"
                 if self.gradient_accumulation_steps > 1 else "")
        lines.append(f"Steps: {self.samples_per_epoch} samples / batch {self.batch_size} = "
                     f"{self.batches_per_epoch} batches per epoch{accum} = {self.steps_per_epoch} steps per epoch")
        capped = " (stopped early by max_steps)" if self.total_steps < self.steps_per_epoch * self.epochs else ""
        lines.append(f"Total: {self.steps_per_epoch} steps × {self.epochs} epochs → {self.total_steps} steps{capped}")
        return "\n".join(lines)


@dataclass
class ProgressEvent:
    kind: str  # one of EVENT_KINDS
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    vram_bytes: int | None = None  # peak memory this process reserved on the training GPU, None on CPU
    message: str = ""
    phase: str = ""  # one of PHASES on "cache"/"step"/"phase" events: what the run is doing now
    phase_done: int = 0  # progress inside the phase (images cached, sampling steps done, ...)
    phase_total: int = 0
    path: str | None = None
    paths: list[str] = field(default_factory=list)
    plan: TrainingPlan | None = None  # on "plan"
    report: dict[str, Any] | None = None  # on "validation": LearnReport.to_dict() (train/report.py)


@dataclass
class TrainResult:
    lora_path: Path | None  # the LoRA to use: final file, or the one saved when stopped
    saved: list[Path]  # every LoRA file written by this run (incl. intermediate saves)
    samples: list[Path]
    state_dir: Path | None  # resumable state (None when save_state is off)
    stopped: bool
    steps: int
    final_loss: float | None
    plan: TrainingPlan
    losses: list[float] = field(default_factory=list)  # per optimizer step, for plots and tests
    report: dict[str, Any] | None = None  # "did it learn?": LearnReport.to_dict(), None when validation is off


# ---------------------------------------------------------------------------------- speed and ETA
@dataclass
class Schedule:
    """The run's side work still to come, so the ETA counts it (what the engine was configured to do)."""

    total_steps: int
    epochs: int
    steps_per_epoch: int
    batch_size: int = 1
    sample_every_n_epochs: int = 0
    sample_images: int = 0  # prompts per sampling round
    sample_steps: int = 0  # denoising steps per image
    save_every_n_epochs: int = 0
    save_every_n_steps: int = 0

    @classmethod
    def of(cls, config: Any, plan: TrainingPlan) -> Schedule:
        prompts = len(getattr(config, "sample_prompts", None) or [])
        return cls(total_steps=plan.total_steps, epochs=plan.epochs, steps_per_epoch=max(1, plan.steps_per_epoch),
                   batch_size=max(1, plan.batch_size * plan.gradient_accumulation_steps),
                   sample_every_n_epochs=getattr(config, "sample_every_n_epochs", 0) if prompts else 0,
                   sample_images=prompts, sample_steps=int(getattr(config, "sample_steps", 0) or 0),
                   save_every_n_epochs=getattr(config, "save_every_n_epochs", 0) or 0,
                   save_every_n_steps=getattr(config, "save_every_n_steps", 0) or 0)

    def _epochs_run(self) -> int:
        """Epochs that will end (and so may sample/save): max_steps can cut the last ones."""
        return min(self.epochs, -(-self.total_steps // self.steps_per_epoch))

    def samples_after(self, step: int) -> int:
        """Sampling rounds still to come once `step` steps are done."""
        if not self.sample_every_n_epochs:
            return 0
        done_epochs = step // self.steps_per_epoch
        return sum(1 for e in range(done_epochs + 1, self._epochs_run() + 1) if e % self.sample_every_n_epochs == 0)

    def saves_after(self, step: int) -> int:
        """LoRA files still to be written once `step` steps are done (intermediate ones + the final one)."""
        last_epoch = self._epochs_run()
        n = 1
        if self.save_every_n_epochs:
            n += sum(1 for e in range(step // self.steps_per_epoch + 1, last_epoch)
                     if e % self.save_every_n_epochs == 0)
        if self.save_every_n_steps:
            n += sum(1 for s in range(step + 1, self.total_steps) if s % self.save_every_n_steps == 0)
        return n


class RunClock:
    """Training speed over a recent window and an ETA that includes the sampling and saving to come.

    The speed is the steps per second of the last `window` steps, measured on training time only:
    time spent in a phase (sampling, saving) is left out, and so is the first step of a run (it
    carries one-off costs: CUDA graph capture, kernel autotuning, the allocator growing). Averaging
    from the start instead shows a speed far below the real one for most of a short run. The next few
    steps can carry such costs too (the accelerated path captures its CUDA graph at the third step:
    0.15-0.23 s where the steady step takes 0.03 s, bench/results/e2e_pyc_h200/), so a step that took more
    than `OUTLIER` times the window's median is left out once the window holds enough steps to tell.
    """

    OUTLIER = 4.0  # a step this many times slower than the window's median is a one-off, not the speed
    MIN_STEPS = 5  # steps in the window before outliers are told apart

    def __init__(self, schedule: Schedule, *, window: int = 20, now: Callable[[], float] = time.perf_counter):
        self.schedule = schedule
        self.window = max(2, window)
        self._now = now
        self._times: deque[tuple[int, float]] = deque(maxlen=self.window + 1)  # (step, training time)
        self._excluded = 0.0  # seconds spent in phases since the clock started
        self._phase_times: dict[str, list[float]] = {}

    def _training_time(self) -> float:
        return self._now() - self._excluded

    def step(self, step: int) -> None:
        """Step `step` just finished."""
        self._times.append((step, self._training_time()))

    def rate(self) -> float | None:
        """Steps per second over the recent window; None until two steps after the first are timed."""
        spans = [(s1 - s0, t1 - t0) for (s0, t0), (s1, t1) in itertools.pairwise(self._times) if s1 > s0 and t1 > t0]
        if not spans:
            return None
        if len(spans) >= self.MIN_STEPS:
            per_step = sorted(dt / ds for ds, dt in spans)
            limit = self.OUTLIER * per_step[len(per_step) // 2]
            spans = [(ds, dt) for ds, dt in spans if dt / ds <= limit]
        return sum(ds for ds, _ in spans) / sum(dt for _, dt in spans)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time side work (sampling, saving): kept out of the step speed, remembered for the ETA."""
        start = self._now()
        try:
            yield
        finally:
            spent = self._now() - start
            self._excluded += spent
            self._phase_times.setdefault(name, []).append(spent)

    def phase_seconds(self, name: str) -> float | None:
        """Average duration of `name` phases so far (None before the first one)."""
        times = self._phase_times.get(name)
        return sum(times) / len(times) if times else None

    def eta(self, step: int) -> float | None:
        """Seconds until the run ends: steps left at the current speed, plus the sampling rounds and
        saves still to come (their measured durations once one ran; see `estimate_seconds`)."""
        rate = self.rate()
        if rate is None:
            return None
        return estimate_seconds(self.schedule, step, rate, sample_seconds=self.phase_seconds("sample"),
                                save_seconds=self.phase_seconds("save"))


def estimate_seconds(schedule: Schedule, step: int, rate: float, *, sample_seconds: float | None = None,
                     save_seconds: float | None = None) -> float:
    """Seconds from `step` to the end at `rate` steps/s, with the sampling rounds and saves to come.

    Without a measured sampling round, one is estimated from the step speed: a training step is a
    forward and a backward pass over `batch_size` images (about 3 × batch forward passes) and a
    denoising step with CFG is 2 forward passes. Saves count 0 s until one was timed (they are short).
    """
    seconds = max(0, schedule.total_steps - step) / rate
    rounds = schedule.samples_after(step)
    if rounds:
        if sample_seconds is None:
            sample_seconds = schedule.sample_images * schedule.sample_steps * 2 / (3 * schedule.batch_size) / rate
        seconds += rounds * sample_seconds
    return seconds + schedule.saves_after(step) * (save_seconds or 0.0)
