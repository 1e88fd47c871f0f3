"""The "Train LoRA" tab as Gradio Blocks (Gradio 3.41 and 4.x).

No `from __future__ import annotations` here: Gradio finds `gr.SelectData` parameters by their
real annotation objects. The steps read top to bottom: 1 pictures (with the caption editor beside
them), 2 captions (tagger and bulk edits), 3 the prepared dataset, 4 training, then progress.

Runs live in the JobManager, not in the page: every page follows the run that is going (else the
newest), from the moment it opens, by polling about once a second (`live.Follower`; Gradio 4: a
`gr.Timer` tick per second, Gradio 3: one generator per open page that ends when the page closes).
Train and Resume while a run is active ask first (queue it, or cancel); Stop acts on the run shown.

This module lays the tab out and wires it; each step's event functions live in their own module:
`tab_tag` (1 pictures, 2 captions), `tab_prepare` (3), `tab_train` (4), `tab_results` (progress and
result), with what they share in `tab_shared`.
"""

from typing import Any

import gradio as gr

from ..config import PRESETS
from ..jobs import JobManager, manager_for
from ..tagger.registry import MODELS
from . import captions as caphist
from . import compat, live, logic, plan, tab_prepare, tab_results, tab_tag, tab_train
from .settings import get_setting
from .tab_results import QUIET_POLLS, WATCH_INTERVAL  # noqa: F401  (the tab's polling: tests patch them there)
from .tab_shared import PRESET_LABELS, TabContext, error_md  # noqa: F401  (error_md: the tab's error format)
from .tab_shared import preset_label as _preset_label
from .tab_shared import train_defaults as _train_defaults
from .texts import HELP

# The parts that update themselves about once a second must not grey out or flash while an update is
# on its way (Gradio marks every output of a running event). In the tab's own HTML, so it applies in
# the WebUIs (whose page-wide CSS is their own) and standalone alike.
_LIVE = [f"#lora_trainer_{n}" for n in ("progress", "run_state", "model_info", "result", "loss_plot", "samples",
                                        "runs", "cancel_queued")]
LIVE_CSS = (", ".join(f"{i}.pending, {i} .pending" for i in _LIVE)
            + " { opacity: 1 !important; animation: none !important; }"
            + ", ".join(f"{i}.generating, {i} .generating" for i in _LIVE)  # Gradio 3's running-event border
            + " { border-color: var(--block-border-color) !important; animation: none !important; }"
            + " #lora_trainer_live_css { display: none; }")
# Standalone there is no txt2img: "Copy prompt" copies the text, or (plain http beyond localhost has
# no clipboard API) selects the prompt in the result card so Ctrl+C copies it, and says which happened.
COPY_JS = """() => {
  const root = (document.querySelector('gradio-app') || {}).shadowRoot || document;
  const box = root.querySelector('#lora_trainer_send_text textarea, #lora_trainer_send_text input');
  const note = root.querySelector('#lora_trainer_copy_note');
  const say = (t) => { if (note) note.textContent = t; };
  const text = box ? box.value : '';
  if (!text) { say('Nothing to copy yet: the prompt appears when a run has saved a LoRA.'); return []; }
  const select = () => {
    const code = [...root.querySelectorAll('#lora_trainer_result code')].find((c) => c.textContent === text);
    if (!code) { say('Copy this prompt: ' + text); return; }
    const range = document.createRange(); range.selectNodeContents(code);
    const sel = window.getSelection(); sel.removeAllRanges(); sel.addRange(range);
    let ok = false; try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
    say(ok ? 'Copied: ' + text : 'The browser blocked copying here: the prompt is selected, press Ctrl+C.');
  };
  if (navigator.clipboard && window.isSecureContext) {
    // a clipboard write can stay pending (an unanswered permission prompt, an unfocused page): after 2 s
    // select the prompt instead, so the click always says something; a late success still says "Copied"
    let settled = false;
    const fallback = setTimeout(() => { if (!settled) { settled = true; select(); } }, 2000);
    navigator.clipboard.writeText(text).then(() => { settled = true; clearTimeout(fallback); say('Copied: ' + text); },
      () => { clearTimeout(fallback); if (!settled) { settled = true; select(); } });
  } else { select(); }
  return [];
}"""



