"""The extension inside the real AUTOMATIC1111 v1.10.1 (CPU, tiny checkpoint), opt-in:

    pytest tests/webui --webui-dir <work>/webui [--webui-port 7871]

Drives shared/harness/a1111/ (install_extension.sh, launch.sh, smoke_test.py, stop.sh). The WebUI
folder must not lie below a dot-folder (e.g. ~/.cache): Gradio 3.41 then refuses to serve the
WebUI's own JavaScript, and the browser checks fail. Set LORA_TRAINER_UPDATE_SCREENSHOTS=1 to write
the tab's screenshot into docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from webui_server import EXT_NAME, ROOT, WebUIServer, export_tree, harness_dir, screenshot_path

pytestmark = pytest.mark.webui

RUN = f"lt{int(time.time()) % 100000}"  # unique LoRA names for this session


@pytest.fixture(scope="module")
def a1111(webui_dir: Path, webui_port: int, tmp_path_factory: pytest.TempPathFactory):
    harness = harness_dir("a1111")
    if harness is None:
        pytest.skip("shared/harness/a1111 not found beside the repository")
    if any(part.startswith(".") for part in webui_dir.parts):
        pytest.fail(f"{webui_dir} lies below a dot-folder; Gradio 3.41 will not serve the WebUI's JavaScript "
                    "from there. Move the harness work folder (A1111_WORK) to a plain path.")
    ext = export_tree(tmp_path_factory.mktemp("ext") / "lora-trainer")
    ui = WebUIServer(webui_dir, webui_port, harness, ext, env_prefix="A1111", label="WebUI", ext_name=EXT_NAME,
                     script_timeout=600, call_timeout=600, job_timeout=900, poll_s=0.5)
    ui.refuse_other_copies()
    ui.install_and_launch()
    ui.facts["data"] = tmp_path_factory.mktemp("data")
    try:
        yield ui
    finally:
        ui.shut_down(RUN)


def _make_dataset(ui: WebUIServer) -> tuple[Path, Path]:
    """Images in a folder and a demo WD14 tagger (ONNX, built here: the WebUI venv lacks `onnx`)."""
    from lora_trainer.commands.demo import make_images
    from lora_trainer.tagger.demo_model import write_demo_tagger

    raw = ui.facts["data"] / "raw"
    make_images(raw, 4, 1)
    tagger = write_demo_tagger(ui.facts["data"] / "tagger")
    return raw, tagger


def test_install_py_changed_no_installed_package(a1111: WebUIServer):
    before, after = a1111.facts["freeze_before"], a1111.facts["freeze_after"]
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert not changed, f"install.py changed installed packages: {changed}\n{a1111.facts['install_output']}"
    for name in ("diffusers", "peft", "onnxruntime"):
        assert name in after, a1111.facts["install_output"]
    assert "onnxruntime-gpu" not in after


def test_tab_and_settings_are_registered(a1111: WebUIServer):
    config = a1111.call("GET", "/config")
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert "Train LoRA" in tabs
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert "lora_trainer_send_to_txt2img" in ids
    assert any(str(i).startswith("setting_lora_trainer_") for i in ids), "no LoRA Trainer settings"
    status = a1111.call("GET", "/lora-trainer/v1/status")
    assert status["host"] == "a1111"
    assert Path(status["lora_dir"]).resolve() == (a1111.webui / "models" / "Lora").resolve()


def test_tag_prepare_train_on_the_loaded_model_and_use_the_lora(a1111: WebUIServer):
    ui = a1111
    ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_steps": 3})
    base = ui.txt2img("sks")
    raw, tagger = _make_dataset(ui)
    tag = ui.wait_job(ui.call("POST", "/lora-trainer/v1/tag", {"data": str(raw), "model": str(tagger),
                                                             "trigger": "sks"})["job_id"])
    assert tag["state"] == "done", (tag["error"], tag["message"])
    assert all((raw / f"shape_{i:02d}.txt").read_text().startswith("sks") for i in range(4))
    prep = ui.wait_job(ui.call("POST", "/lora-trainer/v1/prepare", {
        "source": str(raw), "out": str(ui.facts["data"] / "ds"), "concept": "sks", "repeats": 2,
        "resolution": 64})["job_id"])
    assert prep["state"] == "done", (prep["error"], prep["message"])
    name = f"{RUN}_a"
    train = ui.wait_job(ui.call("POST", "/lora-trainer/v1/train", {
        "data": prep["result"]["data"], "name": name, "resolution": 64, "enable_bucket": False, "epochs": 2,
        "save_every_n_epochs": 1, "rank": 4, "alpha": 4, "learning_rate": 1e-2, "train_text_encoder": True,
        "sample_prompts": ["sks"], "sample_every_n_epochs": 2, "sample_steps": 3})["job_id"])
    assert train["state"] == "done", (train["error"], train["message"])
    assert train["lora_name"] == name
    lora = ui.webui / "models" / "Lora" / f"{name}.safetensors"
    assert str(lora) in train["outputs"]
    meta = json.loads(lora.with_suffix(".json").read_text())
    assert meta["sd version"] == "SD1" and meta["activation text"] == "sks" and meta["preferred weight"] == 0.8
    grid = lora.with_name(f"{name}.ab-grid.png")
    assert str(grid) in train["outputs"] and grid.is_file()  # final + 1 intermediate epoch, 4 columns
    from PIL import Image

    assert Image.open(grid).size == (160 + 4 * 64, 28 + 2 * 64)
    if os.environ.get("LORA_TRAINER_UPDATE_SCREENSHOTS") == "1":
        shutil.copy2(grid, ROOT / "docs" / "screenshots" / "a1111-ab-grid.png")
    log = ui.log.read_text(errors="replace")
    assert "training on the loaded model tiny-sd15" in log
    assert "the WebUI's model is bit-identical after training" in log
    loras = {x["name"]: x for x in ui.call("GET", "/sdapi/v1/loras")}
    assert name in loras and loras[name]["metadata"]["ss_base_model_version"] == "sd_v1"

    with_lora = ui.txt2img(f"sks <lora:{name}:1>")
    assert (with_lora != base).mean() > 0.05
    assert (ui.txt2img(f"sks <lora:{name}:0>") == base).all()
    assert (ui.txt2img("sks") == base).all()

    # Train again while the Lora extension has LoRA `name` merged into the weights (last generation
    # used it): the adapter must take it off first, and the WebUI's model must end up as it was.
    ui.txt2img(f"sks <lora:{name}:1>")
    second = ui.wait_job(ui.call("POST", "/lora-trainer/v1/train", {
        "data": prep["result"]["data"], "name": f"{RUN}_b", "resolution": 64, "enable_bucket": False,
        "max_steps": 3, "rank": 2, "alpha": 1})["job_id"])
    assert second["state"] == "done", (second["error"], second["message"])
    assert "took the applied LoRA off" in ui.log.read_text(errors="replace")
    assert (ui.txt2img("sks") == base).all(), "txt2img without a LoRA changed after training"
    assert (ui.txt2img(f"sks <lora:{name}:1>") == with_lora).all()
    ui.facts["lora"] = name


def test_tab_in_a_browser_send_to_txt2img_and_screenshot(a1111: WebUIServer, tmp_path: Path):
    if "lora" not in a1111.facts:
        pytest.skip("needs the training test")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium (apt-get install chromium)")
    out = screenshot_path("a1111-train-lora-tab.png", tmp_path)
    code = (
        "import sys, time, json; sys.path.insert(0, sys.argv[1]); import screenshot as s\n"
        "url, out = sys.argv[2], sys.argv[3]\n"
        "s.screenshot(url, out, scroll_to=None, click='#lora_trainer_refresh',"
        " wait_for=\"#lora_trainer_send_text textarea\")\n"
        "print(json.dumps(s.LAST))\n")
    res = a1111.screenshot(code, out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert out.is_file() and out.stat().st_size > 10000
    assert "<lora:" in facts["send_text"], facts
    assert facts["lora_cards_refreshes"] >= 1, facts  # a new LoRA showed up: the cards were reloaded
    assert facts["send_text"] in facts["txt2img_prompt"], facts  # "Send to txt2img" filled the prompt
    assert facts["active_tab"] == "txt2img", facts


def test_interrupt_stops_training_gracefully_and_txt2img_still_works(a1111: WebUIServer):
    ui = a1111
    if "lora" not in ui.facts:
        pytest.skip("needs the training test")
    base = ui.txt2img("sks")
    job_id = ui.call("POST", "/lora-trainer/v1/train", {
        "data": str(ui.facts["data"] / "ds"), "name": f"{RUN}_c", "resolution": 64, "enable_bucket": False,
        "epochs": 200, "rank": 2, "alpha": 1, "save_every_n_epochs": 1})["job_id"]
    job = ui.interrupt_at(job_id, 10, timeout=300)  # the WebUI's own Interrupt button
    assert job["state"] == "stopped", (job["error"], job["message"])
    assert job["lora_name"] and Path(job["outputs"][0]).is_file()  # the last good save is kept
    assert not any(o.endswith(".ab-grid.png") for o in job["outputs"])
    assert (ui.txt2img("sks") == base).all()
    ui.facts["stopped_job"] = job


def test_a_stopped_run_resumes_after_the_webui_restarts(a1111: WebUIServer):
    ui = a1111
    if "stopped_job" not in ui.facts:
        pytest.skip("needs the interrupt test")
    old = ui.facts["stopped_job"]
    assert old["state_dir"], old["message"]
    ui.relaunch()
    job = ui.call("GET", f"/lora-trainer/v1/jobs/{old['id']}")  # listed again from its job.json
    assert (job["state"], job["step"], job["state_dir"]) == ("stopped", old["step"], old["state_dir"])
    new_id = ui.call("POST", f"/lora-trainer/v1/jobs/{old['id']}/resume")["job_id"]
    resumed = ui.interrupt_at(new_id, old["step"] + 3, timeout=300)
    assert resumed["state"] == "stopped", (resumed["error"], resumed["message"])
    assert resumed["resumed_from"] == old["state_dir"]
    # the job carries the stopped run's loss curve on, and its first new step is the one after the stop
    n = len(old["loss_history"])
    assert resumed["loss_history"][:n] == old["loss_history"]
    assert resumed["loss_history"][n][0] == old["step"] + 1  # continued where it stopped, not restarted
    assert resumed["step"] > old["step"] and Path(resumed["outputs"][0]).is_file()


def test_harness_smoke_test_passes_with_the_trained_lora(a1111: WebUIServer):
    if "lora" not in a1111.facts:
        pytest.skip("needs the training test")
    res = a1111.smoke_test(a1111.facts["lora"], "--webui", str(a1111.webui))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
