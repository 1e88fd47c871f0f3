"""The Train LoRA tab as real Gradio Blocks (Gradio 3.41 on the A1111 stack, 4.40 on Forge's).

The event handlers are found through the Blocks' own dependency table (by the trigger's elem_id),
fed the values the browser would send and their outputs written back, like a browser session;
training runs the real engine on a tiny model (or, where only the job flow matters, test_jobs'
stand-in runner held at a gate). tests/test_ui_browser.py drives the same tab in headless Chromium.
"""

from __future__ import annotations

import json
import threading
import time
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="Gradio is not installed in this stack (the newest stack has none: "
                                          "gradio 4.40 cannot import beside huggingface-hub 2.x)")

from PIL import Image
from test_jobs import make_runner
from train_support import shape_image, tiny_sd1_ckpt  # noqa: F401 - a fixture

from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.ui import build_tab

GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
# No bucket settings: at 64 px the buckets follow the resolution (issue: "below min_bucket_reso 256")
TINY_EXTRA = '{"save_precision": "float", "sample_steps": 2}'


class Session:
    """A browser session: component values by id; firing an event runs its handler (and `.then`s)."""

    def __init__(self, tab):
        self.tab = tab
        self.deps = tab.get_config_file()["dependencies"]
        self.values = {bid: getattr(b, "value", None) for bid, b in tab.blocks.items()}
        self.props = {}  # last gr.update() properties (label, visible, choices) per block id
        self.by_elem = {b.elem_id: bid for bid, b in tab.blocks.items() if getattr(b, "elem_id", None)}

    def id(self, elem_id):
        return self.by_elem[elem_id]

    def __getitem__(self, elem_id):
        return self.values[self.id(elem_id)]

    def __setitem__(self, elem_id, value):
        self.values[self.id(elem_id)] = value

    def prop(self, elem_id, name):
        bid = self.id(elem_id)
        if name in self.props.get(bid, {}):
            return self.props[bid][name]
        return getattr(self.tab.blocks[bid], name, None)

    def _dep_index(self, block_id, event):
        for i, dep in enumerate(self.deps):
            for t in dep["targets"]:
                if (t == [block_id, event] or t == (block_id, event)
                        or (t == block_id and dep.get("trigger") == event)):
                    return i
        raise AssertionError(f"no {event} handler on block {block_id}")

    def _fn(self, i):
        dep = self.deps[i]
        return self.tab.fns[dep["id"]] if GRADIO4 else self.tab.fns[i]

    def _apply(self, outputs, result):
        if len(outputs) == 1:
            result = (result,)
        for oid, value in zip(outputs, result):
            if isinstance(value, dict) and str(value.get("__type__", "")).endswith("update"):
                self.props.setdefault(oid, {}).update({k: v for k, v in value.items() if k != "__type__"})
                if "value" in value:
                    self.values[oid] = value["value"]
            else:
                self.values[oid] = value

    def _run(self, i, evt=None, first_only=False):
        dep = self.deps[i]
        args = [self.values[j] for j in dep["inputs"]]
        if evt is not None:
            args.append(evt)
        fn = self._fn(i).fn
        if fn is None:  # a JS-only event
            return
        result = fn(*args)
        if isinstance(result, types.GeneratorType):
            for item in result:
                self._apply(dep["outputs"], item)
                if first_only:  # a page's poll loop never ends: take what it shows first
                    result.close()
                    break
        else:
            self._apply(dep["outputs"], result)
        key = dep.get("id", i) if GRADIO4 else i
        for j, other in enumerate(self.deps):
            if other.get("trigger_after") == key:
                self._run(j)

    def fire(self, elem_id, event="click", evt=None):
        self._run(self._dep_index(self.id(elem_id), event), evt)

    def open(self):
        """What the page shows when it is opened: its load events (the form, the run it follows)."""
        ran = 0
        for i, dep in enumerate(self.deps):
            loads = [t for t in dep["targets"] if isinstance(t, (list, tuple)) and t[1] == "load"]
            if (loads or dep.get("trigger") == "load") and dep["outputs"]:
                self._run(i, first_only=True)
                ran += 1
        assert ran >= 2, "no load events"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        shape_image(i, (64, 64)).save(folder / f"s{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    return folder


def tiny_host(tmp_path, **kw):
    return StandaloneHost(tmp_path / "Lora", bundle_factory=lambda: build_tiny_bundle("sd1"), **kw)


def wait_for(predicate, timeout=30.0):
    """Until `predicate()` holds (an observable state, not a guessed delay)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


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


def test_a_standalone_tab_without_a_model_asks_for_a_checkpoint_file(tmp_path, photos, tiny_sd1_ckpt):  # noqa: F811
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


def _dataset(tmp_path):
    data = tmp_path / "ds" / "img" / "2_thing"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a.png")
    return tmp_path / "ds"


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
    s["lora_trainer_data"], s["lora_trainer_name"] = str(_dataset(tmp_path)), "checked"
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


def test_train_while_a_run_is_active_asks_and_stop_acts_on_what_the_page_shows(tmp_path):
    """Issue: a second Train silently queued a full run; Stop stopped the first and the queued one
    "started over". Now the page says what runs, asks before queueing, and each button does what it says."""
    gate = threading.Event()
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=30, gate=gate))
    s = Session(build_tab(host, jobs=jobs))
    s["lora_trainer_data"], s["lora_trainer_name"] = str(_dataset(tmp_path)), "first"
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
    s["lora_trainer_data"] = str(_dataset(tmp_path))
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
    first_page["lora_trainer_data"], first_page["lora_trainer_name"] = str(_dataset(tmp_path)), "mid"
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
    session["lora_trainer_data"], session["lora_trainer_name"] = str(_dataset(tmp_path)), "auto"
    session.fire("lora_trainer_train")
    gate.set()
    job = jobs.wait(jobs.latest("train").id, 20)
    assert job.state == "done"
    following = poll(first[-1]) if GRADIO4 else next(loop)
    assert "Done" in following[1] and "step 3/3" in following[1]
    if not GRADIO4:
        loop.close()
