"""The Train LoRA tab as real Gradio Blocks (Gradio 3.41 on the A1111 stack, 4.40 on Forge's).

The event handlers are found through the Blocks' own dependency table (by the trigger's elem_id),
fed the values the browser would send and their outputs written back, like a browser session;
training runs the real engine on a tiny model (or, where only the job flow matters, test_jobs'
stand-in runner held at a gate). tests/test_ui_browser.py drives the same tab in headless Chromium.
"""

# ruff: noqa: F811  (pytest fixtures imported from ui_support / train_support are used as arguments)

from __future__ import annotations

import threading
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="Gradio is not installed in this stack (the newest stack has none: "
                                          "gradio 4.40 cannot import beside huggingface-hub 2.x)")

from test_jobs import make_runner
from ui_support import GRADIO4, TINY_EXTRA, Session, photos, tiny_dataset, tiny_host, wait_for  # noqa: F401 - photos: a fixture

from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.ui import build_tab

EXPECTED_IDS = {
    "lora_trainer_folder", "lora_trainer_load", "lora_trainer_upload", "lora_trainer_gallery",
    "lora_trainer_problems", "lora_trainer_tagger_model", "lora_trainer_general_threshold",
    "lora_trainer_character_threshold", "lora_trainer_trigger", "lora_trainer_tag_run", "lora_trainer_caption",
    "lora_trainer_save_caption", "lora_trainer_tag_freq", "lora_trainer_bulk_apply", "lora_trainer_concept",
    "lora_trainer_repeats", "lora_trainer_steps_info", "lora_trainer_prepare", "lora_trainer_preset",
    "lora_trainer_preset_info", "lora_trainer_name", "lora_trainer_data", "lora_trainer_train",
    "lora_trainer_stop", "lora_trainer_resume", "lora_trainer_progress", "lora_trainer_loss_plot",
    "lora_trainer_samples", "lora_trainer_result", "lora_trainer_send_text", "lora_trainer_send_to_txt2img",
    "lora_trainer_refresh", "lora_trainer_job_id", "lora_trainer_tag_preview", "lora_trainer_run_state",
    "lora_trainer_confirm", "lora_trainer_queue_yes", "lora_trainer_queue_no", "lora_trainer_runs",
    "lora_trainer_cancel_queued", "lora_trainer_model_info", "lora_trainer_tag_mode", "lora_trainer_leak_check",
}


