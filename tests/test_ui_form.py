"""The Train LoRA tab's training form as real Gradio Blocks (see test_ui.py for how events are fired): settings
errors name the form's fields, a standalone tab asks for a checkpoint file, folders outside the allowed roots are
refused, uploads are copied, presets fill the form, and the Leak-check folder reaches the run.
"""

# ruff: noqa: F811  (pytest fixtures imported from ui_support / train_support are used as arguments)

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="Gradio is not installed in this stack (the newest stack has none: "
                                          "gradio 4.40 cannot import beside huggingface-hub 2.x)")

from test_jobs import make_runner
from train_support import shape_image, tiny_sd1_ckpt  # noqa: F401 - tiny_sd1_ckpt: a fixture
from ui_support import GRADIO4, TINY_EXTRA, Session, photos, tiny_dataset, tiny_host  # noqa: F401 - photos: a fixture

from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.ui import build_tab


def test_bad_settings_name_the_forms_fields(tmp_path, photos):
    host = tiny_host(tmp_path)
    s = Session(build_tab(host, jobs=JobManager(host, work_dir=tmp_path / "runs")))
    s["lora_trainer_data"], s["lora_trainer_rank"] = str(photos), 0
    s.fire("lora_trainer_train")
    assert "**Rank** must be at least 1" in s["lora_trainer_train_status"]
    s["lora_trainer_rank"], s["lora_trainer_epochs"] = 4, 0
    s.fire("lora_trainer_train")
    assert "set **Epochs** (or **Max steps**) to at least 1" in s["lora_trainer_train_status"]
    assert "--" not in s["lora_trainer_train_status"]
    s["lora_trainer_epochs"], s["lora_trainer_extra"] = 1, '{"noise_ofset": 0.05}'
    s.fire("lora_trainer_train")
    assert s["lora_trainer_train_status"] == ("**Error:** More settings: 'noise_ofset' is not a setting; "
                                              "did you mean 'noise_offset'?")
    s["lora_trainer_extra"] = "{not json"
    s.fire("lora_trainer_train")
    assert "More settings is not valid JSON" in s["lora_trainer_train_status"]
    assert "Traceback" not in s["lora_trainer_train_status"]
    s["lora_trainer_data"], s["lora_trainer_extra"] = "", ""
    s.fire("lora_trainer_plan")
    assert "**Training data** is empty; prepare the dataset in step 3" in s["lora_trainer_plan_info"]
    s.fire("lora_trainer_prepare")
    assert "load your pictures in step 1" in s["lora_trainer_prepare_status"]
    s["lora_trainer_folder"] = str(photos)
    s.fire("lora_trainer_prepare")
    assert "The concept is empty; type it in **Concept**" in s["lora_trainer_prepare_status"]
    s["lora_trainer_folder"] = str(tmp_path / "missing")
    s.fire("lora_trainer_load")
    assert "does not exist" in s["lora_trainer_summary"]
    # a dataset the engine refuses (no <repeats>_<concept> folder): the job fails with its message
    s["lora_trainer_extra"] = TINY_EXTRA
    s["lora_trainer_resolution"], s["lora_trainer_data"] = 64, str(photos)
    s.fire("lora_trainer_train")
    assert s["lora_trainer_train_status"].startswith("Started")  # the earlier error line is gone
    assert s["lora_trainer_plan_info"] == ""  # and so is the plan's ("Training data is empty")
    job = s.tab.lora_trainer_jobs.wait(s.tab.lora_trainer_jobs.latest("train").id, 60)
    assert job.state == "failed"
    s.fire("lora_trainer_refresh")
    assert "Training failed" in s["lora_trainer_result"]
    assert "Failed" in s["lora_trainer_progress"] and "Traceback" not in s["lora_trainer_result"]


def test_a_standalone_tab_without_a_model_asks_for_a_checkpoint_file(tmp_path, photos, tiny_sd1_ckpt):
    host = StandaloneHost(tmp_path / "Lora")
    s = Session(build_tab(host, jobs=JobManager(host, work_dir=tmp_path / "runs")))
    assert s.tab.blocks[s.id("lora_trainer_model_file")].visible is not False
    assert "none yet" in s["lora_trainer_model_info"] and "type a checkpoint file" in s["lora_trainer_model_info"]
    s["lora_trainer_data"] = str(photos)
    s.fire("lora_trainer_train")
    assert "type a checkpoint (.safetensors) in **Checkpoint file**" in s["lora_trainer_train_status"]
    host.model = Path(tiny_sd1_ckpt)
    s.open()
    assert f"`{Path(tiny_sd1_ckpt).name}` (SD1)" in s["lora_trainer_model_info"]


def test_paths_outside_allowed_roots_are_refused(tmp_path, photos):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    s = Session(build_tab(tiny_host(tmp_path, allowed_roots=[allowed])))
    s["lora_trainer_folder"] = str(photos)
    s.fire("lora_trainer_load")
    assert "outside the folders" in s["lora_trainer_summary"]
    assert s["lora_trainer_gallery"] == []
    # the folder box is the browser's: a bulk edit on a typed folder is checked as well
    s["lora_trainer_bulk_action"], s["lora_trainer_bulk_tag"] = "add", "pwned"
    s.fire("lora_trainer_bulk_apply")
    assert "outside the folders" in s["lora_trainer_bulk_status"]
    assert not list(photos.glob("*.txt"))


