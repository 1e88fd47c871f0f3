"""The Train LoRA tab as real Gradio Blocks (Gradio 3.41 on the A1111 stack, 4.40 on Forge's).

The event handlers are found through the Blocks' own dependency table (by the trigger's elem_id),
fed the values the browser would send and their outputs written back, like a browser session;
training runs the real engine on a tiny model.
"""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason="Gradio is not installed in this stack (the newest stack has none: "
                                          "gradio 4.40 cannot import beside huggingface-hub 2.x)")

from PIL import Image
from test_jobs import make_runner
from train_support import shape_image

from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.ui import build_tab

GRADIO4 = int(gr.__version__.split(".")[0]) >= 4
TINY_EXTRA = '{"min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32, "save_precision": "float"}'


class Session:
    """A browser session: component values by id; firing an event runs its handler (and `.then`s)."""

    def __init__(self, tab):
        self.tab = tab
        self.deps = tab.get_config_file()["dependencies"]
        self.values = {bid: getattr(b, "value", None) for bid, b in tab.blocks.items()}
        self.by_elem = {b.elem_id: bid for bid, b in tab.blocks.items() if getattr(b, "elem_id", None)}

    def id(self, elem_id):
        return self.by_elem[elem_id]

    def __getitem__(self, elem_id):
        return self.values[self.id(elem_id)]

    def __setitem__(self, elem_id, value):
        self.values[self.id(elem_id)] = value

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
                if "value" in value:
                    self.values[oid] = value["value"]
            else:
                self.values[oid] = value

    def _run(self, i, evt=None):
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
        else:
            self._apply(dep["outputs"], result)
        key = dep.get("id", i) if GRADIO4 else i
        for j, other in enumerate(self.deps):
            if other.get("trigger_after") == key:
                self._run(j)

    def fire(self, elem_id, event="click", evt=None):
        self._run(self._dep_index(self.id(elem_id), event), evt)


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


EXPECTED_IDS = {
    "lora_trainer_folder", "lora_trainer_load", "lora_trainer_upload", "lora_trainer_gallery",
    "lora_trainer_problems", "lora_trainer_tagger_model", "lora_trainer_general_threshold",
    "lora_trainer_character_threshold", "lora_trainer_trigger", "lora_trainer_tag_run", "lora_trainer_caption",
    "lora_trainer_save_caption", "lora_trainer_tag_freq", "lora_trainer_bulk_apply", "lora_trainer_concept",
    "lora_trainer_repeats", "lora_trainer_steps_info", "lora_trainer_prepare", "lora_trainer_preset",
    "lora_trainer_preset_info", "lora_trainer_name", "lora_trainer_data", "lora_trainer_train",
    "lora_trainer_stop", "lora_trainer_resume", "lora_trainer_progress", "lora_trainer_loss_plot",
    "lora_trainer_samples", "lora_trainer_result", "lora_trainer_send_text", "lora_trainer_send_to_txt2img",
}