def test_tab_builds_with_stable_elem_ids_and_every_setting_explained(tmp_path):
    tab = build_tab(tiny_host(tmp_path))
    assert isinstance(tab, gr.Blocks)
    ids = {b.elem_id: b for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    assert EXPECTED_IDS <= set(ids)
    assert all(i.startswith("lora_trainer_") for i in ids)
    assert isinstance(ids["lora_trainer_gallery"], gr.Gallery)
    assert isinstance(ids["lora_trainer_loss_plot"], gr.Plot)
    assert ids["lora_trainer_send_text"].visible is False
    presets = ids["lora_trainer_preset"].choices
    labels = [c[0] if isinstance(c, (list, tuple)) else c for c in presets]
    assert any("8 GB" in label for label in labels)  # presets state their VRAM need
    # every setting says what it does, in the form (issue: rank, alpha, repeats, thresholds... unexplained)
    settings = [b for b in ids.values() if isinstance(b, (gr.Textbox, gr.Number, gr.Slider, gr.Dropdown, gr.Radio,
                                                          gr.Checkbox)) and b.visible is not False]
    assert len(settings) >= 30
    assert [b.elem_id for b in settings if not getattr(b, "info", None)] == []
    assert "half the rank" in ids["lora_trainer_alpha"].info and "1e-4" in ids["lora_trainer_lr"].info
    # the way through: every step is open, one trigger word field, the caption editor beside the gallery
    for section in ("images", "caption", "prepare", "train"):
        assert ids[f"lora_trainer_{section}_section"].open is True
    # every box has its own name: one picture folder, one training-data folder (no two "Dataset folder"s)
    names = [b.label for b in settings]
    assert len(names) == len(set(names)) and not [n for n in names if "dataset folder" in n.lower()], names
    assert "model" in ids["lora_trainer_model_info"].value.lower() and "tiny-sd1" in ids["lora_trainer_model_info"].value
    assert "CPU" in ids["lora_trainer_model_info"].value


def test_webui_host_gets_send_to_txt2img(tmp_path):
    class WebUIHost(StandaloneHost):
        name = "a1111"

        def model_info(self):
            return {"name": "sd15.safetensors", "family": "SD1"}

    tab = build_tab(WebUIHost(tmp_path / "Lora"), {"lora_trainer_default_preset": "sdxl"})
    s = Session(tab)
    assert tab.blocks[s.id("lora_trainer_send_to_txt2img")].value == "Send to txt2img"
    assert "sdxl" in s["lora_trainer_preset"] and "12 GB" in s["lora_trainer_preset_info"]
    # an SDXL preset on an SD1 model plans 1024 px: said at once, with the preset to pick instead
    assert "made for SDXL models (it trains at 1024 px), but the model is SD1" in s["lora_trainer_preset_info"]
    assert "SD1.5 — 6 GB" in s["lora_trainer_preset_info"]
    assert tab.blocks[s.id("lora_trainer_model_file")].visible is False  # the WebUI trains what it has loaded


def _load_and_tag(s, photos, tagger, trigger="ohwx"):
    s["lora_trainer_folder"] = str(photos)
    s.fire("lora_trainer_load")
    s["lora_trainer_tagger_model"] = str(tagger)
    s["lora_trainer_trigger"] = trigger
    s.fire("lora_trainer_trigger", "change")
    s.fire("lora_trainer_tag_run")
    assert "done" in s["lora_trainer_tag_status"], s["lora_trainer_tag_status"]


def test_full_flow_load_tag_edit_prepare_train(tmp_path, photos):
    from lora_trainer.tagger.demo_model import write_demo_tagger

    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs")
    s = Session(build_tab(host, jobs=jobs))

    s["lora_trainer_folder"] = str(photos)
    s.fire("lora_trainer_load")
    assert len(s["lora_trainer_gallery"]) == 3
    assert [label for _, label in s["lora_trainer_gallery"]] == ["s0.png: (no caption)", "s1.png: (no caption)",
                                                                 "s2.png: (no caption)"]  # names under thumbnails
    assert any(row[0] == "broken.png" for row in s["lora_trainer_problems"])
    assert any("small image" in row[1] for row in s["lora_trainer_problems"])  # 64 px for 512 px training
    s["lora_trainer_resolution"] = 64
    s.fire("lora_trainer_resolution", "change")  # size warnings follow the resolution, no reload needed
    assert not any("small image" in row[1] for row in s["lora_trainer_problems"])
    assert any(row[0] == "broken.png" for row in s["lora_trainer_problems"])
    assert "**3** usable image(s)" in s["lora_trainer_summary"]
    assert "3 images x" in s["lora_trainer_steps_info"]  # the `.then` steps arithmetic ran
    assert "None of the 3 images has a caption yet" in s["lora_trainer_tag_preview"]

    _load_and_tag(s, photos, write_demo_tagger(tmp_path / "tagger"))
    assert all(label.split(": ", 1)[1].startswith("ohwx") for _, label in s["lora_trainer_gallery"])
    assert ["ohwx", 3] in s["lora_trainer_tag_freq"]
    assert s["lora_trainer_concept"] == "ohwx"  # the trigger word is typed once

    s.fire("lora_trainer_gallery", "select", evt=types.SimpleNamespace(index=1))
    assert s["lora_trainer_caption"].startswith("ohwx") and s.prop("lora_trainer_caption", "label") == \
        "Caption of s1.png"
    s["lora_trainer_caption"] = "ohwx, square, square"
    s.fire("lora_trainer_save_caption")
    assert (photos / "s1.txt").read_text().strip() == "ohwx, square"

    s["lora_trainer_bulk_action"], s["lora_trainer_bulk_tag"] = "add", "shape"
    s.fire("lora_trainer_bulk_apply")
    assert "Add 'shape': changed" in s["lora_trainer_bulk_status"]
    assert all("shape" in (photos / f"s{i}.txt").read_text() for i in range(3))
    assert s["lora_trainer_caption"] == "ohwx, square, shape"  # the box shows the file it is labelled with
    assert s.prop("lora_trainer_caption", "label") == "Caption of s1.png"

    s["lora_trainer_repeats"] = 1
    s.fire("lora_trainer_repeats", "change")
    assert "3 images x 1 repeats" in s["lora_trainer_steps_info"]
    s.fire("lora_trainer_plan")  # too early: nothing prepared yet
    assert "**Training data** is empty" in s["lora_trainer_plan_info"]
    s.fire("lora_trainer_train")
    assert "**Training data** is empty" in s["lora_trainer_train_status"]
    s.fire("lora_trainer_prepare")
    assert "Prepared" in s["lora_trainer_prepare_status"], s["lora_trainer_prepare_status"]
    assert s["lora_trainer_plan_info"] == s["lora_trainer_train_status"] == ""  # the old errors are gone
    assert (Path(s["lora_trainer_data"]) / "img" / "1_ohwx").is_dir()

    s["lora_trainer_name"], s["lora_trainer_epochs"] = "flow", 1
    s["lora_trainer_rank"], s["lora_trainer_batch_size"], s["lora_trainer_extra"] = 4, 1, TINY_EXTRA
    s["lora_trainer_sample_prompt"] = "ohwx, circle"
    s.fire("lora_trainer_plan")
    plan = s["lora_trainer_plan_info"]
    assert "Total:" in plan and "**Model:** `tiny-sd1` (SD1)" in plan and "**Time:**" in plan, plan
    s.fire("lora_trainer_train")
    assert "Started `flow`" in s["lora_trainer_train_status"]
    job = jobs.wait(jobs.latest("train").id, 120)
    assert job.state == "done", job.error
    s.fire("lora_trainer_refresh")
    assert "LoRA ready" in s["lora_trainer_result"], s["lora_trainer_result"]
    assert s["lora_trainer_send_text"] == "<lora:flow:0.8> ohwx"
    assert (host.lora_dir() / "flow.safetensors").is_file()
    assert (host.lora_dir() / "flow.preview.png").is_file()
    assert "Done" in s["lora_trainer_progress"] and "step 3/3" in s["lora_trainer_progress"]
    assert s["lora_trainer_loss_plot"].__class__.__name__ == "Figure"
    assert len(s["lora_trainer_samples"]) >= 1
    assert s["lora_trainer_job_id"] == job.id
    # the next plan's time estimate uses the speed this run measured here
    s.fire("lora_trainer_plan")
    assert "measured by the run 'train flow' here" in s["lora_trainer_plan_info"]
    # the page opened again: the form, the pictures and the concept come back with the run
    again = Session(s.tab)
    again.open()
    assert (again["lora_trainer_name"], again["lora_trainer_concept"], again["lora_trainer_repeats"]) == ("flow", "ohwx", 1)
    assert again["lora_trainer_folder"] == str(photos.resolve()) and len(again["lora_trainer_gallery"]) == 3
    assert "A LoRA named `flow` is already in the Lora folder" in s["lora_trainer_plan_info"]


def test_retagging_never_undoes_the_users_edits(tmp_path, photos):
    """Bulk-removed tags stay out and hand edits are kept; what each mode will do is said before it runs."""
    from lora_trainer.tagger.demo_model import write_demo_tagger

    host = tiny_host(tmp_path)
    s = Session(build_tab(host, jobs=JobManager(host, work_dir=tmp_path / "runs")))
    tagger = write_demo_tagger(tmp_path / "tagger")
    _load_and_tag(s, photos, tagger)
    first = {i: (photos / f"s{i}.txt").read_text().strip() for i in range(3)}
    common = sorted(set.intersection(*({t.strip() for t in c.split(",")} for c in first.values())) - {"ohwx"})
    assert common, first
    gone = common[0]
    s["lora_trainer_bulk_action"], s["lora_trainer_bulk_tag"] = "remove", gone
    s.fire("lora_trainer_bulk_apply")
    assert f"will not write '{gone}' again" in s["lora_trainer_bulk_status"]
    s.fire("lora_trainer_gallery", "select", evt=types.SimpleNamespace(index=0))
    edited = s["lora_trainer_caption"] + ", my own words"
    s["lora_trainer_caption"] = edited
    s.fire("lora_trainer_save_caption")

    preview = s["lora_trainer_tag_preview"]
    assert "**3 of 3 images already have a caption** (3 changed by you since the tagger wrote them)." in preview
    assert "**→ *Only images without a caption*" in preview  # the safe mode is the default
    s["lora_trainer_tag_mode"] = "Add new tags to existing captions"
    s.fire("lora_trainer_tag_mode", "change")
    assert f"tags you took out stay out ({gone})" in s["lora_trainer_tag_preview"]
    s["lora_trainer_tag_mode"] = "Replace all captions"
    s.fire("lora_trainer_tag_mode", "change")
    assert "**your changes to 3 caption(s) are lost**" in s["lora_trainer_tag_preview"]

    s["lora_trainer_tag_mode"] = "Add new tags to existing captions"
    s["lora_trainer_general_threshold"] = 0.05  # more tags: append has something new to add
    s.fire("lora_trainer_tag_run")
    assert "done" in s["lora_trainer_tag_status"], s["lora_trainer_tag_status"]
    after = {i: (photos / f"s{i}.txt").read_text().strip() for i in range(3)}
    assert all(gone not in [t.strip() for t in text.split(",")] for text in after.values()), after
    assert after[0].startswith(edited.replace(", my own words", "")) and "my own words" in after[0]
    assert any(len(after[i]) > len(first[i]) for i in range(3))  # append did add new tags
    assert "(3 changed by you since the tagger wrote them)" in s["lora_trainer_tag_preview"]  # still yours
    # Replace all captions: the bulk-removed tag still stays out
    s["lora_trainer_tag_mode"] = "Replace all captions"
    s.fire("lora_trainer_tag_run")
    assert all(gone not in (photos / f"s{i}.txt").read_text() for i in range(3))


def test_an_unsaved_caption_edit_is_kept_when_another_picture_is_clicked(tmp_path, photos):
    host = tiny_host(tmp_path)
    s = Session(build_tab(host, jobs=JobManager(host, work_dir=tmp_path / "runs")))
    s["lora_trainer_folder"] = str(photos)
    s.fire("lora_trainer_load")
    s.fire("lora_trainer_gallery", "select", evt=types.SimpleNamespace(index=0))
    s["lora_trainer_caption"] = "a red disc, not saved yet"
    s.fire("lora_trainer_gallery", "select", evt=types.SimpleNamespace(index=2))
    assert (photos / "s0.txt").read_text().strip() == "a red disc, not saved yet"
    assert "Kept your edit" in s["lora_trainer_caption_status"] and "s0.png" in s["lora_trainer_caption_status"]
    assert s.prop("lora_trainer_caption", "label") == "Caption of s2.png" and s["lora_trainer_caption"] == ""
    assert s["lora_trainer_gallery"][0][1] == "s0.png: a red disc, not saved yet"
    # an edit pending when a bulk edit runs is kept first, then the box shows the new file content
    s["lora_trainer_caption"] = "blue square"
    s["lora_trainer_bulk_action"], s["lora_trainer_bulk_tag"] = "add first", "shape"
    s.fire("lora_trainer_bulk_apply")
    assert (photos / "s2.txt").read_text().strip() == "shape, blue square"
    assert s["lora_trainer_caption"] == "shape, blue square" and "Kept your edit" in s["lora_trainer_bulk_status"]


def test_train_while_a_run_is_active_asks_and_stop_acts_on_what_the_page_shows(tmp_path):
    """Issue: a second Train silently queued a full run; Stop stopped the first and the queued one
    "started over". Now the page says what runs, asks before queueing, and each button does what it says."""
    gate = threading.Event()
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=30, gate=gate))
    s = Session(build_tab(host, jobs=jobs))
    s["lora_trainer_data"], s["lora_trainer_name"] = str(tiny_dataset(tmp_path)), "first"
    s.fire("lora_trainer_train")
    first = jobs.latest("train")
    wait_for(lambda: first.state == "running" and first.total_steps)
    s.open()
    assert s["lora_trainer_job_id"] == first.id and "Running" in s["lora_trainer_progress"]
    assert "**Training:** `first`" in s["lora_trainer_run_state"]

    s["lora_trainer_name"] = "second"
    s.fire("lora_trainer_train")  # asks instead of queueing silently
    assert s.prop("lora_trainer_confirm", "visible") is True
    assert "A run is already going" in s["lora_trainer_confirm_text"] and "`first`" in s["lora_trainer_confirm_text"]
    assert jobs.queued() == []
    s.fire("lora_trainer_queue_no")
    assert s.prop("lora_trainer_confirm", "visible") is False and jobs.queued() == []
    assert "Not started; `first` goes on" in s["lora_trainer_train_status"]

    s.fire("lora_trainer_train")
    s.fire("lora_trainer_queue_yes")
    assert [j.config.name for j in jobs.queued()] == ["second"]
    assert "Queued `second`" in s["lora_trainer_train_status"]
    s.fire("lora_trainer_refresh")
    assert "**Queued after it:** `second`" in s["lora_trainer_run_state"]
    assert s.prop("lora_trainer_cancel_queued", "visible") is True
    assert s["lora_trainer_job_id"] == first.id  # the page still shows the running run

    s.fire("lora_trainer_cancel_queued")
    assert "Cancelled 1 queued run(s): second" in s["lora_trainer_train_status"] and jobs.queued() == []
    s.fire("lora_trainer_stop")  # acts on the run shown
    assert "Stopping `first`" in s["lora_trainer_train_status"]
    gate.set()
    assert jobs.wait(first.id, 20).state == "stopped"
    s.fire("lora_trainer_refresh")
    assert "Stopped" in s["lora_trainer_result"] and "Resume" in s["lora_trainer_result"]
    assert s.prop("lora_trainer_runs", "visible") is True
    assert s["lora_trainer_runs"].startswith("first — stopped at step") and s.prop("lora_trainer_cancel_queued",
                                                                                    "visible") is False


