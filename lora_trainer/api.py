"""HTTP API under /lora-trainer/v1, mounted by the WebUI adapters or run by `python -m lora_trainer serve`.

Works on FastAPI 0.94 / pydantic 1 (A1111) and newer FastAPI / pydantic 2 (Forge, newest): the
bodies are plain JSON objects checked by `actions` (the same checks as the UI), so no pydantic
model has to be written twice. Every error is `{"detail": "<cause; remedy>"}` with a 4xx status.
Bodies are read here, not by FastAPI, so that the limits hold on every version and every error
has that shape: a body over MAX_BODY_BYTES is answered 413 from its Content-Length, before it is
read; a JSON list longer than MAX_LIST_ITEMS (or a string longer than MAX_STRING_CHARS) gets 413
too; a body that is not a JSON object gets 422.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Dict  # noqa: UP035 - FastAPI 0.94 resolves Dict[str, Any] reliably

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from . import __version__, actions
from .errors import LoraTrainerError
from .jobs import JobError, JobManager, JobQueueFullError, UnknownJobError, manager_for
from .paths import PathNotAllowedError

log = logging.getLogger(__name__)

PREFIX = "/lora-trainer/v1"
MAX_BODY_BYTES = 1 << 20  # a request holds settings and paths, never file contents
MAX_LIST_ITEMS = 1000  # tags to exclude, sample prompts, ...
MAX_STRING_CHARS = 65_536
MAX_DEPTH = 8


def _too_large(detail: str) -> HTTPException:
    return HTTPException(status_code=413, detail=detail)


def _check_shape(value: Any, where: str = "the body", depth: int = 0) -> None:
    """413 for lists/strings beyond the limits anywhere in the parsed body."""
    if depth > MAX_DEPTH:
        raise _too_large(f"The request nests deeper than {MAX_DEPTH} levels at {where}; send flat settings.")
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise _too_large(f"The text in {where} is {len(value):,} characters long; at most "
                             f"{MAX_STRING_CHARS:,} are allowed.")
    elif isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            raise _too_large(f"The list in {where} has {len(value):,} items; at most {MAX_LIST_ITEMS:,} are "
                             "allowed, send fewer.")
        for item in value:
            _check_shape(item, where, depth + 1)
    elif isinstance(value, dict):
        if len(value) > MAX_LIST_ITEMS:
            raise _too_large(f"The request has {len(value):,} fields; at most {MAX_LIST_ITEMS:,} are allowed.")
        for key, item in value.items():
            _check_shape(key, "a field name", depth + 1)
            _check_shape(item, f"field {str(key)[:40]!r}", depth + 1)


async def read_json_object(request: Request, *, limit: int = MAX_BODY_BYTES) -> Dict[str, Any]:  # noqa: UP006
    """The request's JSON object body, within the limits above (HTTPException 413/422 otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(status_code=400, detail="The Content-Length header is not a number; "
                                "send a plain JSON body.") from None
        if size > limit:  # refused before a byte of it is read
            raise _too_large(f"The request body is {size:,} bytes; the limit is {limit:,} bytes. Send settings "
                             "and paths only (images are read from the folders you name).")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():  # chunked bodies: stop reading once over the limit
        received += len(chunk)
        if received > limit:
            raise _too_large(f"The request body is over the limit of {limit:,} bytes. Send settings and paths "
                             "only (images are read from the folders you name).")
        chunks.append(chunk)
    raw = b"".join(chunks)
    example = 'e.g. {"data": "/path/to/dataset", "name": "mylora"}'
    if not raw.strip():
        raise HTTPException(status_code=422, detail=f"The request has no body; send a JSON object, {example}.")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise HTTPException(status_code=422, detail="The request body is not UTF-8 text; send JSON encoded "
                            "as UTF-8.") from None
    except RecursionError:
        raise _too_large(f"The request nests deeper than {MAX_DEPTH} levels; send flat settings.") from None
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if hasattr(e, "lineno") else ""
        raise HTTPException(status_code=422, detail=f"The request body is not valid JSON{where}: "
                            f"{getattr(e, 'msg', e)}; send a JSON object, {example}.") from None
    if not isinstance(body, dict):
        kind = {list: "a list", type(None): "null", str: "a string", bool: "true/false"}.get(type(body), "a number")
        raise HTTPException(status_code=422, detail=f"The request body is {kind}, not a JSON object; "
                            f"send an object, {example}.")
    _check_shape(body)
    return body


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

    body_doc = {"openapi_extra": {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object"}}}}}}

    @router.post("/tag", **body_doc)
    async def tag(request: Request) -> Dict[str, Any]:  # noqa: UP006
        body = await read_json_object(request)
        cache_dir = get_setting(settings, "lora_trainer_tagger_cache") or None
        job = await run_in_threadpool(_guard, lambda: actions.submit_tag(jobs, body, cache_dir=cache_dir))
        return {"job_id": job.id}

    @router.post("/prepare", **body_doc)
    async def prepare(request: Request) -> Dict[str, Any]:  # noqa: UP006
        body = await read_json_object(request)
        job = await run_in_threadpool(_guard, lambda: actions.submit_prepare(jobs, body))
        return {"job_id": job.id}

    @router.post("/train", **body_doc)
    async def train(request: Request) -> Dict[str, Any]:  # noqa: UP006
        body = await read_json_object(request)
        defaults = {"lora_subdir": get_setting(settings, "lora_trainer_output_subdir")}
        job = await run_in_threadpool(_guard, lambda: actions.submit_train(jobs, body, defaults=defaults))
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
