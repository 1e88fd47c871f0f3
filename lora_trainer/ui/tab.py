"""The "Train LoRA" tab as Gradio Blocks (Gradio 3.41 and 4.x).

No `from __future__ import annotations` here: Gradio finds `gr.SelectData` parameters by their
real annotation objects. Long-running actions (tag, prepare, train) are generator handlers that
start a job and yield its progress until it ends; the job itself runs in the JobManager, so
closing the page never stops training, and "Refresh" re-attaches to the latest run.
"""

# Handlers catch every exception on purpose: the tab shows the message (logic.error_md), and
# logic.user_error logs the traceback of anything that is not a LoraTrainerError.
# ruff: noqa: BLE001

import json
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from .. import actions
from ..config import PRESETS, TrainConfig
from ..errors import ConfigError
from ..jobs import FINAL_STATES, JobManager, UnknownJobError, manager_for
from ..tagger.registry import MODELS
from . import compat, logic
from .settings import get_setting

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between progress updates while a job runs
PRESET_LABELS = {f"{p.label} ({key})": key for key, p in PRESETS.items()}
# Inside a WebUI, the adapters' javascript/ handles #lora_trainer_send_to_txt2img clicks; standalone
# there is no txt2img, so the button copies the prompt text instead.
COPY_JS = ("() => { const t = document.querySelector('#lora_trainer_send_text textarea');"
           " if (t && navigator.clipboard) navigator.clipboard.writeText(t.value); return []; }")


def _preset_label(key: str) -> str:
    for label, k in PRESET_LABELS.items():
        if k == key:
            return label
    return next(iter(PRESET_LABELS))


def _preset_info(key: str) -> str:
    p = PRESETS[key]
    return f"**{p.label}** — needs about {p.vram_gb} GB of GPU memory. {p.note}"


def _train_defaults(preset_key: str) -> TrainConfig:
    return TrainConfig().with_preset(preset_key)