def test_every_stopped_run_stays_listed_and_resumable(tmp_path):
    gate = threading.Event()
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=30, gate=gate))
    s = Session(build_tab(host, jobs=jobs))
    s["lora_trainer_data"] = str(tiny_dataset(tmp_path))
    stopped = []
    for name in ("older", "newer"):
        s["lora_trainer_name"] = name
        s.fire("lora_trainer_train")
        job = jobs.latest("train")
        wait_for(lambda job=job: job.state == "running" and job.total_steps)
        s.fire("lora_trainer_stop")
        gate.set()
        jobs.wait(job.id, 20)
        gate.clear()
        stopped.append(job)
    assert [j.state for j in stopped] == ["stopped", "stopped"]
    assert [j.lora_name for j in stopped] == [f"older-step{stopped[0].step:02d}", f"newer-step{stopped[1].step:02d}"]
    # the server restarts: a page opened then shows the last run and both stopped runs at once
    restarted = Session(build_tab(host, jobs=JobManager(host, work_dir=tmp_path / "runs")))
    restarted.open()
    assert "Stopped" in restarted["lora_trainer_progress"] and restarted["lora_trainer_name"] == "newer"
    assert [c.split(" — ")[0] for c in restarted.prop("lora_trainer_runs", "choices")] == ["newer", "older"]
    s.fire("lora_trainer_refresh")
    choices = s.prop("lora_trainer_runs", "choices")
    assert [c.split(" — ")[0] for c in choices] == ["newer", "older"]
    s["lora_trainer_runs"] = next(c for c in choices if c.startswith("older"))
    gate.set()
    s.fire("lora_trainer_resume")  # the older run, as chosen
    assert f"Resumed `older` from step {stopped[0].step}" in s["lora_trainer_train_status"]
    resumed = jobs.wait(jobs.latest("train").id, 20)
    assert resumed.state == "done" and resumed.lora_name == "older"  # the finished LoRA gets the chosen name
    assert (host.lora_dir() / "older.safetensors").read_bytes() == b"lora at step 30"
    assert (host.lora_dir() / f"older-step{stopped[0].step:02d}.safetensors").is_file()
    s.fire("lora_trainer_refresh")
    assert [c.split(" — ")[0] for c in s.prop("lora_trainer_runs", "choices")] == ["newer"]
    assert s["lora_trainer_send_text"].startswith("<lora:older:0.8>")
    assert [h[0] for h in jobs.snapshot(resumed.id)["loss_history"]] == list(range(1, 31))