def test_upload_copies_files_into_the_run_folder(tmp_path, photos):
    host = tiny_host(tmp_path, allowed_roots=[tmp_path / "nowhere"])
    jobs = JobManager(host, work_dir=tmp_path / "runs")
    s = Session(build_tab(host, jobs=jobs))
    uploads = [str(photos / "s0.png"), str(photos / "s1.png")]
    if not GRADIO4:  # Gradio 3 hands tempfile wrappers with .name
        uploads = [types.SimpleNamespace(name=p, orig_name=Path(p).name) for p in uploads]
    s["lora_trainer_upload"] = uploads
    s.fire("lora_trainer_upload", "upload")
    assert len(s["lora_trainer_gallery"]) == 2
    assert Path(s["lora_trainer_folder"]).parent == (tmp_path / "runs" / "uploads").resolve()


def test_preset_change_updates_the_form(tmp_path):
    s = Session(build_tab(tiny_host(tmp_path)))
    label = next(c for c in s.tab.blocks[s.id("lora_trainer_preset")].choices
                 if "sdxl-lowvram" in str(c))
    s["lora_trainer_preset"] = label[0] if isinstance(label, (list, tuple)) else label
    s.fire("lora_trainer_preset", "input")
    assert s["lora_trainer_rank"] == 8 and s["lora_trainer_resolution"] == 1024
    assert "8 GB" in s["lora_trainer_preset_info"]
    assert "but the model is SD1" in s["lora_trainer_preset_info"]  # the tiny model is SD1


def test_the_leak_check_folder_field_reaches_the_run(tmp_path):
    """The report's leakage on other subjects needs their pictures: the form's own field (not only More
    settings) becomes the run's leak_check_dir, checked like every folder; empty = none."""
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=2))
    s = Session(build_tab(host, jobs=jobs))
    box = s.tab.blocks[s.id("lora_trainer_leak_check")]
    assert box.label == "Leak-check folder (optional)" and box.visible is not False
    assert "other subjects with same-named .txt captions" in box.info and "Empty = not used" in box.info
    assert s["lora_trainer_leak_check"] in ("", None)
    s["lora_trainer_data"], s["lora_trainer_name"] = str(tiny_dataset(tmp_path)), "checked"
    s["lora_trainer_resolution"], s["lora_trainer_extra"] = 64, TINY_EXTRA

    missing = tmp_path / "missing"
    s["lora_trainer_leak_check"] = str(missing)
    s.fire("lora_trainer_train")
    assert f"The leak-check folder {missing.resolve()} does not exist; check the path." in \
        s["lora_trainer_train_status"], s["lora_trainer_train_status"]
    assert jobs.jobs() == []
    others = tmp_path / "others"
    others.mkdir()
    s["lora_trainer_leak_check"] = str(others)
    s.fire("lora_trainer_plan")  # the plan scans it as the run will: said before training, in the form's words
    assert "holds no images" in s["lora_trainer_plan_info"] and "leave **Leak-check folder** empty" in \
        s["lora_trainer_plan_info"], s["lora_trainer_plan_info"]
    shape_image(0, (64, 64)).save(others / "red.png")
    s.fire("lora_trainer_plan")
    assert "Leak-check image red.png has no caption" in s["lora_trainer_plan_info"]
    (others / "red.txt").write_text("red circle")
    s.fire("lora_trainer_plan")
    assert "Total:" in s["lora_trainer_plan_info"], s["lora_trainer_plan_info"]

    # More settings naming another folder as well: refused, not one of them silently dropped
    s["lora_trainer_extra"] = json.dumps({"save_precision": "float", "leak_check_dir": str(tmp_path)})
    s.fire("lora_trainer_train")
    assert "The leak-check folder is given twice, in **Leak-check folder**" in s["lora_trainer_train_status"]
    assert jobs.jobs() == []
    s["lora_trainer_extra"] = json.dumps({"save_precision": "float", "leak_check_dir": str(others) + "/"})
    s.fire("lora_trainer_train")  # the same folder twice is no conflict
    assert s["lora_trainer_train_status"] == "Started `checked`.", s["lora_trainer_train_status"]
    job = jobs.wait(jobs.latest("train").id, 20)
    assert job.state == "done" and job.config.leak_check_dir == str(others.resolve())
    again = Session(s.tab)  # the page opened again shows the run's folder with its other settings
    again.open()
    assert again["lora_trainer_leak_check"] == str(others.resolve()) and again["lora_trainer_name"] == "checked"

    s["lora_trainer_name"], s["lora_trainer_extra"], s["lora_trainer_leak_check"] = "plain", TINY_EXTRA, "  "
    s.fire("lora_trainer_train")  # empty: no leak-check set
    assert jobs.wait(jobs.latest("train").id, 20).config.leak_check_dir == ""
    # the field empty, More settings' leak_check_dir (how it was given before the field) still counts
    s["lora_trainer_name"], s["lora_trainer_extra"] = "json", json.dumps({"leak_check_dir": str(others)})
    s.fire("lora_trainer_train")
    assert jobs.wait(jobs.latest("train").id, 20).config.leak_check_dir == str(others.resolve())
