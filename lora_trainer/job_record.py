"""A job's record: the `Job` dataclass the UI and API show, its states and errors, and its card
(`job.json`) in a training run's folder, read back after a restart so that a stopped run can be
listed and resumed again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dataset.atomic import write_text_atomic
from .errors import LoraTrainerError

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed", "stopped")
FINAL_STATES = frozenset({"done", "failed", "stopped"})
KEEP_FINISHED = 50  # finished jobs remembered for polling (and records read back)
RECORD = "job.json"  # a training job's card in its run folder, read back after a restart


class JobError(LoraTrainerError):
    """A job request cannot be carried out as asked."""


class UnknownJobError(JobError):
    """No job has the requested id."""


class JobQueueFullError(JobError):
    """Too many jobs are waiting already."""


@dataclass
class Job:
    """One queued/running/finished job; `to_dict()` is what the UI and API show."""

    id: str
    kind: str  # "train" | "tag" | "prepare"
    label: str
    state: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    total_epochs: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    vram_bytes: int | None = None  # peak GPU memory the process reserved (torch's cache included)
    phase: str = ""  # what the run does now: "cache", "train", "sample", "save" (ProgressEvent.phase)
    phase_done: int = 0
    phase_total: int = 0
    loss_history: list[tuple[int, float, float | None]] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    saves: list[str] = field(default_factory=list)  # LoRAs the engine wrote in the run folder
    outputs: list[str] = field(default_factory=list)  # published files (Lora folder) or results
    lora_name: str | None = None
    prompt_text: str = ""
    plan_text: str = ""
    message: str = ""
    notes: list[str] = field(default_factory=list)  # the host's notes on the model (host.last_notes)
    family: str = ""  # the model family trained ("SD1", "SDXL", ...), once known
    error: str | None = None
    result: Any = None  # tag/prepare: a JSON-able summary; train: the TrainResult
    report: dict[str, Any] | None = None  # train: "did it learn?" (train/report.py LearnReport.to_dict())
    state_dir: str | None = None
    resumed_from: str | None = None
    config: Any = None  # TrainConfig for training jobs
    lora_subdir: str = ""
    stop_event: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)
    _fn: Callable[[Job], Any] | None = field(default=None, repr=False)
    _gpu: bool = field(default=True, repr=False)

    @property
    def finished_ok(self) -> bool:
        return self.state == "done"

    def progress(self, done: int, total: int, message: str = "") -> None:
        """For tag/prepare functions: report `done` of `total` items."""
        self.step, self.total_steps = done, total
        if message:
            self.message = message

    def to_dict(self) -> dict[str, Any]:
        summary = self.result if isinstance(self.result, (dict, list, str, int, float)) else None
        return {
            "id": self.id, "kind": self.kind, "label": self.label, "state": self.state,
            "created": self.created, "started": self.started, "finished": self.finished,
            "step": self.step, "total_steps": self.total_steps, "epoch": self.epoch,
            "total_epochs": self.total_epochs, "loss": self.loss, "smoothed_loss": self.smoothed_loss,
            "lr": self.lr, "it_per_s": self.it_per_s, "eta_s": self.eta_s, "vram_bytes": self.vram_bytes,
            "phase": self.phase, "phase_done": self.phase_done, "phase_total": self.phase_total,
            "loss_history": [list(x) for x in self.loss_history], "samples": list(self.samples),
            "saves": list(self.saves), "outputs": list(self.outputs), "lora_name": self.lora_name,
            "prompt_text": self.prompt_text, "plan": self.plan_text, "message": self.message,
            "notes": list(self.notes), "family": self.family, "error": self.error, "state_dir": self.state_dir,
            "resumed_from": self.resumed_from, "result": summary, "report": self.report,
            "config": self.config.to_dict() if hasattr(self.config, "to_dict") else None,
        }



def write_record(job: Job) -> None:
    """Keep a training job's card in its run folder (`job.json`), so that after a restart of the
    server or WebUI the run is listed again and, if stopped, can be resumed from the tab/API."""
    output_dir = getattr(job.config, "output_dir", "") if job.kind == "train" else ""
    if not output_dir or not Path(output_dir).is_dir():
        return
    try:
        write_text_atomic(Path(output_dir) / RECORD, json.dumps(
            {**job.to_dict(), "lora_subdir": job.lora_subdir, "record_version": 1}, default=str))
    except (OSError, TypeError, ValueError) as e:  # never fail a job over its record
        log.warning("could not write the job record in %s: %s", output_dir, e)


def read_records(work_dir: Path) -> list[Job]:
    """Training jobs recorded by earlier sessions under `work_dir` (newest last, at most
    `KEEP_FINISHED`). A run that was still going when the process ended comes back as stopped,
    resumable from its last saved state when it has one; unreadable records are skipped."""
    try:
        records = sorted(work_dir.glob(f"*/{RECORD}"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return []
    jobs: list[Job] = []
    for path in records[-KEEP_FINISHED:]:
        try:
            jobs.append(job_from_record(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError, KeyError, LoraTrainerError) as e:
            log.warning("ignoring the job record %s: %s", path, e)
    return jobs


def job_from_record(data: dict[str, Any]) -> Job:
    from .config import TrainConfig

    config = TrainConfig.from_dict(data["config"], source="job record")
    job = Job(id=str(data["id"]), kind="train", label=str(data.get("label") or f"train {config.name}"))
    for name in ("created", "started", "finished", "step", "total_steps", "epoch", "total_epochs", "loss",
                 "smoothed_loss", "lr", "it_per_s", "eta_s", "vram_bytes", "samples", "saves", "outputs",
                 "lora_name", "prompt_text", "message", "notes", "family", "error", "state_dir", "resumed_from",
                 "lora_subdir", "report"):
        if data.get(name) is not None:
            setattr(job, name, data[name])
    job.plan_text = data.get("plan") or ""
    job.loss_history = [tuple(x) for x in data.get("loss_history") or []]
    job.config = config
    job.state = data.get("state") or "stopped"
    if job.state not in FINAL_STATES:  # the process ended while it ran (or waited)
        saved = config.state_dir()
        job.state, job.finished = "stopped", job.finished or job.started or job.created
        job.state_dir = str(saved) if saved.is_dir() else None
        job.message = ("Interrupted when the server stopped; Resume continues from the last saved state."
                       if job.state_dir else "Interrupted when the server stopped, before it saved a state.")
    job.done_event.set()
    return job
