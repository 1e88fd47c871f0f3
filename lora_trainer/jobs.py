"""Background jobs: one training (or tagging, preparing) run at a time, polled by the UI and API.

A JobManager owns one worker thread. Requests made while a job runs are queued in order (state
`queued`) rather than refused, so the UI and API can both fire and poll; beyond `max_queued`
waiting jobs a request is refused with JobQueueFullError. A training job holds the host's GPU lock
for the whole run, gets the model from the host and always gives it back, mirrors every
ProgressEvent to the host, turns the host's Interrupt into a graceful stop, and finally publishes
the LoRA into the host's Lora folder under a fresh name with its `.json` and `.preview.png`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import LoraTrainerError
from .host import checkpoint_family
from .job_record import (  # noqa: F401  (Job, its states and errors: imported from here by the UI, API, tests)
    FINAL_STATES,
    KEEP_FINISHED,
    STATES,
    Job,
    JobError,
    JobQueueFullError,
    UnknownJobError,
    read_records,
    write_record,
)
from .paths import validate_lora_name
from .publish import PREFERRED_WEIGHT, activation_text, engine_sd_version, publish_run, user_metadata  # noqa: F401

log = logging.getLogger(__name__)

Runner = Callable[..., Any]  # run_training(config, *, bundle, on_event, stop) -> TrainResult


class JobManager:
    def __init__(self, host: Any, *, work_dir: str | Path | None = None, runner: Runner | None = None,
                 max_queued: int = 8, poll_interval: float = 0.5) -> None:
        self.host = host
        self.work_dir = Path(work_dir) if work_dir else Path(host.lora_dir()).parent / "lora_trainer_runs"
        self._runner = runner
        self.max_queued = max_queued
        self.poll_interval = poll_interval
        self._jobs: dict[str, Job] = {}
        self._queue: deque[Job] = deque()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._current: Job | None = None
        self._worker: threading.Thread | None = None
        self._closed = False
        self._restore()

    # ------------------------------------------------------------------ requests
    def submit_train(self, config: Any, *, lora_subdir: str = "", label: str | None = None) -> Job:
        """Queue a training run of `config` (a TrainConfig) on the host's model."""
        validate_lora_name(config.name)
        job = self._new_job("train", label or f"train {config.name}")
        job.config = config
        job.lora_subdir = lora_subdir or ""
        job.resumed_from = config.resume or None
        return self._enqueue(job)

    def submit(self, kind: str, fn: Callable[[Job], Any], *, label: str = "", gpu: bool = True) -> Job:
        """Queue `fn(job)` (tagging, preparing); its return value becomes `job.result`.

        gpu: hold the host's GPU lock while it runs (the tagger may use CUDA; preparing does not).
        """
        job = self._new_job(kind, label or kind)
        job._fn, job._gpu = fn, gpu
        return self._enqueue(job)

    def resume(self, job_id: str, **overrides: Any) -> Job:
        """A new training job that continues the stopped job `job_id` from its saved state."""
        with self._lock:  # check and queue in one go: two Resume clicks must not start two runs
            old = self.get(job_id)
            if old.kind != "train" or old.state != "stopped" or not old.state_dir:
                raise JobError(f"Job {job_id} cannot be resumed: only a stopped training run that saved its "
                               "state can; start a new run instead.")
            _check_not_resumed(old, self._jobs.values())
            if not Path(old.state_dir).is_dir():
                raise JobError(f"Job {job_id} cannot be resumed: its saved state {old.state_dir} is gone; "
                               "start a new run instead.")
            config = dataclasses.replace(old.config, resume=old.state_dir, **overrides)
            job = self.submit_train(config, lora_subdir=old.lora_subdir, label=f"resume {config.name}")
            # the curve and counters go on from where the stopped run was, not from 0
            job.loss_history = list(old.loss_history)
            job.step, job.total_steps, job.total_epochs = old.step, old.total_steps, old.total_epochs
            job.epoch = old.epoch
        return job

    def stop(self, job_id: str) -> Job:
        """Graceful stop: a running job finishes its step and saves; a queued job never starts."""
        with self._lock:
            job = self.get(job_id)
            if job.state == "queued":
                self._queue.remove(job)
                job.state_dir = job.resumed_from  # a resume that never ran leaves its run resumable
                self._finish(job, "stopped", message="Stopped before it started.")
            elif job.state == "running":
                job.stop_event.set()
                job.message = "Stopping after this step…"
            return job

    # ------------------------------------------------------------------ queries
    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJobError(f"There is no job {job_id!r}; it may have finished long ago "
                                  "or the server restarted. List jobs to see the current ones.")
        return job

    def snapshot(self, job_id: str) -> dict[str, Any]:
        """A consistent copy of the job's fields (the worker thread keeps changing them)."""
        with self._lock:
            return self.get(job_id).to_dict()

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def current(self) -> Job | None:
        return self._current

    def allowed_roots(self) -> list[Path] | None:
        """The host's allowed roots plus our own run folder (uploads and prepared datasets live there)."""
        roots = self.host.allowed_roots()
        return None if roots is None else [*roots, self.work_dir]

    def queued(self) -> list[Job]:
        with self._lock:
            return list(self._queue)

    def latest(self, kind: str | None = None) -> Job | None:
        with self._lock:
            for job in reversed(list(self._jobs.values())):
                if kind is None or job.kind == kind:
                    return job
        return None

    def active_train(self) -> Job | None:
        """The training run the user is waiting for: the running one, else the next queued one."""
        with self._lock:
            current = self._current
            if current is not None and current.kind == "train" and current.state not in FINAL_STATES:
                return current
            return next((j for j in self._queue if j.kind == "train"), None)

    def resumable(self) -> list[Job]:
        """Stopped training runs that can go on, newest first: per run folder (state dir), only its
        newest job counts (a resumed-and-finished run is done; a resumed-and-stopped one is newer)."""
        with self._lock:
            newest: dict[str, Job] = {}
            for job in self._jobs.values():
                run = job.state_dir or job.resumed_from  # a resumed run is the same run, saved or not
                if job.kind == "train" and run and job.state in ("done", "stopped"):  # a failed resume: try again
                    seen = newest.get(run)
                    if seen is None or job.created >= seen.created:
                        newest[run] = job
            active = [*self._queue, *([self._current] if self._current else [])]
            busy = {j.config.resume for j in active if j.kind == "train" and j.state not in FINAL_STATES
                    and j.config is not None and j.config.resume}
        return sorted((j for d, j in newest.items() if j.state == "stopped" and j.state_dir and d not in busy
                       and Path(j.state_dir).is_dir()), key=lambda j: j.created, reverse=True)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        job = self.get(job_id)
        job.done_event.wait(timeout)
        return job

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop whatever runs, drop the queue and end the worker thread."""
        with self._lock:
            self._closed = True
            for job in list(self._queue):
                job.state_dir = job.resumed_from  # a queued Resume stays resumable after the restart
                self._finish(job, "stopped", message="Stopped: the server is shutting down.")
            self._queue.clear()
            if self._current is not None:
                self._current.stop_event.set()
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    # ------------------------------------------------------------------ internals
    def _new_job(self, kind: str, label: str) -> Job:
        return Job(id=uuid.uuid4().hex[:12], kind=kind, label=label)

    def _enqueue(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise JobError("The job runner has shut down; restart the server to run jobs.")
            if len(self._queue) >= self.max_queued:
                raise JobQueueFullError(f"{len(self._queue)} jobs are already waiting; wait for them to "
                                        "finish or stop some before adding more.")
            self._jobs[job.id] = job
            self._queue.append(job)
            busy = self._current is not None or len(self._queue) > 1
            job.message = "Queued: waits for the running job to finish." if busy else "Starting…"
            self._forget_old()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="lora-trainer-jobs", daemon=True)
                self._worker.start()
            self._wake.notify_all()
        return job

    def _forget_old(self) -> None:
        done = [j for j in self._jobs.values() if j.state in FINAL_STATES]
        for job in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if self._closed and not self._queue:
                    return
                job = self._queue.popleft()
                self._current = job
                job.state, job.started = "running", time.time()
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: Job) -> None:
        try:
            if job.kind == "train":
                self._run_train(job)
            else:
                job.message = f"{job.label}…"
                if job._gpu:
                    with self.host.gpu_lock():
                        job.result = job._fn(job)
                else:
                    job.result = job._fn(job)
                summary = job.result.get("message") if isinstance(job.result, dict) else None
                self._finish(job, "done", message=summary or f"{job.label}: done.")
        except BaseException as e:  # every failure must end the job, not the worker
            error = _user_message(e, job)
            if job.saves:  # the engine's last save survives a later failure: say where it is
                error += f" The last good save is kept at {job.saves[-1]}."
            self._finish(job, "failed", error=error)
            if not isinstance(e, LoraTrainerError):
                log.exception("LoRA Trainer job %s (%s) failed", job.id, job.label)
            else:
                log.debug("job %s failed", job.id, exc_info=True)
            if not isinstance(e, Exception):  # KeyboardInterrupt/SystemExit: let them go on
                raise
        finally:
            gc.collect()
            _empty_cuda_cache()

    def _finish(self, job: Job, state: str, *, message: str = "", error: str | None = None) -> None:
        with self._lock:
            job.state, job.finished = state, time.time()
            job.error = error
            job.message = error or message or job.message
            job.eta_s = 0.0 if state == "done" else job.eta_s
            job.phase, job.phase_done, job.phase_total = "", 0, 0
            job._fn = None
        write_record(job)
        job.done_event.set()

    # ------------------------------------------------------------------ records across restarts
    def _restore(self) -> None:
        """Training jobs recorded by earlier sessions (`job_record.read_records`)."""
        for job in read_records(self.work_dir):
            if job.id not in self._jobs:
                self._jobs[job.id] = job

    # ------------------------------------------------------------------ training
    def _runner_fn(self) -> Runner:
        if self._runner is not None:
            return self._runner
        from .train import run_training  # heavy: torch/diffusers

        return run_training

    def _run_train(self, job: Job) -> None:
        config = job.config
        if not config.resume or not config.output_dir:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = self.work_dir / f"{validate_lora_name(config.name)}-{stamp}-{job.id[:4]}"
            config = dataclasses.replace(config, output_dir=str(run_dir))
            job.config = config
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        write_record(job)  # a run cut short by the process ending is found again after a restart
        runner = self._runner_fn()
        run_over = threading.Event()
        watcher = threading.Thread(target=self._watch_interrupt, args=(job, run_over), daemon=True,
                                   name=f"lora-trainer-watch-{job.id}")
        family = None
        job.message = "Waiting for the GPU (a generation may be running)…"
        with self.host.gpu_lock():
            if job.stop_event.is_set():  # stopped while it waited for the GPU: never load the model
                job.state_dir = job.resumed_from  # a resume that never ran leaves its run resumable
                self._finish(job, "stopped", message="Stopped before it started.")
                return
            job.message = "Loading the model…"
            bundle = self.host.acquire_model(config)
            job.notes = [str(n) for n in getattr(self.host, "last_notes", None) or []]  # e.g. "loading X from disk"
            if bundle is None:  # the engine loads the checkpoint itself (standalone hosts)
                config = job.config = self._with_model_file(config)
            try:
                family = getattr(getattr(bundle, "family", None), "label", None)
                job.family = family or (checkpoint_family(config.model) if config.model else None) or ""
                job.message = "Preparing the dataset and caches…"
                watcher.start()
                result = runner(config, bundle=bundle, on_event=lambda ev: self._on_event(job, ev),
                                stop=job.stop_event)
            finally:
                run_over.set()
                if bundle is not None:
                    self.host.release_model(bundle)
                del bundle
        if family is None:  # the engine loaded the model: its own user metadata names the family
            family = engine_sd_version(result)
        job.family = family or job.family
        job.result = result
        job.state_dir = str(result.state_dir) if getattr(result, "state_dir", None) else None
        job.samples = [str(p) for p in getattr(result, "samples", [])] or job.samples
        job.report = getattr(result, "report", None) or job.report
        stopped = bool(getattr(result, "stopped", False))
        if result.lora_path:
            self._publish(job, config, result, family)
        if stopped:
            where = f" at step {result.steps}" if getattr(result, "steps", None) else ""
            kept = f"; the LoRA so far is saved as {job.lora_name}" if job.lora_name else ""
            resumable = " and can be resumed" if job.state_dir else ""
            self._finish(job, "stopped", message=f"Stopped{where}{kept}{resumable}.")
        else:
            self._finish(job, "done", message=f"Done: {job.lora_name} is in the Lora folder.")

    def _with_model_file(self, config: Any) -> Any:
        model = config.model or str(getattr(self.host, "model", None) or "")
        if not model:
            from .errors import ConfigError

            raise ConfigError("No model to train on was given; pass --model with a checkpoint file "
                              "(or set \"model\" in the request).")
        return dataclasses.replace(config, model=model)

    def _watch_interrupt(self, job: Job, run_over: threading.Event) -> None:
        """Turn the host's Interrupt button into our graceful stop while the run lasts."""
        while not run_over.wait(self.poll_interval) and not job.stop_event.is_set():
            try:
                if self.host.interrupted():
                    job.message = "Interrupted: stopping after this step…"
                    job.stop_event.set()
                    return
            except Exception:  # a flaky host check must not end training
                log.debug("host.interrupted() failed", exc_info=True)

    def _on_event(self, job: Job, ev: Any) -> None:
        with self._lock:
            kind = getattr(ev, "kind", "")
            for name in ("step", "total_steps", "epoch", "total_epochs"):
                value = getattr(ev, name, None)
                if value:
                    setattr(job, name, int(value))
            for name in ("loss", "smoothed_loss", "lr", "it_per_s", "eta_s", "vram_bytes"):
                value = getattr(ev, name, None)
                if value is not None:
                    setattr(job, name, value)
            if getattr(ev, "phase", ""):
                job.phase, job.phase_done, job.phase_total = ev.phase, ev.phase_done, ev.phase_total
            plan = getattr(ev, "plan", None)
            if plan is not None:
                job.plan_text = plan.text() if hasattr(plan, "text") else str(plan)
                job.total_steps = getattr(plan, "total_steps", job.total_steps) or job.total_steps
                job.total_epochs = getattr(plan, "epochs", job.total_epochs) or job.total_epochs
            if kind == "step" and getattr(ev, "loss", None) is not None:
                while job.loss_history and job.loss_history[-1][0] >= job.step:  # resumed from an earlier save
                    job.loss_history.pop()
                job.loss_history.append((job.step, float(ev.loss),
                                         None if ev.smoothed_loss is None else float(ev.smoothed_loss)))
            paths = [str(p) for p in (getattr(ev, "paths", None) or [])]
            if getattr(ev, "path", None):
                paths.insert(0, str(ev.path))
            if kind == "validation" and getattr(ev, "report", None) is not None:
                job.report = ev.report
            if kind == "sample":
                job.samples.extend(p for p in paths if p not in job.samples)
            elif kind == "save":
                job.saves.extend(p for p in paths if p not in job.saves)
            if kind == "plan":
                job.message = f"Training {job.total_steps} steps…"
            elif getattr(ev, "message", "") and kind != "error":  # errors end up in job.error
                job.message = ev.message
            elif kind == "step" and job.total_steps:
                job.message = f"Training: step {job.step}/{job.total_steps}"
        try:
            self.host.report(ev)
        except Exception:  # the host's progress display must not end training
            log.debug("host.report failed", exc_info=True)
        try:
            if self.host.interrupted():
                job.stop_event.set()
        except Exception:
            log.debug("host.interrupted() failed", exc_info=True)

    # ------------------------------------------------------------------ publishing
    def _publish(self, job: Job, config: Any, result: Any, family: str | None) -> None:
        """Copy the run's LoRAs into the host's Lora folder (`publish.publish_run`)."""
        publish_run(self.host, job, config, result, family)