def build_tab(host: Any, settings: dict | None = None, *, jobs: JobManager | None = None) -> gr.Blocks:
    """The tab for `host`; `settings` keyed as `ui.settings.SETTINGS` (missing keys use defaults)."""
    def opt(key):  # read when used: the WebUI's settings can change while it runs
        return get_setting(settings, key)

    jobs = jobs or manager_for(host)
    preset_key = opt("lora_trainer_default_preset")
    if preset_key not in PRESETS:
        preset_key = "sd15"
    base = _train_defaults(preset_key)
    standalone = getattr(host, "name", "standalone") == "standalone"
    needs_model_file = standalone and getattr(host, "_bundle_factory", None) is None
    setup = plan.describe_setup(host)
    ctx = TabContext(host, jobs, settings, preset_key, standalone, needs_model_file)
    preset_info = ctx.preset_info

    # ------------------------------------------------------------------ each step's event functions
    tags = tab_tag.handlers(ctx)
    load, upload, select, save_caption, bulk = tags.load, tags.upload, tags.select, tags.save_caption, tags.bulk
    tag_preview, run_tag, recheck_sizes, sync_concept = tags.tag_preview, tags.run_tag, tags.recheck_sizes, \
        tags.sync_concept
    prepare = tab_prepare.handlers(ctx)
    steps_info, run_prepare = prepare.steps_info, prepare.run_prepare
    training = tab_train.handlers(ctx, tags)
    apply_preset, check_plan, start_train, resume = training.apply_preset, training.check_plan, \
        training.start_train, training.resume
    confirm_queue, confirm_cancel, stop, cancel_queued = training.confirm_queue, training.confirm_cancel, \
        training.stop, training.cancel_queued
    results = tab_results.handlers(ctx, tags)
    poll_once, poll_forever, restore_form, reload_pictures, refresh = results.poll_once, results.poll_forever, \
        results.restore_form, results.reload_pictures, results.refresh

    # ------------------------------------------------------------------ layout
    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML(f"<style>{LIVE_CSS}</style>", visible=True, elem_id="lora_trainer_live_css")
        images_state = gr.State([])
        scan_state = gr.State({})
        selected_state = gr.State("")
        concept_auto = gr.State("")
        pending_state = gr.State("")
        sent_state = gr.State({})
        gr.Markdown("## Train a LoRA\n1 pictures → 2 captions → 3 dataset → 4 training → a LoRA in your Lora "
                    "folder. Hover or read the small text under each setting for what it does.",
                    elem_id="lora_trainer_header")
        if callable(getattr(host, "describe", None)):  # which WebUI this is and how it trains here (Forge hosts)
            gr.Markdown(host.describe(), elem_id="lora_trainer_host_info")
        model_info = gr.Markdown(plan.setup_md(setup), elem_id="lora_trainer_model_info")

        with gr.Accordion("1. Pictures", open=True, elem_id="lora_trainer_images_section"):
            with gr.Row():
                folder = gr.Textbox(label="Picture folder", placeholder="/path/to/your/pictures", scale=4,
                                    info=HELP["folder"], elem_id="lora_trainer_folder")
                recursive = gr.Checkbox(label="Include sub-folders", value=False, scale=1, info=HELP["recursive"],
                                        elem_id="lora_trainer_recursive")
                load_btn = gr.Button("Load", variant="primary", scale=1, elem_id="lora_trainer_load")
            upload_box = gr.File(label="…or upload pictures (and .txt captions)", file_count="multiple",
                                 height=110, elem_id="lora_trainer_upload")
            summary = gr.Markdown("", elem_id="lora_trainer_summary")
            with gr.Row():
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="Pictures (file name: caption) — click one to edit its caption",
                                         columns=5, height=420, allow_preview=False, elem_id="lora_trainer_gallery")
                with gr.Column(scale=2):
                    caption = gr.Textbox(label="Caption (click a picture)", lines=4, info=HELP["caption"],
                                         elem_id="lora_trainer_caption")
                    save_caption_btn = gr.Button("Save caption", elem_id="lora_trainer_save_caption")
                    caption_status = gr.Markdown("", elem_id="lora_trainer_caption_status")
            problems = gr.Dataframe(headers=["file", "problem"], datatype=["str", "str"], col_count=(2, "fixed"),
                                    interactive=False, label="Problems (skipped files, and pictures too small for "
                                    "the training resolution)", wrap=True, height=160, elem_id="lora_trainer_problems")

        with gr.Accordion("2. Captions", open=True, elem_id="lora_trainer_caption_section"):
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word", placeholder="ohwx", info=HELP["trigger"],
                                     elem_id="lora_trainer_trigger")
                tagger_model = gr.Dropdown(choices=list(MODELS), value=opt("lora_trainer_tagger_model"),
                                           allow_custom_value=True, label="Tagger (name or folder)",
                                           info=HELP["tagger_model"], elem_id="lora_trainer_tagger_model")
            with gr.Row():
                general = gr.Slider(0.0, 1.0, value=0.35, step=0.01, label="General tag threshold",
                                    info=HELP["general_threshold"], elem_id="lora_trainer_general_threshold")
                character = gr.Slider(0.0, 1.0, value=0.85, step=0.01, label="Character tag threshold",
                                      info=HELP["character_threshold"], elem_id="lora_trainer_character_threshold")
            exclude = gr.Textbox(label="Never write these tags (comma-separated)", info=HELP["exclude"],
                                 elem_id="lora_trainer_exclude")
            tag_mode = gr.Radio(list(caphist.TAG_MODES), value=caphist.DEFAULT_TAG_MODE,
                                label="Pictures that already have a caption", info=HELP["tag_mode"],
                                elem_id="lora_trainer_tag_mode")
            tag_preview_md = gr.Markdown(tag_preview("", [], caphist.DEFAULT_TAG_MODE),
                                         elem_id="lora_trainer_tag_preview")
            tag_btn = gr.Button("Run tagger", variant="primary", elem_id="lora_trainer_tag_run")
            tag_status = gr.Markdown("", elem_id="lora_trainer_tag_status")
            with gr.Row():
                with gr.Column(scale=3):
                    gr.Markdown("**Edit every caption**")
                    with gr.Row():
                        bulk_action = gr.Radio(["add", "add first", "remove", "replace"], value="add",
                                               label="Action", info=HELP["bulk_action"],
                                               elem_id="lora_trainer_bulk_action")
                        bulk_tag = gr.Textbox(label="Tag", info=HELP["bulk_tag"], elem_id="lora_trainer_bulk_tag")
                        bulk_new = gr.Textbox(label="Replace with", info=HELP["bulk_new"],
                                              elem_id="lora_trainer_bulk_new")
                    bulk_btn = gr.Button("Apply to all captions", elem_id="lora_trainer_bulk_apply")
                    bulk_status = gr.Markdown("", elem_id="lora_trainer_bulk_status")
                with gr.Column(scale=2):
                    freq = gr.Dataframe(headers=["tag", "pictures"], datatype=["str", "number"],
                                        col_count=(2, "fixed"), interactive=False, label="Tag frequency",
                                        height=260, elem_id="lora_trainer_tag_freq")

        with gr.Accordion("3. Prepare the dataset", open=True, elem_id="lora_trainer_prepare_section"):
            with gr.Row():
                concept = gr.Textbox(label="Concept", placeholder="ohwx dog", info=HELP["concept"],
                                     elem_id="lora_trainer_concept")
                repeats = gr.Number(value=0, precision=0, label="Repeats per picture (0 = suggested)",
                                    info=HELP["repeats"], elem_id="lora_trainer_repeats")
            with gr.Row():
                class_images = gr.Textbox(label="Generic pictures of the class (optional)",
                                          info=HELP["class_images"], elem_id="lora_trainer_class_images")
                class_name = gr.Textbox(label="Their class", placeholder="dog", info=HELP["class_name"],
                                        elem_id="lora_trainer_class_name")
                prep_out = gr.Textbox(label="Save the prepared copy in (optional)", info=HELP["prepare_out"],
                                      elem_id="lora_trainer_prepare_out")
            steps_md = gr.Markdown(logic.steps_text(0, 0, 1, 1), elem_id="lora_trainer_steps_info")
            prep_btn = gr.Button("Prepare dataset", variant="primary", elem_id="lora_trainer_prepare")
            prep_status = gr.Markdown("", elem_id="lora_trainer_prepare_status")

        with gr.Accordion("4. Train", open=True, elem_id="lora_trainer_train_section"):
            with gr.Row():
                preset = gr.Dropdown(choices=list(PRESET_LABELS), value=_preset_label(preset_key),
                                     label="Preset (GPU memory it needs)", info=HELP["preset"],
                                     elem_id="lora_trainer_preset")
                name = gr.Textbox(label="LoRA name", value="my-lora", info=HELP["name"], elem_id="lora_trainer_name")
                data = gr.Textbox(label="Training data (filled in by step 3)", info=HELP["data"],
                                  elem_id="lora_trainer_data")
            model_file = gr.Textbox(label="Checkpoint file", value=str(getattr(host, "model", None) or ""),
                                    info=HELP["model_file"], visible=needs_model_file,
                                    elem_id="lora_trainer_model_file")
            leak_check = gr.Textbox(label="Leak-check folder (optional)", placeholder="/path/to/other/subjects",
                                    info=HELP["leak_check"], elem_id="lora_trainer_leak_check")
            preset_md = gr.Markdown(preset_info(preset_key, setup.family), elem_id="lora_trainer_preset_info")
            with gr.Row():
                epochs = gr.Number(value=base.epochs, precision=0, label="Epochs", info=HELP["epochs"],
                                   elem_id="lora_trainer_epochs")
                max_steps = gr.Number(value=0, precision=0, label="Max steps (0 = by epochs)", info=HELP["max_steps"],
                                      elem_id="lora_trainer_max_steps")
                batch = gr.Number(value=base.batch_size, precision=0, label="Batch size", info=HELP["batch_size"],
                                  elem_id="lora_trainer_batch_size")
                resolution = gr.Number(value=base.resolution, precision=0, label="Resolution",
                                       info=HELP["resolution"], elem_id="lora_trainer_resolution")
            with gr.Row():
                rank = gr.Number(value=base.rank, precision=0, label="Rank", info=HELP["rank"],
                                 elem_id="lora_trainer_rank")
                alpha = gr.Number(value=base.alpha, label="Alpha", info=HELP["alpha"], elem_id="lora_trainer_alpha")
                lr = gr.Number(value=base.learning_rate, label="Learning rate", info=HELP["learning_rate"],
                               elem_id="lora_trainer_lr")
                seed = gr.Number(value=base.seed, precision=0, label="Seed", info=HELP["seed"],
                                 elem_id="lora_trainer_seed")
                train_te = gr.Checkbox(value=base.train_text_encoder, label="Train the text encoder",
                                       info=HELP["train_te"], elem_id="lora_trainer_train_te")
            with gr.Accordion("Samples and advanced", open=False, elem_id="lora_trainer_advanced"):
                sample_prompt = gr.Textbox(label="Sample prompts (one per line; empty = no samples)", lines=2,
                                           info=HELP["sample_prompts"], elem_id="lora_trainer_sample_prompt")
                sample_every = gr.Number(value=1, precision=0, label="Sample every N epochs", info=HELP["sample_every"],
                                         elem_id="lora_trainer_sample_every")
                subdir = gr.Textbox(label="Sub-folder of the Lora folder", value=opt("lora_trainer_output_subdir"),
                                    info=HELP["subdir"], elem_id="lora_trainer_subdir")
                extra = gr.Textbox(label="More settings (JSON)", lines=2, info=HELP["extra"],
                                   elem_id="lora_trainer_extra")
            with gr.Row():
                plan_btn = gr.Button("Check plan", elem_id="lora_trainer_plan")
                train_btn = gr.Button("Train", variant="primary", elem_id="lora_trainer_train")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="lora_trainer_stop")
                resume_btn = gr.Button("Resume", elem_id="lora_trainer_resume")
                refresh_btn = gr.Button("Refresh progress", elem_id="lora_trainer_refresh")
            run_state = gr.Markdown(live.run_state_md(jobs), elem_id="lora_trainer_run_state")
            with gr.Row(visible=False, elem_id="lora_trainer_confirm") as confirm_row:
                confirm_md = gr.Markdown("", elem_id="lora_trainer_confirm_text")
                queue_btn = gr.Button("Queue it", variant="primary", elem_id="lora_trainer_queue_yes")
                cancel_btn = gr.Button("Cancel", elem_id="lora_trainer_queue_no")
            with gr.Row():
                initial_runs = [label for label, _ in live.runs_choices(jobs)]
                runs = gr.Dropdown(choices=initial_runs, value=initial_runs[0] if initial_runs else None,
                                   label="Stopped runs (Resume continues the one chosen here)", info=HELP["runs"],
                                   visible=bool(initial_runs), elem_id="lora_trainer_runs")
                cancel_queued_btn = gr.Button("Cancel queued", visible=bool(
                    [j for j in jobs.queued() if j.kind == "train"]), elem_id="lora_trainer_cancel_queued")
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
                send_btn = gr.Button("Send to txt2img" if not standalone else "Copy prompt",
                                     elem_id="lora_trainer_send_to_txt2img")
                gr.HTML("<span id='lora_trainer_copy_note'></span>", elem_id="lora_trainer_copy_note_box")

        # ------------------------------------------------------------------ wiring
        load_outputs = [folder, gallery, problems, summary, images_state, scan_state, freq, caption, selected_state,
                        tag_preview_md]
        steps_inputs = [images_state, repeats, epochs, batch, max_steps]
        pending_in = [selected_state, caption, tag_mode]
        load_btn.click(load, [folder, recursive, resolution, *pending_in], [caption_status, *load_outputs]
                       ).then(steps_info, steps_inputs, [steps_md])
        folder.submit(load, [folder, recursive, resolution, *pending_in], [caption_status, *load_outputs]
                      ).then(steps_info, steps_inputs, [steps_md])
        upload_box.upload(upload, [upload_box, recursive, resolution, *pending_in], [caption_status, *load_outputs]
                          ).then(steps_info, steps_inputs, [steps_md])
        gallery.select(select, [images_state, selected_state, caption],
                       [selected_state, caption, caption_status, gallery])
        save_caption_btn.click(save_caption, [selected_state, caption, folder, recursive, images_state, tag_mode],
                               [caption_status, freq, gallery, tag_preview_md])
        bulk_btn.click(bulk, [folder, bulk_action, bulk_tag, bulk_new, recursive, resolution, *pending_in],
                       [bulk_status, *load_outputs])
        tag_mode.change(tag_preview, [folder, images_state, tag_mode], [tag_preview_md])
        tag_btn.click(run_tag, [folder, tagger_model, general, character, trigger, tag_mode, exclude, recursive,
                                resolution, selected_state, caption, images_state],
                      [tag_status, *load_outputs])
        trigger.change(sync_concept, [trigger, concept, concept_auto], [concept, concept_auto])
        for box in (repeats, epochs, batch, max_steps):
            box.change(steps_info, steps_inputs, [steps_md])
        resolution.change(recheck_sizes, [scan_state, resolution], [problems])
        prep_btn.click(run_prepare, [folder, concept, repeats, class_images, class_name, prep_out, resolution],
                       [prep_status, data]
                       ).then(logic.outdated_errors, [prep_status, plan_md, train_status], [plan_md, train_status])
        preset.input(apply_preset, [preset, scan_state],  # the user's choice; restoring the form sets it too
                      [preset_md, rank, alpha, lr, resolution, batch, train_te, problems])
        form = [preset, name, data, model_file, epochs, max_steps, rank, alpha, lr, resolution, batch, seed, train_te,
                sample_prompt, sample_every, subdir, extra, leak_check]
        ask_outputs = [train_status, confirm_md, confirm_row, pending_state]
        plan_btn.click(check_plan, form, [plan_md]).then(logic.outdated_errors, [plan_md, train_status], [train_status])
        for started in (train_btn.click(start_train, form, ask_outputs), resume_btn.click(resume, [runs], ask_outputs),
                        queue_btn.click(confirm_queue, [pending_state, *form], [train_status, confirm_row,
                                                                                pending_state])):
            started.then(logic.outdated_errors, [train_status, plan_md], [plan_md])
        cancel_btn.click(confirm_cancel, [pending_state], [train_status, confirm_row, pending_state])
        stop_btn.click(stop, [job_id], [train_status])
        cancel_queued_btn.click(cancel_queued, None, [train_status])
        watch_outputs = [job_id, progress, loss_plot, samples, result, send_text, run_state, runs, cancel_queued_btn,
                         model_info]
        refresh_btn.click(refresh, [sent_state], [*watch_outputs, sent_state])
        tab.load(restore_form, None, [*form[:15], subdir, leak_check, folder, concept, repeats], show_progress="hidden"
                 ).then(reload_pictures, [folder, recursive, resolution, *pending_in], [caption_status, *load_outputs]
                        ).then(steps_info, steps_inputs, [steps_md])
        if compat.GRADIO_MAJOR >= 4:  # a timer tick per second; the first one right at load
            tab.load(poll_once, [sent_state], [*watch_outputs, sent_state], show_progress="hidden")
            tab.load(poll_once, [sent_state], [*watch_outputs, sent_state], every=WATCH_INTERVAL)
        else:  # one generator per open page; Gradio 3 ends it when the page goes
            tab.load(poll_forever, None, watch_outputs, show_progress="hidden")
        if standalone:  # inside a WebUI its javascript/ inserts the text into the txt2img prompt
            send_btn.click(None, None, None, **compat.js_kwargs(COPY_JS))

    tab.lora_trainer_jobs = jobs  # for adapters and tests: the JobManager this tab uses
    return tab