def test_reopening_the_page_mid_run_shows_the_run_and_keeps_updating(tmp_path):
    gate = threading.Event()
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=30, gate=gate))
    tab = build_tab(host, jobs=jobs)
    first_page = Session(tab)
    first_page["lora_trainer_data"], first_page["lora_trainer_name"] = str(tiny_dataset(tmp_path)), "mid"
    first_page.fire("lora_trainer_train")
    job = jobs.latest("train")
    wait_for(lambda: job.state == "running" and job.total_steps)
    again = Session(tab)  # the same tab opened in a new page (reload, another browser, after a restart)
    assert "No training run yet" in again["lora_trainer_progress"]  # what the static page holds
    assert again["lora_trainer_name"] == "my-lora"
    again.open()
    assert again["lora_trainer_job_id"] == job.id and "Running" in again["lora_trainer_progress"]
    # the form shows what is training (a reload in a browser empties it otherwise)
    assert again["lora_trainer_name"] == "mid" and again["lora_trainer_data"] == first_page["lora_trainer_data"]
    assert "**Training:** `mid`" in again["lora_trainer_run_state"]
    gate.set()
    jobs.wait(job.id, 20)
    again.open()
    assert "Done" in again["lora_trainer_progress"] and "LoRA ready" in again["lora_trainer_result"]