# ---------------------------------------------------------------------- helpers
def _check_not_resumed(old: Job, jobs: Any) -> None:
    """JobError when another job already continues `old`'s state: one waiting or running (a second
    Resume would train the same steps twice into the same folder), or a newer one that finished or
    stopped (the state folder now holds that run's progress: continue the newest instead)."""
    others = [j for j in jobs if j is not old and j.kind == "train" and j.resumed_from == old.state_dir]
    for other in others:
        if other.state in ("queued", "running"):
            raise JobError(f"Job {old.id} is already being resumed by job {other.id} ({other.state}); "
                           "follow that job instead of resuming again.")
    # a newer job stopped before it trained a step past ours (e.g. cancelled in the queue) holds no newer progress
    newer = [j for j in others if j.created > old.created
             and (j.state == "done" or (j.state == "stopped" and j.step > old.step))]
    if not newer:
        return
    newest = max(newer, key=lambda j: j.created)
    if newest.state == "done":
        raise JobError(f"Job {old.id} was already resumed by job {newest.id}, which finished; its LoRA is "
                       f"{newest.lora_name or 'in the Lora folder'}, start a new run to train more.")
    raise JobError(f"Job {old.id} was resumed by job {newest.id}, which stopped later; resume job "
                   f"{newest.id} instead (it holds the newer progress).")




