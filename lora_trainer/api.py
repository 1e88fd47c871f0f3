"""HTTP API under /lora-trainer/v1, mounted by the WebUI adapters or run by `python -m lora_trainer serve`.

Works on FastAPI 0.94 / pydantic 1 (A1111) and newer FastAPI / pydantic 2 (Forge, newest): the
bodies are plain JSON objects checked by `actions` (the same checks as the UI), so no pydantic
model has to be written twice. Every error is `{"detail": "<cause; remedy>"}` with a 4xx status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Dict  # noqa: UP035 - FastAPI 0.94 resolves Dict[str, Any] bodies reliably

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException

from . import __version__, actions
from .errors import LoraTrainerError
from .jobs import JobError, JobManager, JobQueueFullError, UnknownJobError, manager_for
from .paths import PathNotAllowedError

log = logging.getLogger(__name__)

PREFIX = "/lora-trainer/v1"


def _http_error(e: LoraTrainerError) -> HTTPException:
    if isinstance(e, UnknownJobError):
        status = 404
    elif isinstance(e, PathNotAllowedError):
        status = 403
    elif isinstance(e, (JobQueueFullError, JobError)):
        status = 409
    else:
        status = 400
    return HTTPException(status_code=status, detail=str(e))


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except LoraTrainerError as e:
        log.debug("API request refused", exc_info=True)
        raise _http_error(e) from None


def create_router(host: Any, jobs: JobManager, *, auth: Callable[..., Any] | None = None,
                  settings: dict[str, Any] | None = None) -> APIRouter:
    """The API routes; `auth` is a FastAPI dependency run before every route (A1111's --api-auth)."""
    from .ui.settings import get_setting  # plain data, no Gradio

    router = APIRouter(prefix=PREFIX, tags=["LoRA Trainer"],
                       dependencies=[Depends(auth)] if auth is not None else [])

    @router.get("/status")
    def status() -> Dict[str, Any]:  # noqa: UP006
        current = jobs.current()
        from .config import PRESETS

        return {
            "version": __version__,
            "host": getattr(host, "name", "unknown"),
            # Which WebUI flavour ("forge", "neo", "reforge", ... on Forge hosts, detected from its code) and
            # what training does there (markdown); None for hosts that do not say.
            "host_kind": getattr(getattr(host, "kind", None), "key", None),
            "host_description": host.describe() if callable(getattr(host, "describe", None)) else None,
            "lora_dir": str(host.lora_dir()),
            "model": str(getattr(host, "model", None) or "") or None,  # standalone --model; WebUI: its own
            "busy": current is not None,
            "current_job": jobs.snapshot(current.id) if current is not None else None,
            "queued": [j.id for j in jobs.queued()],
            "jobs": [{"id": j.id, "kind": j.kind, "label": j.label, "state": j.state} for j in jobs.jobs()],
            "presets": {k: {"label": p.label, "vram_gb": p.vram_gb, "note": p.note} for k, p in PRESETS.items()},
        }

    @router.post("/tag")
    def tag(body: Dict[str, Any] = Body(...)) -> Dict[str, Any]:  # noqa: UP006, B008
        job = _guard(lambda: actions.submit_tag(jobs, body,
                                                cache_dir=get_setting(settings, "lora_trainer_tagger_cache") or None))
        return {"job_id": job.id}

    @router.post("/prepare")
    def prepare(body: Dict[str, Any] = Body(...)) -> Dict[str, Any]:  # noqa: UP006, B008
        job = _guard(lambda: actions.submit_prepare(jobs, body))
        return {"job_id": job.id}

    @router.post("/train")
    def train(body: Dict[str, Any] = Body(...)) -> Dict[str, Any]:  # noqa: UP006, B008
        defaults = {"lora_subdir": get_setting(settings, "lora_trainer_output_subdir")}
        job = _guard(lambda: actions.submit_train(jobs, body, defaults=defaults))
        return {"job_id": job.id}

    @router.get("/jobs")
    def list_jobs() -> Dict[str, Any]:  # noqa: UP006
        return {"jobs": [jobs.snapshot(j.id) for j in jobs.jobs()]}

    @router.get("/jobs/{job_id}")
    def get_job(job_id: str, history: bool = True) -> Dict[str, Any]:  # noqa: UP006
        """The job's state; `?history=false` leaves out the per-step loss list (long runs, fast polls)."""
        snap = _guard(lambda: jobs.snapshot(job_id))
        if not history:
            snap.pop("loss_history", None)
        return snap

    @router.post("/jobs/{job_id}/stop")
    def stop_job(job_id: str) -> Dict[str, Any]:  # noqa: UP006
        _guard(lambda: jobs.stop(job_id))
        return _guard(lambda: jobs.snapshot(job_id))

    @router.post("/jobs/{job_id}/resume")
    def resume_job(job_id: str) -> Dict[str, Any]:  # noqa: UP006
        job = _guard(lambda: jobs.resume(job_id))
        return {"job_id": job.id}

    return router


def mount(app: FastAPI, host: Any, jobs: JobManager | None = None, *, auth: Callable[..., Any] | None = None,
          settings: dict[str, Any] | None = None) -> JobManager:
    """Add the routes to `app` (the WebUI's FastAPI app); returns the JobManager used."""
    jobs = jobs or manager_for(host)
    app.include_router(create_router(host, jobs, auth=auth, settings=settings))
    return jobs


def create_app(host: Any, jobs: JobManager | None = None, *, auth: Callable[..., Any] | None = None,
               settings: dict[str, Any] | None = None) -> FastAPI:
    """A FastAPI app with only our routes (the `serve` command, tests)."""
    app = FastAPI(title="LoRA Trainer", version=__version__)
    mount(app, host, jobs, auth=auth, settings=settings)
    return app
