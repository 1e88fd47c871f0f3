"""The "Train LoRA" tab as Gradio Blocks (Gradio 3.41 and 4.x).

No `from __future__ import annotations` here: Gradio finds `gr.SelectData` parameters by their
real annotation objects. The steps read top to bottom: 1 pictures (with the caption editor beside
them), 2 captions (tagger and bulk edits), 3 the prepared dataset, 4 training, then progress.

Runs live in the JobManager, not in the page: every page follows the run that is going (else the
newest), from the moment it opens, by polling about once a second (`live.Follower`; Gradio 4: a
`gr.Timer` tick per second, Gradio 3: one generator per open page that ends when the page closes).
Train and Resume while a run is active ask first (queue it, or cancel); Stop acts on the run shown.
"""

# Handlers catch every exception on purpose: the tab shows the message (error_md), and
# logic.user_error logs the traceback of anything that is not a LoraTrainerError.
# ruff: noqa: BLE001

import html
import json
import logging
import time
from pathlib import Path
from typing import Any

import gradio as gr

from .. import actions
from ..config import PRESETS, TrainConfig
from ..errors import ConfigError
from ..jobs import FINAL_STATES, JobManager, UnknownJobError, manager_for
from ..paths import resolve_user_path
from ..tagger.registry import MODELS
from . import captions as caphist
from . import compat, live, logic, plan
from .settings import get_setting
from .texts import HELP, check_extra_keys, form_message

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between progress updates
# Gradio 3 notices a closed page only when its generator sends something: with nothing new for this many
# polls it sends an empty update, so a closed page's generator ends (and frees its queue worker) soon.
QUIET_POLLS = 5
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
PRESET_LABELS = {f"{p.label} ({key})": key for key, p in PRESETS.items()}
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
    navigator.clipboard.writeText(text).then(() => say('Copied: ' + text), select);
  } else { select(); }
  return [];
}"""


def _preset_label(key: str) -> str:
    for label, k in PRESET_LABELS.items():
        if k == key:
            return label
    return next(iter(PRESET_LABELS))


def _train_defaults(preset_key: str) -> TrainConfig:
    return TrainConfig().with_preset(preset_key)


def error_md(e: BaseException) -> str:
    """An error for the form: our message in the form's words (a field's label, not its flag)."""
    return f"**Error:** {html.escape(form_message(logic.user_error(e))).replace('&#x27;', chr(39))}"


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

    def roots():
        return jobs.allowed_roots()

    def preset_info(key, family=None):
        p = PRESETS[key]
        text = f"**{p.label}** — needs about {p.vram_gb} GB of GPU memory. {p.note}"
        warning = plan.preset_warning(key, family)
        return text + (f"\n\n{warning}" if warning else "")

    # ------------------------------------------------------------------ images and captions
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

    # ------------------------------------------------------------------ prepare
    def steps_info(images, repeats, epochs, batch, max_steps):
        try:
            text = logic.steps_text(len(images or []), int(repeats or 0), int(epochs or 1), int(batch or 1))
            if int(max_steps or 0) > 0 and images:
                text += f" Max steps is set: training stops after {int(max_steps)} steps."
            return text
        except Exception as e:
            return error_md(e)

    def run_prepare(folder, concept, repeats, class_images, class_name, out_dir, resolution):
        try:
            concept = (concept or "").strip()
            if not (folder or "").strip():
                raise ConfigError("No picture folder is loaded; load your pictures in step 1 first.")
            if not concept:
                raise ConfigError("The concept is empty; type it in **Concept** (usually your trigger word, "
                                  "e.g. 'ohwx dog').")
            if (class_images or "").strip() and not (class_name or "").strip():
                raise ConfigError("Generic pictures are given without their class; type it in **Their class** "
                                  "(e.g. 'dog').")
            out = (out_dir or "").strip() or str(jobs.work_dir / "datasets" / concept)
            params = {"source": folder, "out": out, "concept": concept,
                      "repeats": int(repeats) if repeats else None, "resolution": int(resolution or 512)}
            if (class_images or "").strip():
                params.update(class_images=class_images.strip(), class_name=class_name.strip())
            job = actions.submit_prepare(jobs, params)
        except Exception as e:
            yield error_md(e), gr.update()
            return
        snap = None
        for snap in _follow(job.id):
            if snap["state"] not in FINAL_STATES:
                yield _job_status(snap), gr.update()
        if snap["state"] != "done":
            yield _job_status(snap), gr.update()
            return
        result = snap["result"] or {}
        manifest = result.get("manifest") or {}
        counts = manifest.get("counts") or {}
        subsets = [s for s in manifest.get("subsets") or [] if s.get("kind") == "img"]
        used_repeats = int(subsets[0].get("repeats") or 1) if subsets else int(repeats or 1)
        text = f"Prepared `{result.get('data', out)}`"
        if counts:
            text += f": {counts.get('usable', '?')} picture(s), {counts.get('captioned', '?')} with captions"
        other = [k for k, v in (manifest.get("problems") or {}).items()
                 if any("small image" not in str(x) for x in v)]
        if other:
            text += f"; {len(other)} file(s) converted, renamed or skipped (listed in dataset.json)"
        yield (f"{text} ({used_repeats} repeats per picture). **Training data** in step 4 is filled in.",
               result.get("data", out))

    # ------------------------------------------------------------------ training
    def apply_preset(label, scanned):
        key = PRESET_LABELS.get(label, preset_key)
        c = _train_defaults(key)
        family = plan.describe_setup(host).family
        return (preset_info(key, family), c.rank, c.alpha, c.learning_rate, c.resolution, c.batch_size,
                c.train_text_encoder, recheck_sizes(scanned, c.resolution))

    def form_params(label, name, data, model_file, epochs, max_steps, rank, alpha, lr, resolution, batch, seed,
                    train_te, sample_prompt, sample_every, subdir, extra):
        if not (data or "").strip():
            raise ConfigError("**Training data** is empty; prepare the dataset in step 3 (it fills it in), or "
                              "type the folder that holds img/.")
        params: dict = {
            "preset": PRESET_LABELS.get(label, preset_key), "name": (name or "").strip(), "data": data or "",
            "epochs": epochs, "max_steps": max_steps or 0, "rank": rank, "alpha": alpha, "learning_rate": lr,
            "resolution": resolution, "batch_size": batch, "seed": seed, "train_text_encoder": bool(train_te),
            "lora_subdir": (subdir or "").strip(),
        }
        if needs_model_file:
            if not (model_file or "").strip():
                raise ConfigError("No model to train on; type a checkpoint (.safetensors) in **Checkpoint file**.")
            params["model"] = model_file.strip()
        prompts = [p.strip() for p in (sample_prompt or "").splitlines() if p.strip()]
        if prompts:
            params["sample_prompts"] = prompts
            params["sample_every_n_epochs"] = int(sample_every or 1)
        if (extra or "").strip():
            try:
                more = json.loads(extra)
            except ValueError as e:
                raise ConfigError(f"More settings is not valid JSON ({e}); write it like "
                                  '{"noise_offset": 0.05}.') from e
            if not isinstance(more, dict):
                raise ConfigError('More settings must be a JSON object; write it like {"noise_offset": 0.05}.')
            known = TrainConfig.field_names() - set(actions.TRAIN_FORBIDDEN) | set(actions.TRAIN_ALIASES)
            check_extra_keys(list(more), known - ({"model"} if not standalone else set()),
                             {**actions.TRAIN_FORBIDDEN, **({} if standalone else {
                                 "model": "the WebUI trains the model it has loaded"})})
            params.update(more)
        return params

    def check_plan(*form):
        try:
            from ..train import plan_training

            config, _ = actions.train_config_from_request(jobs, form_params(*form))
            training = plan_training(config)
            history = [jobs.snapshot(j.id) for j in jobs.jobs() if j.kind == "train" and j.it_per_s]
            lora_dir = Path(host.lora_dir())
            warnings = []
            if (lora_dir / f"{config.name}.safetensors").exists():
                warnings.append(f"⚠️ A LoRA named `{config.name}` is already in the Lora folder; this one would "
                                f"be saved as `{config.name}_2`. Choose another **LoRA name** to avoid that.")
            return plan.plan_md(config, training, plan.describe_setup(host), history, warnings=warnings)
        except Exception as e:
            return error_md(e)

    def _ask(what):
        question = live.busy_question(jobs, what)
        return None if question is None else (question, gr.update(visible=True))

    def start_train(*form):
        try:
            config, sub = actions.train_config_from_request(
                jobs, form_params(*form), defaults={"lora_subdir": opt("lora_trainer_output_subdir")})
            asked = _ask("Training this one")
            if asked is not None:
                return ("",) + asked + ("train",)
            job = jobs.submit_train(config, lora_subdir=sub)
        except Exception as e:
            return error_md(e), gr.update(), gr.update(visible=False), ""
        return f"Started `{job.config.name}`.", "", gr.update(visible=False), ""

    def resume(run_label):
        try:
            run_id = live.run_id_of(run_label) or next((j.id for j in jobs.resumable()), "")
            if not run_id:
                raise ConfigError("There is no stopped run to resume; a run you stop appears in **Stopped runs**.")
            asked = _ask("Resuming this run")
            if asked is not None:
                return ("",) + asked + (f"resume:{run_id}",)
            job = jobs.resume(run_id)
        except Exception as e:
            return error_md(e), gr.update(), gr.update(visible=False), ""
        return f"Resumed `{job.config.name}` from step {jobs.get(run_id).step}.", "", gr.update(visible=False), ""

    def confirm_queue(pending, *form):
        try:
            if pending.startswith("resume:"):
                job = jobs.resume(pending.split(":", 1)[1])
            elif pending == "train":
                config, sub = actions.train_config_from_request(
                    jobs, form_params(*form), defaults={"lora_subdir": opt("lora_trainer_output_subdir")})
                job = jobs.submit_train(config, lora_subdir=sub)
            else:
                return "", gr.update(visible=False), ""
        except Exception as e:
            return error_md(e), gr.update(visible=False), ""
        before = jobs.active_train()
        after = f" after `{before.config.name}`" if before is not None and before is not job else ""
        return f"Queued `{job.config.name}`: it starts{after} when the current run ends.", gr.update(visible=False), ""

    def confirm_cancel(pending):
        active = jobs.active_train()
        going = f"; `{active.config.name}` goes on" if active is not None else ""
        return f"Not started{going}.", gr.update(visible=False), ""

    def stop(job_id):
        job = None
        try:
            job = jobs.get(job_id) if job_id else None
        except UnknownJobError:
            job = None
        if job is None or job.state in FINAL_STATES:
            job = jobs.active_train()
        if job is None:
            return "Nothing is training."
        try:
            jobs.stop(job.id)
        except Exception as e:
            return error_md(e)
        waiting = [j for j in jobs.queued() if j.kind == "train"]
        nxt = (f" The queued run `{waiting[0].config.name}` starts next; *Cancel queued* if you do not want it."
               if waiting else "")
        if job.state == "running":
            return (f"Stopping `{job.config.name}` after this step; its LoRA so far is saved as "
                    f"`{job.config.name}-step…` and it can be resumed.{nxt}")
        return f"`{job.config.name}` will not start.{nxt}"

    def cancel_queued():
        waiting = [j for j in jobs.queued() if j.kind == "train"]
        for job in waiting:
            jobs.stop(job.id)
        return (f"Cancelled {len(waiting)} queued run(s): {', '.join(j.config.name for j in waiting)}."
                if waiting else "No run is queued.")

    # ------------------------------------------------------------------ following the run
    def _follow(job_id):
        """Snapshots of a tag/prepare job until it ends (the last one is final)."""
        job = jobs.get(job_id)
        while True:
            snap = jobs.snapshot(job_id)
            yield snap
            if snap["state"] in FINAL_STATES:
                return
            job.done_event.wait(WATCH_INTERVAL)

    def _job_status(snap):
        if snap["state"] == "failed":
            return f"**Error:** {html.escape(form_message(snap['error'] or ''))}"
        done = f" ({snap['step']}/{snap['total_steps']})" if snap.get("total_steps") else ""
        return f"{snap['label']}: {snap['state']}{done} — {snap.get('message', '')}"

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
            return (gr.update(),) * 19
        source, concept_name, concept_repeats = logic.dataset_origin(c.data)
        return (_preset_label(c.preset) if c.preset in PRESETS else gr.update(), c.name, c.data,
                c.model if needs_model_file and c.model else gr.update(), c.epochs, c.max_steps, c.rank, c.alpha,
                c.learning_rate, c.resolution, c.batch_size, c.seed, c.train_text_encoder,
                "\n".join(c.sample_prompts or []), c.sample_every_n_epochs or 1, job.lora_subdir,
                source or gr.update(), concept_name or gr.update(), concept_repeats or gr.update())

    def reload_pictures(folder, recursive, resolution, selected, text, mode):
        if not (folder or "").strip():
            return (gr.update(),) * 11
        return load(folder, recursive, resolution, selected, text, mode)

    def refresh(sent):
        follower = live.Follower(jobs, {})
        return (*_values(follower.update(_extra(follower.sent))), follower.sent)

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
                sample_prompt, sample_every, subdir, extra]
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
        tab.load(restore_form, None, [*form[:15], subdir, folder, concept, repeats], show_progress="hidden"
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