def test_tab_builds_with_stable_elem_ids(tmp_path):
    tab = build_tab(tiny_host(tmp_path))
    assert isinstance(tab, gr.Blocks)
    ids = {b.elem_id: b for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    assert EXPECTED_IDS <= set(ids)
    assert all(i.startswith("lora_trainer_") for i in ids)
    assert isinstance(ids["lora_trainer_gallery"], gr.Gallery)
    assert isinstance(ids["lora_trainer_loss_plot"], gr.Plot)
    assert isinstance(ids["lora_trainer_send_to_txt2img"], gr.Button)
    assert ids["lora_trainer_send_text"].visible is False
    presets = ids["lora_trainer_preset"].choices
    labels = [c[0] if isinstance(c, (list, tuple)) else c for c in presets]
    assert any("8 GB" in label for label in labels)  # presets state their VRAM need


def test_webui_host_gets_send_to_txt2img(tmp_path):
    class WebUIHost(StandaloneHost):
        name = "a1111"

    tab = build_tab(WebUIHost(tmp_path / "Lora"), {"lora_trainer_default_preset": "sdxl"})
    s = Session(tab)
    assert tab.blocks[s.id("lora_trainer_send_to_txt2img")].value == "Send to txt2img"
    assert "sdxl" in s["lora_trainer_preset"] and "12 GB" in s["lora_trainer_preset_info"]


def test_full_flow_load_tag_edit_prepare_train(tmp_path, photos):
    from lora_trainer.tagger.demo_model import write_demo_tagger

    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs")
    s = Session(build_tab(host, jobs=jobs))

    s["lora_trainer_folder"] = str(photos)
    s.fire("lora_trainer_load")
    assert len(s["lora_trainer_gallery"]) == 3
    assert any(row[0] == "broken.png" for row in s["lora_trainer_problems"])
    assert any("small image" in row[1] for row in s["lora_trainer_problems"])  # 64 px for 512 px training
    s["lora_trainer_resolution"] = 64
    s.fire("lora_trainer_load")
    assert not any("small image" in row[1] for row in s["lora_trainer_problems"])
    assert "**3** usable image(s)" in s["lora_trainer_summary"]
    assert "3 images x" in s["lora_trainer_steps_info"]  # the `.then` steps arithmetic ran

    s["lora_trainer_tagger_model"] = str(write_demo_tagger(tmp_path / "tagger"))
    s["lora_trainer_trigger"] = "ohwx"
    s.fire("lora_trainer_tag_run")
    assert "done" in s["lora_trainer_tag_status"], s["lora_trainer_tag_status"]
    assert all(caption.startswith("ohwx") for _, caption in s["lora_trainer_gallery"])
    assert ["ohwx", 3] in s["lora_trainer_tag_freq"]

    s.fire("lora_trainer_gallery", "select", evt=types.SimpleNamespace(index=1))
    assert s["lora_trainer_caption"].startswith("ohwx")
    s["lora_trainer_caption"] = "ohwx, square, square"
    s.fire("lora_trainer_save_caption")
    assert (photos / "s1.txt").read_text().strip() == "ohwx, square"

    s["lora_trainer_bulk_action"], s["lora_trainer_bulk_tag"] = "add", "shape"
    s.fire("lora_trainer_bulk_apply")
    assert "Add 'shape': changed" in s["lora_trainer_caption_status"]
    assert all("shape" in (photos / f"s{i}.txt").read_text() for i in range(3))

    s["lora_trainer_concept"], s["lora_trainer_repeats"] = "ohwx", 1
    s.fire("lora_trainer_repeats", "change")
    assert "3 images x 1 repeats" in s["lora_trainer_steps_info"]
    s.fire("lora_trainer_prepare")
    assert "Prepared" in s["lora_trainer_prepare_status"], s["lora_trainer_prepare_status"]
    assert (Path(s["lora_trainer_data"]) / "img" / "1_ohwx").is_dir()

    s["lora_trainer_name"], s["lora_trainer_epochs"], s["lora_trainer_resolution"] = "flow", 1, 64
    s["lora_trainer_rank"], s["lora_trainer_batch_size"], s["lora_trainer_extra"] = 4, 1, TINY_EXTRA
    s["lora_trainer_sample_prompt"] = "ohwx, circle"
    s["lora_trainer_extra"] = TINY_EXTRA[:-1] + ', "sample_steps": 2}'
    s.fire("lora_trainer_plan")
    assert "Total:" in s["lora_trainer_plan_info"], s["lora_trainer_plan_info"]
    s.fire("lora_trainer_train")
    assert "LoRA ready" in s["lora_trainer_result"], (s["lora_trainer_result"], s["lora_trainer_train_status"])
    assert s["lora_trainer_send_text"] == "<lora:flow:0.8> ohwx"
    assert (host.lora_dir() / "flow.safetensors").is_file()
    assert (host.lora_dir() / "flow.preview.png").is_file()
    assert "Done" in s["lora_trainer_progress"] and "step 3/3" in s["lora_trainer_progress"]
    assert s["lora_trainer_loss_plot"].__class__.__name__ == "Figure"
    assert len(s["lora_trainer_samples"]) >= 1
    assert s["lora_trainer_job_id"] == jobs.latest("train").id


def test_bad_settings_show_the_cause_not_a_traceback(tmp_path, photos):
    s = Session(build_tab(tiny_host(tmp_path)))
    s["lora_trainer_data"], s["lora_trainer_rank"] = str(photos), 0
    s.fire("lora_trainer_train")
    assert "rank must be at least 1" in s["lora_trainer_train_status"]
    s["lora_trainer_rank"], s["lora_trainer_extra"] = 4, "{not json"
    s.fire("lora_trainer_train")
    assert "not valid JSON" in s["lora_trainer_train_status"]
    assert "Traceback" not in s["lora_trainer_train_status"]
    s["lora_trainer_folder"] = str(tmp_path / "missing")
    s.fire("lora_trainer_load")
    assert "does not exist" in s["lora_trainer_summary"]
    # a dataset the engine refuses (no <repeats>_<concept> folder): the job fails with its message
    s["lora_trainer_extra"] = TINY_EXTRA
    s["lora_trainer_resolution"], s["lora_trainer_data"] = 64, str(photos)
    s.fire("lora_trainer_train")
    assert "Training failed" in s["lora_trainer_result"]
    assert "Failed" in s["lora_trainer_progress"] and "Traceback" not in s["lora_trainer_result"]
    assert s["lora_trainer_train_status"].startswith("**Error:**")


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
    assert "outside the folders" in s["lora_trainer_caption_status"]
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
    s.fire("lora_trainer_preset", "change")
    assert s["lora_trainer_rank"] == 8 and s["lora_trainer_resolution"] == 1024
    assert "8 GB" in s["lora_trainer_preset_info"]


def test_stop_and_resume_buttons(tmp_path, photos):
    gate = threading.Event()
    host = tiny_host(tmp_path)
    jobs = JobManager(host, work_dir=tmp_path / "runs", runner=make_runner(steps=30, gate=gate))
    s = Session(build_tab(host, jobs=jobs))
    data = tmp_path / "ds" / "img" / "2_thing"
    data.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "a.png")
    s["lora_trainer_data"], s["lora_trainer_name"] = str(tmp_path / "ds"), "stopme"
    runner = threading.Thread(target=s.fire, args=("lora_trainer_train",))
    runner.start()
    deadline = time.monotonic() + 20
    # Stop once the run has started training (its plan is out), not while it still waits for the
    # GPU: a stop there ends it "before it started", with no LoRA to show.
    while (jobs.current() is None or not jobs.current().total_steps) and time.monotonic() < deadline:
        time.sleep(0.01)
    job_id = jobs.current().id
    s["lora_trainer_job_id"] = job_id
    s.fire("lora_trainer_stop")
    assert "Stopping" in s["lora_trainer_train_status"]
    gate.set()
    runner.join(20)
    assert jobs.get(job_id).state == "stopped"
    assert "Stopped" in s["lora_trainer_result"] and "Resume" in s["lora_trainer_result"]
    s.fire("lora_trainer_resume")
    assert "LoRA ready" in s["lora_trainer_result"]
    assert s["lora_trainer_job_id"] != job_id
    assert s["lora_trainer_send_text"].startswith("<lora:stopme:0.8>")
    s["lora_trainer_job_id"] = ""
    s.fire("lora_trainer_refresh")  # re-attaches to the latest run (e.g. after a page reload)
    assert "Done" in s["lora_trainer_progress"]


def test_tab_and_api_share_one_job_manager(tmp_path):
    """What the adapters do: build_tab in on_ui_tabs, mount in on_app_started, same jobs."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lora_trainer.api import mount

    host = tiny_host(tmp_path)
    tab = build_tab(host)
    app = FastAPI()
    jobs = mount(app, host)
    assert jobs is tab.lora_trainer_jobs
    client = TestClient(app)
    assert client.get("/lora-trainer/v1/status").json()["busy"] is False