def test_the_page_keeps_following_by_itself(tmp_path, monkeypatch):
    """Gradio 4: a one-second timer; Gradio 3: a generator per open page. Either way the progress
    changes without a click, and only changed components are sent."""
    gate = threading.Event()
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=3, gate=gate))
    tab = build_tab(host, jobs=jobs)
    config = tab.get_config_file()
    deps = config["dependencies"]
    if GRADIO4:
        timers = [b for b in tab.blocks.values() if type(b).__name__ == "Timer"]
        assert timers and timers[0].value == 1.0
        poll = next(tab.fns[d["id"]].fn for d in deps if d["targets"] and d["targets"][0][1] == "tick")
        first = poll({})
        assert len(first) == 11 and "No training run yet" in first[1]
        again = poll(first[-1])
        assert all(isinstance(v, dict) and set(v) == {"__type__"} for v in again[:-1])  # nothing changed
    else:
        index = next(i for i, d in enumerate(deps) if d.get("trigger") == "load" and len(d["outputs"]) == 10)
        monkeypatch.setattr("lora_trainer.ui.tab_results.WATCH_INTERVAL", 0.01)
        loop = tab.fns[index].fn()
        first = next(loop)
        assert "No training run yet" in first[1]
        # nothing new: still an (empty) update now and then, so Gradio 3 notices a page that was closed
        again = next(loop)
        assert all(isinstance(v, dict) and set(v) == {"__type__"} for v in again), again
    session = Session(tab)
    session["lora_trainer_data"], session["lora_trainer_name"] = str(tiny_dataset(tmp_path)), "auto"
    session.fire("lora_trainer_train")
    gate.set()
    job = jobs.wait(jobs.latest("train").id, 20)
    assert job.state == "done"
    following = poll(first[-1]) if GRADIO4 else next(loop)
    assert "Done" in following[1] and "step 3/3" in following[1]
    if not GRADIO4:
        loop.close()
