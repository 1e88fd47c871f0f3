"""The tab's progress and results: every open page follows the active run (else the newest) by
polling about once a second (`live.Follower`; Gradio 4: a `gr.Timer` tick, Gradio 3: one generator
per open page), and a page that opens shows the followed run's settings in the form.
`handlers(ctx, tags)` gives the Gradio event functions; `tab.build_tab` wires them.
"""

# Handlers catch every exception on purpose: the tab shows the message (error_md), and
# logic.user_error logs the traceback of anything that is not a LoraTrainerError.

import html
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import gradio as gr

from ..config import PRESETS
from ..jobs import FINAL_STATES, JobManager
from . import live, logic, plan
from .tab_shared import TabContext, preset_label
from .texts import form_message

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between progress updates
# Gradio 3 notices a closed page only when its generator sends something: with nothing new for this many
# polls it sends an empty update, so a closed page's generator ends (and frees its queue worker) soon.
QUIET_POLLS = 5


def follow(jobs: JobManager, job_id: str) -> Iterator[dict[str, Any]]:
    """Snapshots of a tag/prepare job until it ends (the last one is final)."""
    job = jobs.get(job_id)
    while True:
        snap = jobs.snapshot(job_id)
        yield snap
        if snap["state"] in FINAL_STATES:
            return
        job.done_event.wait(WATCH_INTERVAL)

def job_status(snap: dict[str, Any]) -> str:
    if snap["state"] == "failed":
        return f"**Error:** {html.escape(form_message(snap['error'] or ''))}"
    done = f" ({snap['step']}/{snap['total_steps']})" if snap.get("total_steps") else ""
    return f"{snap['label']}: {snap['state']}{done} — {snap.get('message', '')}"


def handlers(ctx: TabContext, tags: SimpleNamespace) -> SimpleNamespace:
    """The progress/result event functions for one tab (`tags`: the pictures step's, to reload them)."""
    host, jobs, needs_model_file = ctx.host, ctx.jobs, ctx.needs_model_file
    load, _preset_label = tags.load, preset_label

    def _extra(sent):
        """The model line, polled too (the WebUI's checkpoint can change any time); its free-memory
        number changes only when it moved noticeably, so the line does not churn every second."""
        setup = plan.steady(plan.describe_setup(host), sent.get("model_free"))
        return {"model_info": plan.setup_md(setup), "model_free": setup.free}

    def _values(changed):
        """The poll's outputs: a changed value, or "leave it" for the rest."""
        def get(name, fn=lambda v: v):
            return fn(changed[name]) if name in changed else gr.update()
        runs = get("runs", lambda r: gr.update(choices=[label for label, _ in r],
                                               value=r[0][0] if r else None, visible=bool(r)))
        return (get("job_id"), get("progress"), get("loss_plot"), get("samples"), get("result"), get("send_text"),
                get("run_state"), runs, get("queued", lambda q: gr.update(visible=q)), get("model_info"))

    def poll_once(sent):
        """Gradio 4: one timer tick (about every second), for this page's State."""
        follower = live.Follower(jobs, dict(sent or {}))
        try:
            changed = follower.update(_extra(follower.sent))
        except Exception:
            log.debug("progress poll failed", exc_info=True)
            changed = {}
        return (*_values(changed), follower.sent)

    def poll_forever():
        """Gradio 3: one generator per open page (it ends when the page closes)."""
        follower = live.Follower(jobs)
        quiet = 0
        while True:
            try:
                changed = follower.update(_extra(follower.sent))
            except Exception:
                log.debug("progress poll failed", exc_info=True)
                changed = {}
            quiet = 0 if changed else quiet + 1
            if changed or quiet >= QUIET_POLLS:
                quiet = 0
                yield _values(changed)
            time.sleep(WATCH_INTERVAL)

    def restore_form():
        """Opening the page: the form shows the run the page follows (its settings, and the pictures and
        concept its dataset was prepared from), so a page reopened mid-run says what is training, and
        Resume or a new run starts from there."""
        job = live.followed(jobs)
        c = getattr(job, "config", None)
        if c is None:
            return (gr.update(),) * 20
        source, concept_name, concept_repeats = logic.dataset_origin(c.data)
        return (_preset_label(c.preset) if c.preset in PRESETS else gr.update(), c.name, c.data,
                c.model if needs_model_file and c.model else gr.update(), c.epochs, c.max_steps, c.rank, c.alpha,
                c.learning_rate, c.resolution, c.batch_size, c.seed, c.train_text_encoder,
                "\n".join(c.sample_prompts or []), c.sample_every_n_epochs or 1, job.lora_subdir, c.leak_check_dir,
                source or gr.update(), concept_name or gr.update(), concept_repeats or gr.update())

    def reload_pictures(folder, recursive, resolution, selected, text, mode):
        if not (folder or "").strip():
            return (gr.update(),) * 11
        return load(folder, recursive, resolution, selected, text, mode)

    def refresh(sent):
        follower = live.Follower(jobs, {})
        return (*_values(follower.update(_extra(follower.sent))), follower.sent)

    return SimpleNamespace(
        poll_once=poll_once, poll_forever=poll_forever,
        restore_form=restore_form, reload_pictures=reload_pictures, refresh=refresh,
    )