def _user_message(e: BaseException, job: Job) -> str:
    if isinstance(e, LoraTrainerError):
        return str(e)
    if _is_oom(e):
        cfg = job.config
        what = (f" at resolution {cfg.resolution}, batch size {cfg.batch_size}"
                if cfg is not None and hasattr(cfg, "resolution") else "")
        return (f"The GPU ran out of memory{what}; pick a lower-VRAM preset, or lower batch_size or "
                "resolution, or turn on gradient_checkpointing, and close other programs using the GPU.")
    if isinstance(e, KeyboardInterrupt):
        return "Interrupted; start the job again."
    return (f"{job.label} failed with an unexpected error ({type(e).__name__}: {str(e)[:200]}); "
            "see the console log for details and report it if it happens again.")


def _is_oom(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "out of memory" in str(e).lower() or isinstance(e, MemoryError))


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort: freeing cache must never raise
        log.debug("empty_cache failed", exc_info=True)


_MANAGERS: dict[int, tuple[Any, JobManager]] = {}
_MANAGERS_LOCK = threading.Lock()


def manager_for(host: Any, **kwargs: Any) -> JobManager:
    """The one JobManager of `host` (so the UI and API of one WebUI share jobs)."""
    with _MANAGERS_LOCK:
        entry = _MANAGERS.get(id(host))
        if entry is None or entry[0] is not host:
            entry = (host, JobManager(host, **kwargs))
            _MANAGERS[id(host)] = entry
        return entry[1]