def build_tab(host: Any, settings: dict | None = None, *, jobs: JobManager | None = None) -> gr.Blocks:
    """The tab for `host`; `settings` keyed as `ui.settings.SETTINGS` (missing keys use defaults)."""
    def opt(key):  # read when used: the WebUI's settings can change while it runs
        return get_setting(settings, key)

    jobs = jobs or manager_for(host)
    preset_key = opt("lora_trainer_default_preset")
    if preset_key not in PRESETS:
        preset_key = "sd15"
    base = _train_defaults(preset_key)
    in_webui = getattr(host, "name", "standalone") != "standalone"

    def roots():
        return jobs.allowed_roots()

    # ------------------------------------------------------------------ handlers
    def load(folder, recursive, resolution=512):
        try:
            scan = logic.scan_folder(folder, roots(), recursive=bool(recursive),
                                     resolution=int(resolution or 512))
        except Exception as e:  # shown in the tab, traceback in the log
            return (gr.update(), [], [], logic.error_md(e), [], [], "", "")
        freq = logic.tag_frequency_rows(scan["folder"], roots(), recursive=bool(recursive))
        return (scan["folder"], scan["gallery"], scan["problems"], scan["summary"], scan["images"], freq,
                "", "")

    load_outputs_count = 8

    def upload(files, recursive, resolution):
        try:
            dest = logic.save_uploads(compat.upload_paths(files), jobs.work_dir / "uploads")
        except Exception as e:
            return (gr.update(), [], [], logic.error_md(e), [], [], "", "")
        return load(str(dest), recursive, resolution)

    def select(images, evt: gr.SelectData):
        index = compat.selected_index(evt)
        if index is None or index >= len(images):
            return "", gr.update(value="", label="Caption")
        path = images[index]
        return path, gr.update(value=logic.read_caption_or_empty(path), label=f"Caption of {Path(path).name}")

    def save_caption(selected, text, folder, recursive):
        try:
            status = logic.save_caption(selected, text, roots())
            return status, logic.tag_frequency_rows(folder, roots(), recursive=bool(recursive))
        except Exception as e:
            return logic.error_md(e), gr.update()

    def bulk(folder, action, tag, new, recursive, resolution):
        try:
            status = logic.bulk_edit(folder, action, tag, new, roots(), recursive=bool(recursive))
        except Exception as e:
            return (logic.error_md(e),) + (gr.update(),) * load_outputs_count
        return (status,) + load(folder, recursive, resolution)

    def run_tag(folder, model, general, character, trigger, mode, exclude, recursive, resolution):
        try:
            job = actions.submit_tag(jobs, {
                "data": folder, "model": model or "", "general_threshold": general,
                "character_threshold": character, "trigger": trigger or "", "mode": mode,
                "exclude": exclude or "", "recursive": bool(recursive)},
                cache_dir=opt("lora_trainer_tagger_cache") or None)
        except Exception as e:
            yield (logic.error_md(e),) + (gr.update(),) * load_outputs_count
            return
        for snap in _follow(job.id):
            if snap["state"] not in FINAL_STATES:
                yield (_job_status(snap),) + (gr.update(),) * load_outputs_count
        yield (_job_status(snap),) + (load(folder, recursive, resolution) if snap["state"] == "done"
                                      else (gr.update(),) * load_outputs_count)

    def steps_info(images, repeats, epochs, batch):
        try:
            return logic.steps_text(len(images or []), int(repeats or 0), int(epochs or 1), int(batch or 1))
        except Exception as e:
            return logic.error_md(e)

    def run_prepare(folder, concept, repeats, class_images, class_name, out_dir, resolution):
        try:
            concept = (concept or "").strip()
            out = (out_dir or "").strip() or str(jobs.work_dir / "datasets" / (concept or "dataset"))
            params = {"source": folder, "out": out, "concept": concept,
                      "repeats": int(repeats) if repeats else None, "resolution": int(resolution or 512)}
            if (class_images or "").strip():
                params.update(class_images=class_images.strip(), class_name=(class_name or "").strip())
            job = actions.submit_prepare(jobs, params)
        except Exception as e:
            yield logic.error_md(e), gr.update()
            return
        for snap in _follow(job.id):
            if snap["state"] not in FINAL_STATES:
                yield _job_status(snap), gr.update()
        if snap["state"] == "done":
            result = snap["result"] or {}
            manifest = result.get("manifest") or {}
            counts = manifest.get("counts") or {}
            text = f"Prepared `{result.get('data', out)}`"
            if counts:
                text += f": {counts.get('usable', '?')} image(s), {counts.get('captioned', '?')} with captions"
            problems = manifest.get("problems") or {}
            if problems:
                text += f"; {len(problems)} file(s) skipped or flagged (see the Problems table above)"
            yield text + ". The dataset folder is filled in below.", result.get("data", out)
        else:
            yield _job_status(snap), gr.update()

    def apply_preset(label):
        key = PRESET_LABELS.get(label, preset_key)
        c = _train_defaults(key)
        return (_preset_info(key), c.rank, c.alpha, c.learning_rate, c.resolution, c.batch_size,
                c.train_text_encoder)

    def form_params(label, name, data, epochs, max_steps, rank, alpha, lr, resolution, batch, seed, train_te,
                    sample_prompt, sample_every, subdir, extra):
        params: dict = {
            "preset": PRESET_LABELS.get(label, preset_key), "name": (name or "").strip(), "data": data or "",
            "epochs": epochs, "max_steps": max_steps or 0, "rank": rank, "alpha": alpha, "learning_rate": lr,
            "resolution": resolution, "batch_size": batch, "seed": seed, "train_text_encoder": bool(train_te),
            "lora_subdir": (subdir or "").strip(),
        }
        prompts = [p.strip() for p in (sample_prompt or "").splitlines() if p.strip()]
        if prompts:
            params["sample_prompts"] = prompts
            params["sample_every_n_epochs"] = int(sample_every or 1)
        if (extra or "").strip():
            try:
                more = json.loads(extra)
            except ValueError as e:
                raise ConfigError(f"Extra settings are not valid JSON ({e}); write them like "
                                  '{"noise_offset": 0.05}.') from e
            if not isinstance(more, dict):
                raise ConfigError('Extra settings must be a JSON object; write them like {"noise_offset": 0.05}.')
            params.update(more)
        return params

    def check_plan(*form):
        try:
            from ..train import plan_training

            config, _ = actions.train_config_from_request(jobs, form_params(*form))
            return "```\n" + plan_training(config).text() + "\n```"
        except Exception as e:
            return logic.error_md(e)

    def start_train(*form):
        try:
            job = actions.submit_train(jobs, form_params(*form),
                                       defaults={"lora_subdir": opt("lora_trainer_output_subdir")})
        except Exception as e:
            yield _watch_error(e)
            return
        yield from _watch(job.id)

    def stop(job_id):
        job_id = job_id or _latest_train_id()
        if not job_id:
            return "Nothing is running."
        try:
            job = jobs.stop(job_id)
        except Exception as e:
            return logic.error_md(e)
        return "Stopping after the current step; the LoRA so far is saved." if job.state == "running" \
            else f"Job is {job.state}."

    def resume(job_id):
        try:
            job_id = job_id or _latest_train_id()
            if not job_id:
                raise ConfigError("There is no stopped run to resume; start a training run first.")
            job = jobs.resume(job_id)
        except Exception as e:
            yield _watch_error(e)
            return
        yield from _watch(job.id)

    def refresh(job_id):
        job_id = _latest_train_id() if not job_id or not _exists(job_id) else job_id
        if not job_id:
            yield (gr.update(), logic.progress_html(None), logic.loss_figure([]), [], "", "", "")
            return
        yield from _watch(job_id)

    # ------------------------------------------------------------------ job following
    def _exists(job_id):
        try:
            jobs.get(job_id)
            return True
        except UnknownJobError:
            return False

    def _latest_train_id():
        job = jobs.latest("train")
        return job.id if job else ""

    def _follow(job_id):
        """Snapshots of the job until it ends (the last one is final)."""
        job = jobs.get(job_id)
        while True:
            snap = jobs.snapshot(job_id)
            yield snap
            if snap["state"] in FINAL_STATES:
                return
            job.done_event.wait(WATCH_INTERVAL)

    def _job_status(snap):
        if snap["state"] == "failed":
            return f"**Error:** {snap['error']}"
        done = f" ({snap['step']}/{snap['total_steps']})" if snap.get("total_steps") else ""
        return f"{snap['label']}: {snap['state']}{done} — {snap.get('message', '')}"

    def _watch_error(e):
        return (gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), logic.error_md(e))

    def _watch(job_id):
        # Unchanged plots and galleries are sent again rather than as gr.update(): Gradio 4 streams
        # generator outputs as diffs, and a no-op update there can blank a Plot.
        seen_losses, seen_samples, plot, samples = -1, -1, None, []
        for snap in _follow(job_id):
            if len(snap["loss_history"]) != seen_losses:
                seen_losses = len(snap["loss_history"])
                plot = logic.loss_figure(snap["loss_history"])
            # The WebUI's A/B grid (no LoRA vs strengths, per epoch) comes first once it exists.
            shown = logic.ab_grids(snap.get("outputs", [])) + list(snap["samples"])
            if len(shown) != seen_samples:
                seen_samples = len(shown)
                samples = logic.sample_items(shown)
            status = f"**Error:** {snap['error']}" if snap["state"] == "failed" else ""
            yield (job_id, logic.progress_html(snap), plot, samples, logic.result_md(snap),
                   snap.get("prompt_text", ""), status)

    # ------------------------------------------------------------------ layout
    with gr.Blocks(analytics_enabled=False) as tab:
        images_state = gr.State([])
        selected_state = gr.State("")
        gr.Markdown("## Train a LoRA\nImages → captions → dataset → training → a LoRA in your Lora folder.",
                    elem_id="lora_trainer_header")
        if callable(getattr(host, "describe", None)):  # which WebUI this is and how it trains here (Forge hosts)
            gr.Markdown(host.describe(), elem_id="lora_trainer_host_info")

        with gr.Accordion("1. Images", open=True, elem_id="lora_trainer_images_section"):
            with gr.Row():
                folder = gr.Textbox(label="Image folder", placeholder="/path/to/your/images", scale=4,
                                    elem_id="lora_trainer_folder")
                recursive = gr.Checkbox(label="Include sub-folders", value=False, scale=1,
                                        elem_id="lora_trainer_recursive")
                load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="lora_trainer_load")
            upload_box = gr.File(label="…or upload images (and .txt captions)", file_count="multiple",
                                 height=110, elem_id="lora_trainer_upload")
            summary = gr.Markdown("", elem_id="lora_trainer_summary")
            gallery = gr.Gallery(label="Images and captions", columns=6, height=360, allow_preview=False,
                                 elem_id="lora_trainer_gallery")
            problems = gr.Dataframe(headers=["file", "problem"], datatype=["str", "str"], col_count=(2, "fixed"),
                                    interactive=False, label="Problems (skipped files and warnings)", wrap=True,
                                    height=180, elem_id="lora_trainer_problems")

        with gr.Accordion("2. Auto-tag (WD14)", open=False, elem_id="lora_trainer_tag_section"):
            with gr.Row():
                tagger_model = gr.Dropdown(choices=list(MODELS), value=opt("lora_trainer_tagger_model"),
                                           allow_custom_value=True, label="Tagger (name or folder)",
                                           elem_id="lora_trainer_tagger_model")
                tag_mode = gr.Radio(["append", "overwrite", "skip"], value="append", label="Existing captions",
                                    elem_id="lora_trainer_tag_mode")
            with gr.Row():
                general = gr.Slider(0.0, 1.0, value=0.35, step=0.01, label="General tag threshold",
                                    elem_id="lora_trainer_general_threshold")
                character = gr.Slider(0.0, 1.0, value=0.85, step=0.01, label="Character tag threshold",
                                      elem_id="lora_trainer_character_threshold")
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word (first tag of every caption)", placeholder="ohwx",
                                     elem_id="lora_trainer_trigger")
                exclude = gr.Textbox(label="Never write these tags (comma-separated)",
                                     elem_id="lora_trainer_exclude")
            tag_btn = gr.Button("Run tagger", variant="primary", elem_id="lora_trainer_tag_run")
            tag_status = gr.Markdown("", elem_id="lora_trainer_tag_status")

        with gr.Accordion("3. Captions", open=False, elem_id="lora_trainer_caption_section"), gr.Row():
            with gr.Column(scale=3):
                caption = gr.Textbox(label="Caption (click an image above)", lines=3,
                                     elem_id="lora_trainer_caption")
                save_caption_btn = gr.Button("Save caption", elem_id="lora_trainer_save_caption")
                gr.Markdown("**Edit every caption**")
                with gr.Row():
                    bulk_action = gr.Radio(["add", "add first", "remove", "replace"], value="add",
                                           label="Action", elem_id="lora_trainer_bulk_action")
                    bulk_tag = gr.Textbox(label="Tag", elem_id="lora_trainer_bulk_tag")
                    bulk_new = gr.Textbox(label="Replace with", elem_id="lora_trainer_bulk_new")
                bulk_btn = gr.Button("Apply to all captions", elem_id="lora_trainer_bulk_apply")
                caption_status = gr.Markdown("", elem_id="lora_trainer_caption_status")
            with gr.Column(scale=2):
                freq = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"],
                                    col_count=(2, "fixed"), interactive=False, label="Tag frequency",
                                    height=300, elem_id="lora_trainer_tag_freq")

        with gr.Accordion("4. Prepare the dataset", open=True, elem_id="lora_trainer_prepare_section"):
            with gr.Row():
                concept = gr.Textbox(label="Concept (trigger word and class, e.g. 'ohwx dog')",
                                     elem_id="lora_trainer_concept")
                repeats = gr.Number(value=0, precision=0, label="Repeats per image (0 = suggested)",
                                    elem_id="lora_trainer_repeats")
                prep_out = gr.Textbox(label="Dataset folder (empty = the trainer's run folder)",
                                      elem_id="lora_trainer_prepare_out")
            with gr.Row():
                class_images = gr.Textbox(label="Regularisation images folder (optional)",
                                          elem_id="lora_trainer_class_images")
                class_name = gr.Textbox(label="Their class (e.g. 'dog')", elem_id="lora_trainer_class_name")
            steps_md = gr.Markdown(logic.steps_text(0, 0, 1, 1), elem_id="lora_trainer_steps_info")
            prep_btn = gr.Button("Prepare dataset", variant="primary", elem_id="lora_trainer_prepare")
            prep_status = gr.Markdown("", elem_id="lora_trainer_prepare_status")

        with gr.Accordion("5. Train", open=True, elem_id="lora_trainer_train_section"):
            with gr.Row():
                preset = gr.Dropdown(choices=list(PRESET_LABELS), value=_preset_label(preset_key),
                                     label="Preset (GPU memory it needs)", elem_id="lora_trainer_preset")
                name = gr.Textbox(label="LoRA name", value="my-lora", elem_id="lora_trainer_name")
                data = gr.Textbox(label="Dataset folder (with img/)", elem_id="lora_trainer_data")
            preset_md = gr.Markdown(_preset_info(preset_key), elem_id="lora_trainer_preset_info")
            with gr.Row():
                epochs = gr.Number(value=base.epochs, precision=0, label="Epochs", elem_id="lora_trainer_epochs")
                max_steps = gr.Number(value=0, precision=0, label="Max steps (0 = by epochs)",
                                      elem_id="lora_trainer_max_steps")
                batch = gr.Number(value=base.batch_size, precision=0, label="Batch size",
                                  elem_id="lora_trainer_batch_size")
                resolution = gr.Number(value=base.resolution, precision=0, label="Resolution",
                                       elem_id="lora_trainer_resolution")
            with gr.Row():
                rank = gr.Number(value=base.rank, precision=0, label="Rank", elem_id="lora_trainer_rank")
                alpha = gr.Number(value=base.alpha, label="Alpha", elem_id="lora_trainer_alpha")
                lr = gr.Number(value=base.learning_rate, label="Learning rate", elem_id="lora_trainer_lr")
                seed = gr.Number(value=base.seed, precision=0, label="Seed", elem_id="lora_trainer_seed")
                train_te = gr.Checkbox(value=base.train_text_encoder, label="Train the text encoder",
                                       elem_id="lora_trainer_train_te")
            with gr.Accordion("Samples and advanced", open=False, elem_id="lora_trainer_advanced"):
                sample_prompt = gr.Textbox(label="Sample prompts (one per line; empty = no samples)", lines=2,
                                           elem_id="lora_trainer_sample_prompt")
                sample_every = gr.Number(value=1, precision=0, label="Sample every N epochs",
                                         elem_id="lora_trainer_sample_every")
                subdir = gr.Textbox(label="Sub-folder of the Lora folder",
                                    value=opt("lora_trainer_output_subdir"), elem_id="lora_trainer_subdir")
                extra = gr.Textbox(label='More settings as JSON (any TrainConfig field, e.g. {"noise_offset": 0.05})',
                                   lines=2, elem_id="lora_trainer_extra")
            with gr.Row():
                plan_btn = gr.Button("Check plan", elem_id="lora_trainer_plan")
                train_btn = gr.Button("Train", variant="primary", elem_id="lora_trainer_train")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="lora_trainer_stop")
                resume_btn = gr.Button("Resume", elem_id="lora_trainer_resume")
                refresh_btn = gr.Button("Refresh progress", elem_id="lora_trainer_refresh")
            plan_md = gr.Markdown("", elem_id="lora_trainer_plan_info")
            train_status = gr.Markdown("", elem_id="lora_trainer_train_status")

        with gr.Accordion("Progress", open=True, elem_id="lora_trainer_progress_section"):
            job_id = gr.Textbox(visible=False, elem_id="lora_trainer_job_id")
            progress = gr.HTML(logic.progress_html(None), elem_id="lora_trainer_progress")
            with gr.Row():
                loss_plot = gr.Plot(label="Loss", elem_id="lora_trainer_loss_plot")
                samples = gr.Gallery(label="Samples", columns=4, height=280, elem_id="lora_trainer_samples")
            result = gr.Markdown("", elem_id="lora_trainer_result")
            with gr.Row():
                send_text = gr.Textbox(visible=False, elem_id="lora_trainer_send_text")
                send_btn = gr.Button("Send to txt2img" if in_webui else "Copy prompt",
                                     elem_id="lora_trainer_send_to_txt2img")

        # ------------------------------------------------------------------ wiring
        load_outputs = [folder, gallery, problems, summary, images_state, freq, caption, selected_state]
        steps_inputs = [images_state, repeats, epochs, batch]
        load_btn.click(load, [folder, recursive, resolution], load_outputs).then(steps_info, steps_inputs, [steps_md])
        folder.submit(load, [folder, recursive, resolution], load_outputs).then(steps_info, steps_inputs, [steps_md])
        upload_box.upload(upload, [upload_box, recursive, resolution], load_outputs).then(steps_info, steps_inputs, [steps_md])
        gallery.select(select, [images_state], [selected_state, caption])
        save_caption_btn.click(save_caption, [selected_state, caption, folder, recursive], [caption_status, freq])
        bulk_btn.click(bulk, [folder, bulk_action, bulk_tag, bulk_new, recursive, resolution],
                       [caption_status, *load_outputs])
        tag_btn.click(run_tag, [folder, tagger_model, general, character, trigger, tag_mode, exclude, recursive,
                                resolution],
                      [tag_status, *load_outputs])
        for box in (repeats, epochs, batch):
            box.change(steps_info, steps_inputs, [steps_md])
        prep_btn.click(run_prepare, [folder, concept, repeats, class_images, class_name, prep_out, resolution],
                       [prep_status, data])
        preset.change(apply_preset, [preset], [preset_md, rank, alpha, lr, resolution, batch, train_te])
        form = [preset, name, data, epochs, max_steps, rank, alpha, lr, resolution, batch, seed, train_te,
                sample_prompt, sample_every, subdir, extra]
        watch_outputs = [job_id, progress, loss_plot, samples, result, send_text, train_status]
        plan_btn.click(check_plan, form, [plan_md])
        train_btn.click(start_train, form, watch_outputs)
        stop_btn.click(stop, [job_id], [train_status])
        resume_btn.click(resume, [job_id], watch_outputs)
        refresh_btn.click(refresh, [job_id], watch_outputs)
        if not in_webui:  # inside a WebUI its javascript/ inserts the text into the txt2img prompt
            send_btn.click(None, None, None, **compat.js_kwargs(COPY_JS))

    tab.lora_trainer_jobs = jobs  # for adapters and tests: the JobManager this tab uses
    return tab
