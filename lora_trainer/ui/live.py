"""What the page follows and says about runs, while they run (no Gradio here).

Every open page shows the same thing: the training run that is going (or the next queued one), else
the newest one. So opening, reopening or reloading the page mid-run shows that run at once and keeps
it updating, and Stop acts on the run the page shows. `Follower` turns a job into the values of the
progress components and sends only what changed (a page polls about once a second).
"""

from __future__ import annotations

import re
import time
from typing import Any

from ..jobs import FINAL_STATES, Job, JobManager
from . import logic

PLOT_EVERY = 5.0  # seconds between redraws of the loss figure while a run goes on


def followed(jobs: JobManager) -> Job | None:
    """The run the page shows: the active training run, else the newest one that ran (a queued run
    cancelled before it started is not worth showing over the run that did)."""
    active = jobs.active_train()
    if active is not None:
        return active
    ran = [j for j in jobs.jobs() if j.kind == "train" and j.started is not None]
    return max(ran, key=lambda j: j.started) if ran else jobs.latest("train")


def _describe(job: Job) -> str:
    name = getattr(job.config, "name", "") or job.label
    if job.state == "queued":
        return f"`{name}` (waiting to start)"
    where = f"step {job.step}/{job.total_steps}" if job.total_steps else "starting"
    return f"`{name}` ({where})"


def run_state_md(jobs: JobManager) -> str:
    """The line beside the Train/Stop buttons: what is training now and what waits after it."""
    active = jobs.active_train()
    waiting = [j for j in jobs.queued() if j.kind == "train" and j is not active]
    if active is None:
        latest = jobs.latest("train")
        if latest is None:
            return "Nothing is training."
        return f"Nothing is training. Last run: `{getattr(latest.config, 'name', latest.label)}`, {latest.state}."
    line = f"**Training:** {_describe(active)}" if active.state == "running" else f"**Next:** {_describe(active)}"
    if waiting:
        line += (f" · **Queued after it:** {', '.join(_describe(j) for j in waiting)} — Stop does not touch "
                 "queued runs; *Cancel queued* does.")
    return line


def busy_question(jobs: JobManager, what: str) -> str | None:
    """Asked when Train/Resume is pressed while a run is active; None when nothing is."""
    active = jobs.active_train()
    if active is None:
        return None
    return (f"**A run is already {'going' if active.state == 'running' else 'waiting'}:** {_describe(active)}. "
            f"{what} now would start only after it ends. Queue it, or cancel?")


def runs_choices(jobs: JobManager) -> list[tuple[str, str]]:
    """(label, job id) of every stopped run that can be resumed, newest first."""
    out = []
    for job in jobs.resumable():
        when = time.strftime("%b %d %H:%M", time.localtime(job.finished or job.created))
        name = getattr(job.config, "name", job.label)
        out.append((f"{name} — stopped at step {job.step}/{job.total_steps}, {when} [{job.id}]", job.id))
    return out


def run_id_of(label: str | None) -> str:
    """The job id at the end of a runs_choices label ("... [a1b2c3d4e5f6]")."""
    m = re.search(r"\[([0-9a-f]+)\]\s*$", label or "")
    return m.group(1) if m else ""


class Follower:
    """One page's view of the followed run: `update()` gives the component values that changed."""


    def __init__(self, jobs: JobManager, sent: dict[str, Any] | None = None) -> None:
        self.jobs = jobs
        self.sent: dict[str, Any] = sent if sent is not None else {}  # what this page shows (Gradio 4: a State)

    def snapshot(self) -> dict[str, Any] | None:
        job = followed(self.jobs)
        return self.jobs.snapshot(job.id) if job is not None else None

    def update(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """{field: new value} for the fields whose value changed since the last call (all, first time);
        `extra` values (the tab's own, e.g. the model line) are compared and sent the same way."""
        snap = self.snapshot()
        job_id = snap["id"] if snap else ""
        history = snap["loss_history"] if snap else []
        shown = (logic.ab_grids(snap.get("outputs", [])) + list(snap["samples"])) if snap else []
        runs = runs_choices(self.jobs)
        keys = {
            "job_id": job_id,
            "progress": logic.progress_html(snap),
            "loss_plot": self._plot_key(snap, history),
            "samples": (job_id, tuple(shown)),
            "result": logic.result_md(snap),
            "send_text": (snap or {}).get("prompt_text", ""),
            "run_state": run_state_md(self.jobs),
            "runs": tuple(runs),
            "queued": any(j.kind == "train" for j in self.jobs.queued()),
            **(extra or {}),
        }
        changed = {}
        for name, key in keys.items():
            if name not in self.sent or self.sent[name] != key:
                self.sent[name] = key
                changed[name] = key
        if "loss_plot" in changed:  # with the "did it learn?" scores once an epoch is scored
            changed["loss_plot"] = logic.loss_figure(history, (snap or {}).get("report"))
        if "samples" in changed:
            changed["samples"] = logic.sample_items(shown)
        if "runs" in changed:
            changed["runs"] = runs
        return changed

    def _plot_key(self, snap: dict[str, Any] | None, history: list) -> tuple:
        """When the loss figure is drawn again: a new run, the run's end, or while it runs every
        PLOT_EVERY seconds (drawing it is the poll's costliest part; the numbers above update each second)."""
        if not snap:
            return ("", 0, None)
        report = snap.get("report") or {}
        scored = (len(report.get("epochs") or []), report.get("verdict"), report.get("best_epoch"))
        old = self.sent.get("loss_plot")
        running = snap["state"] not in FINAL_STATES
        if (running and old and old[0] == snap["id"] and old[3] and old[5] == scored
                and time.time() - old[4] < PLOT_EVERY):
            return old
        return (snap["id"], len(history), history[-1] if history else None, running, time.time() if running else 0,
                scored)

    def forget(self) -> None:
        """Send everything again next time."""
        self.sent.clear()


def is_final(snap: dict[str, Any] | None) -> bool:
    return bool(snap) and snap["state"] in FINAL_STATES
