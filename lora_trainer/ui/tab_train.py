"""Step 4 of the tab: the training form (presets, plan check), Train/Resume (asking before queueing
behind a running run), Stop and Cancel queued. `handlers(ctx, tags)` gives the Gradio event functions;
`tab.build_tab` wires them.
"""

# Handlers catch every exception on purpose: the tab shows the message (error_md), and
# logic.user_error logs the traceback of anything that is not a LoraTrainerError.
# ruff: noqa: BLE001

import json
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from .. import actions
from ..config import TrainConfig
from ..errors import ConfigError
from ..jobs import FINAL_STATES, UnknownJobError
from . import live, plan
from .tab_shared import PRESET_LABELS, TabContext, error_md, train_defaults
from .texts import check_extra_keys


def handlers(ctx: TabContext, tags: SimpleNamespace) -> SimpleNamespace:
    """The training step's event functions for one tab (`tags`: the pictures step's, for the size check)."""
    host, jobs, opt = ctx.host, ctx.jobs, ctx.opt
    preset_key, standalone, needs_model_file = ctx.preset_key, ctx.standalone, ctx.needs_model_file
    preset_info, recheck_sizes, _train_defaults = ctx.preset_info, tags.recheck_sizes, train_defaults

    def apply_preset(label, scanned):
        key = PRESET_LABELS.get(label, preset_key)
        c = _train_defaults(key)
        family = plan.describe_setup(host).family
        return (preset_info(key, family), c.rank, c.alpha, c.learning_rate, c.resolution, c.batch_size,
                c.train_text_encoder, recheck_sizes(scanned, c.resolution))

    def form_params(label, name, data, model_file, epochs, max_steps, rank, alpha, lr, resolution, batch, seed,
                    train_te, sample_prompt, sample_every, subdir, extra, leak_check=""):
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
        leak = (leak_check or "").strip()
        if leak:  # the field, or More settings' leak_check_dir where the field is empty; never two folders
            given = str(params.get("leak_check_dir") or "").strip()
            if given and Path(given).expanduser() != Path(leak).expanduser():
                raise ConfigError(f"The leak-check folder is given twice, in **Leak-check folder** ({leak}) and in "
                                  f"More settings ({given}); remove it from More settings.")
            params["leak_check_dir"] = leak
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

    return SimpleNamespace(
        apply_preset=apply_preset, form_params=form_params, check_plan=check_plan,
        start_train=start_train, resume=resume, confirm_queue=confirm_queue, confirm_cancel=confirm_cancel,
        stop=stop, cancel_queued=cancel_queued,
    )
