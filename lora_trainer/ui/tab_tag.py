"""Steps 1 and 2 of the tab: the pictures (gallery, caption editor) and their captions (tagger, bulk
edits, tag frequency). `handlers(ctx)` gives the Gradio event functions; `tab.build_tab` wires them.

No `from __future__ import annotations` here: Gradio finds `gr.SelectData` parameters by their
real annotation objects.
"""

# Handlers catch every exception on purpose: the tab shows the message (error_md), and
# logic.user_error logs the traceback of anything that is not a LoraTrainerError.
# ruff: noqa: BLE001

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import actions
from ..jobs import FINAL_STATES
from ..paths import resolve_user_path
from . import captions as caphist
from . import compat, logic
from .tab_results import follow, job_status
from .tab_shared import TabContext, error_md


def handlers(ctx: TabContext) -> SimpleNamespace:
    """The pictures' and captions' event functions for one tab."""
    jobs, opt, roots = ctx.jobs, ctx.opt, ctx.roots
    _follow, _job_status = partial(follow, jobs), job_status

    def scan(folder, recursive, resolution, selected=""):
        """The outputs every (re)load gives: keeps the selected image when it is still there."""
        found = logic.scan_folder(folder, roots(), recursive=bool(recursive), resolution=int(resolution or 512))
        freq = logic.tag_frequency_rows(found["folder"], roots(), recursive=bool(recursive))
        keep = selected if selected in found["images"] else ""
        box = (gr.update(value=logic.read_caption_or_empty(keep), label=f"Caption of {Path(keep).name}") if keep
               else gr.update(value="", label="Caption (click a picture)"))
        preview = caphist.caption_state(jobs.work_dir, found["folder"], found["images"])
        return (found["folder"], found["gallery"], found["problems"], found["summary"], found["images"],
                {"skipped": found["skipped"], "sizes": found["sizes"]}, freq, box, keep, preview)

    load_outputs_count = 10

    def unchanged():
        return (gr.update(),) * load_outputs_count

    def _mode_md(state, mode):
        return caphist.mode_preview(state, mode) if state is not None else ""

    def load(folder, recursive, resolution, selected, text, mode):
        kept = _keep(selected, text).strip()
        try:
            out = scan(folder, recursive, resolution)
        except Exception as e:  # the summary says why; nothing of another folder stays on show
            return (kept, gr.update(), [], [], error_md(e), [], {}, [], gr.update(value="", label="Caption"), "",
                    gr.update())
        return (kept,) + out[:9] + (_mode_md(out[9], mode),)

    def upload(files, recursive, resolution, selected, text, mode):
        try:
            dest = logic.save_uploads(compat.upload_paths(files), jobs.work_dir / "uploads")
        except Exception as e:
            return ("", gr.update(), gr.update(), gr.update(), error_md(e)) + (gr.update(),) * 6
        return load(str(dest), recursive, resolution, selected, text, mode)

    def _keep(selected, text):
        """Save a pending caption edit before something replaces the caption box."""
        try:
            note = logic.keep_unsaved_caption(selected, text, roots())
        except Exception as e:
            return f" {error_md(e)}"
        return f" {note}" if note else ""

    def select(images, selected, text, evt: gr.SelectData):
        kept = _keep(selected, text).strip()
        index = compat.selected_index(evt)
        if index is None or index >= len(images):
            return "", gr.update(value="", label="Caption (click a picture)"), kept, gr.update()
        path = images[index]
        gallery = logic.gallery_items(images) if kept else gr.update()  # the kept edit shows under its picture
        return path, gr.update(value=logic.read_caption_or_empty(path), label=f"Caption of {Path(path).name}"), \
            kept, gallery

    def save_caption(selected, text, folder, recursive, images, mode):
        try:
            status = logic.save_caption(selected, text, roots())
            freq = logic.tag_frequency_rows(folder, roots(), recursive=bool(recursive))
            state = caphist.caption_state(jobs.work_dir, folder, images)
            return status, freq, logic.gallery_items(images), _mode_md(state, mode)
        except Exception as e:
            return error_md(e), gr.update(), gr.update(), gr.update()

    def bulk(folder, action, tag, new, recursive, resolution, selected, text, mode):
        kept = _keep(selected, text)
        try:
            status = logic.bulk_edit(folder, action, tag, new, roots(), recursive=bool(recursive))
            folder = str(resolve_user_path(folder, roots(), what="image folder"))
            if action == "remove" or action == "replace":
                caphist.record_bulk(jobs.work_dir, folder, removed=[tag.strip()],
                                    added=[new.strip()] if action == "replace" else [])
                status += f" The tagger will not write '{tag.strip()}' again in this folder."
            else:
                caphist.record_bulk(jobs.work_dir, folder, added=[tag.strip()])
            out = scan(folder, recursive, resolution, selected)
        except Exception as e:
            return (error_md(e),) + unchanged()
        return (status + kept,) + out[:9] + (_mode_md(out[9], mode),)

    def tag_preview(folder, images, mode):
        if not folder or not images:
            return caphist.mode_preview(caphist.CaptionState(0, 0, [], [], {}, []), mode)
        try:
            return _mode_md(caphist.caption_state(jobs.work_dir, folder, images), mode)
        except Exception as e:
            return error_md(e)

    def run_tag(folder, model, general, character, trigger, mode, exclude, recursive, resolution, selected, text,
                images):
        kept = _keep(selected, text)
        try:
            folder = str(resolve_user_path(folder, roots(), what="image folder"))
            state = caphist.caption_state(jobs.work_dir, folder, images or [])
            never = [t.strip() for t in (exclude or "").split(",") if t.strip()] + state.removed
            job = actions.submit_tag(jobs, {
                "data": folder, "model": model or "", "general_threshold": general,
                "character_threshold": character, "trigger": trigger or "",
                "mode": caphist.TAG_MODES.get(mode, "skip"), "exclude": never, "recursive": bool(recursive)},
                cache_dir=opt("lora_trainer_tagger_cache") or None, keep_out=state.keep_out)
        except Exception as e:
            yield (error_md(e),) + unchanged()
            return
        snap = None
        for snap in _follow(job.id):
            if snap["state"] not in FINAL_STATES:
                yield (_job_status(snap) + kept,) + unchanged()
        if snap["state"] != "done":
            yield (_job_status(snap) + kept,) + unchanged()
            return
        users = set(state.changed) | set(state.foreign) if caphist.TAG_MODES.get(mode) == "append" else set()
        caphist.record_tagging(jobs.work_dir, folder, (snap.get("result") or {}).get("captions") or {}, users=users)
        out = scan(folder, recursive, resolution, selected)
        yield (_job_status(snap) + kept,) + out[:9] + (_mode_md(out[9], mode),)

    def recheck_sizes(scanned, resolution):
        """Image-size warnings follow the training resolution (a 96 px picture is fine at 128 px)."""
        if not scanned:
            return gr.update()
        try:
            res = int(resolution or 512)
        except (TypeError, ValueError):
            return gr.update()
        return list(scanned.get("skipped") or []) + logic.size_problems(scanned.get("sizes") or {}, res)

    def sync_concept(trigger, concept, last):
        """The concept starts as the trigger word (typed once); a concept the user typed is theirs."""
        trigger = (trigger or "").strip()
        if not (concept or "").strip() or (concept or "").strip() == (last or "").strip():
            return trigger, trigger
        return gr.update(), last

    return SimpleNamespace(
        scan=scan, unchanged=unchanged, load=load, upload=upload,
        select=select, save_caption=save_caption, bulk=bulk, tag_preview=tag_preview, run_tag=run_tag,
        recheck_sizes=recheck_sizes, sync_concept=sync_concept, load_outputs_count=load_outputs_count,
    )
