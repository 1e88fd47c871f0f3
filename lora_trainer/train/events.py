"""What the engine reports while it runs and what it returns: plain dataclasses, no torch objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

EVENT_KINDS = ("plan", "cache", "step", "epoch", "sample", "save", "done", "stopped", "error")
# "cache": progress of the one-off latent / text-encoder caching before step 1 (message only)


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
    vram_bytes: int | None = None  # peak allocated on the training GPU, None on CPU
    message: str = ""
    path: str | None = None
    paths: list[str] = field(default_factory=list)
    plan: TrainingPlan | None = None  # on "plan"


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
