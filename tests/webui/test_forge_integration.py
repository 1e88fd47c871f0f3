"""The extension inside the real Stable Diffusion WebUI Forge (CPU, random full-size SD1.5), opt-in:

    pytest tests/webui/test_forge_integration.py --forge-dir <work>/webui [--webui-port 7872]

`<work>` is laid out as shared/harness/forge/ expects (<work>/webui = Forge at dfdcbab6 with
repositories/huggingface_guess, <work>/venv, <work>/run, the checkpoint `sd15-random.safetensors` in
webui/models/Stable-diffusion). Drives the harness scripts (install_extension.sh, launch.sh with
--always-cpu --skip-torch-cuda-test --skip-prepare-environment --api, smoke_test.py, stop.sh).
Full-size SD1.5 on 2 CPU cores is slow: 64 px images, rank 4, 2 steps; the whole module takes
about 10 minutes. LORA_TRAINER_UPDATE_SCREENSHOTS=1 writes docs/screenshots/forge-train-lora-tab.png.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from forge_family import ForgeFamilyServer
from webui_server import EXT_NAME, export_tree, harness_dir, screenshot_path

RUN = f"lf{int(time.time()) % 100000}"  # unique LoRA names for this session
PROMPT = "a photo of sks"

pytestmark = pytest.mark.webui


Forge = ForgeFamilyServer  # train(), tag_and_prepare(): shared with the Forge Neo suite


@pytest.fixture(scope="module")
def forge(forge_dir: Path, webui_port: int, tmp_path_factory: pytest.TempPathFactory):
    harness = harness_dir("forge")
    if harness is None:
        pytest.skip("shared/harness/forge not found beside the repository")
    if not (forge_dir / "modules_forge").is_dir():
        pytest.fail(f"--forge-dir {forge_dir} is not a Forge checkout (no modules_forge/)")
    ext = export_tree(tmp_path_factory.mktemp("ext") / "lora-trainer")
    # Full-size SD1.5 on 2 CPU cores: longer timeouts than A1111's tiny model.
    ui = Forge(forge_dir, webui_port, harness, ext, env_prefix="FORGE", label="Forge", ext_name=EXT_NAME,
               script_timeout=900, call_timeout=900, job_timeout=1800, poll_s=1)
    ui.refuse_other_copies()
    # No warm-up generation: Forge then has no model loaded (FakeInitialModel) until something asks.
    ui.install_and_launch(launch_env={"FORGE_NO_WARMUP": "1"})
    # Forge listens on --server-name 127.0.0.1, which the WebUI counts as "non-local": typed paths
    # must lie inside the WebUI folder, so the data goes there.
    data = forge_dir / f"lora_trainer_it_{RUN}"
    data.mkdir()
    ui.facts["data"] = data
    try:
        yield ui
    finally:
        ui.shut_down(RUN, data)


def test_install_py_changed_no_installed_package(forge: Forge):
    before, after = forge.facts["freeze_before"], forge.facts["freeze_after"]
    changed = {k: (v, after.get(k)) for k, v in set(before.items()) ^ set(after.items())}
    assert not changed, f"install.py changed installed packages: {changed}\n{forge.facts['install_output']}"
    pins = {"diffusers": "0.31.0", "peft": "0.13.2", "transformers": "4.46.1", "huggingface-hub": "0.26.2"}
    assert {k: after.get(k) for k in pins} == pins


def test_tab_and_api_with_the_forge_host(forge: Forge):
    config = forge.call("GET", "/config")
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert "Train LoRA" in tabs
    status = forge.call("GET", "/lora-trainer/v1/status")
    assert status["host"] == "forge"
    assert Path(status["lora_dir"]).resolve() == (forge.webui / "models" / "Lora").resolve()
    assert "LoRA Trainer is disabled" not in forge.log.read_text(errors="replace")


def test_tag_prepare_and_train_before_forge_loaded_its_model(forge: Forge):
    """Forge loads checkpoints lazily: training first must load the selected one itself."""
    ui = forge
    assert "Model loaded in" not in ui.log.read_text(errors="replace")
    ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_steps": 2})
    ui.tag_and_prepare(ui.facts["data"])
    lazy = ui.train(str(ui.facts["data"] / "ds"), f"{RUN}_lazy", max_steps=1)
    assert lazy["state"] == "done", (lazy["error"], lazy["message"])
    log = ui.log.read_text(errors="replace")
    loaded, trained = log.find("Model loaded in"), log.find("LoRA Trainer: training on Forge's loaded model")
    assert 0 <= loaded < trained, "the training job did not load Forge's model first"
    ui.facts["prepared"] = True


def test_train_on_the_loaded_model_and_use_the_lora(forge: Forge):
    ui = forge
    if "prepared" not in ui.facts:
        pytest.skip("needs the dataset from the previous test")
    base = ui.txt2img(PROMPT)
    name = f"{RUN}_a"
    train = ui.train(str(ui.facts["data"] / "ds"), name)
    assert train["state"] == "done", (train["error"], train["message"])
    assert train["lora_name"] == name and train["step"] == 2
    lora = ui.webui / "models" / "Lora" / f"{name}.safetensors"
    assert str(lora) in train["outputs"]
    log = ui.log.read_text(errors="replace")
    # --always-cpu: UNet and VAE are Forge's fp32 tensors; its fp16 CLIP is widened to fp32 (a copy)
    assert "LoRA Trainer: training on Forge's loaded model sd15-random (SD1, epsilon; 8" in log
    assert log.count("LoRA Trainer: Forge's model is bit-identical after training") == 2
    assert f"[LORA] Loaded {lora} for KModel-UNet with 192 keys" in log  # the A/B grid used it
    loras = {x["name"]: x for x in ui.call("GET", "/sdapi/v1/loras")}
    assert name in loras and loras[name]["metadata"]["ss_base_model_version"] == "sd_v1"

    assert (ui.txt2img(PROMPT) == base).all(), "txt2img without a LoRA changed after training"
    with_lora = ui.txt2img(f"{PROMPT} <lora:{name}:1>")
    assert (with_lora != base).mean() > 0.05
    assert (ui.txt2img(f"{PROMPT} <lora:{name}:0>") == base).all()

    # Train again while Forge has that LoRA merged into its weights (the last generation used it),
    # under the same name: the weights without LoRA are restored first, the new file gets a new name.
    ui.txt2img(f"{PROMPT} <lora:{name}:1>")
    second = ui.train(str(ui.facts["data"] / "ds"), name, learning_rate=5e-3)
    assert second["state"] == "done", (second["error"], second["message"])
    assert second["lora_name"] == f"{name}_2" and lora.is_file()
    assert ui.log.read_text(errors="replace").count("bit-identical after training") == 3
    assert (ui.txt2img(PROMPT) == base).all(), "txt2img without a LoRA changed after the second run"
    assert (ui.txt2img(f"{PROMPT} <lora:{name}:1>") == with_lora).all()
    assert not (ui.txt2img(f"{PROMPT} <lora:{name}_2:1>") == with_lora).all()
    assert not list((ui.webui / "models" / "Lora").glob("*.corrupted"))
    ui.facts["lora"] = name


def test_harness_smoke_test_passes_with_the_trained_lora(forge: Forge):
    if "lora" not in forge.facts:
        pytest.skip("needs the training test")
    res = forge.smoke_test(forge.facts["lora"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_forge_interrupt_button_stops_training_gracefully(forge: Forge):
    ui = forge
    if "lora" not in ui.facts:
        pytest.skip("needs the training test")
    base = ui.txt2img(PROMPT)
    job_id = ui.call("POST", "/lora-trainer/v1/train", {
        "data": str(ui.facts["data"] / "ds"), "name": f"{RUN}_stop", "resolution": 64, "enable_bucket": False,
        "max_steps": 500, "rank": 2, "alpha": 1})["job_id"]
    job = ui.interrupt_at(job_id, 1, timeout=600)  # Forge's own Interrupt button
    assert job["state"] == "stopped", (job["error"], job["message"])
    assert 1 <= job["step"] < 500 and job["lora_name"] and Path(job["outputs"][0]).is_file()
    assert (ui.txt2img(PROMPT) == base).all()
    ui.facts["stopped_job"] = job


def test_a_stopped_run_resumes_after_forge_restarts(forge: Forge):
    """The resume state is not read with torch.load, which Forge patches (it renames files it fails on)."""
    ui = forge
    if "stopped_job" not in ui.facts:
        pytest.skip("needs the interrupt test")
    old = ui.facts["stopped_job"]
    assert old["state_dir"], old["message"]
    ui.relaunch({"FORGE_NO_WARMUP": "1"})
    job = ui.call("GET", f"/lora-trainer/v1/jobs/{old['id']}")  # listed again from its job.json
    assert (job["state"], job["step"], job["state_dir"]) == ("stopped", old["step"], old["state_dir"])
    new_id = ui.call("POST", f"/lora-trainer/v1/jobs/{old['id']}/resume")["job_id"]
    resumed = ui.interrupt_at(new_id, old["step"] + 1, timeout=600)
    assert resumed["state"] == "stopped", (resumed["error"], resumed["message"])
    assert resumed["resumed_from"] == old["state_dir"]
    # the job carries the stopped run's loss curve on, and its first new step is the one after the stop
    n = len(old["loss_history"])
    assert resumed["loss_history"][:n] == old["loss_history"]
    assert resumed["loss_history"][n][0] == old["step"] + 1  # continued where it stopped, not restarted
    assert not list(Path(old["state_dir"]).glob("*.corrupted"))


def test_low_bit_storage_trains_from_the_checkpoint_file(forge: Forge):
    """'Diffusion in Low Bits' = fp8: no exact weights in memory, so the checkpoint file is trained."""
    ui = forge
    if "lora" not in ui.facts:
        pytest.skip("needs the training test")
    base = ui.txt2img(PROMPT)
    # forge_async_loading is a memory setting: changing it makes Forge re-read its loading parameters.
    ui.call("POST", "/sdapi/v1/options", {"forge_unet_storage_dtype": "float8-e4m3fn", "forge_async_loading": "Async",
                                          "lora_trainer_ab_grid": False})
    try:
        job = ui.train(str(ui.facts["data"] / "ds"), f"{RUN}_fp8", max_steps=1)
    finally:
        ui.call("POST", "/sdapi/v1/options", {"forge_unet_storage_dtype": "Automatic", "forge_async_loading": "Queue",
                                              "lora_trainer_ab_grid": True})
    assert job["state"] == "done", (job["error"], job["message"])
    log = ui.log.read_text(errors="replace")
    assert "storage_dtype': torch.float8_e4m3fn" in log  # Forge really reloaded in fp8
    assert "cannot train on the loaded model in place (The loaded model is stored in low bits" in log
    assert "loading sd15-random.safetensors from disk" in log
    assert (ui.txt2img(PROMPT) == base).all()  # back to Automatic: the same images as before


def test_tab_screenshot_in_headless_chromium(forge: Forge, tmp_path: Path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium (apt-get install chromium)")
    out = screenshot_path("forge-train-lora-tab.png", tmp_path)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import screenshot as s\n"
            "s.screenshot(sys.argv[2], sys.argv[3])\n"
            "print(json.dumps(s.LAST))\n")
    res = forge.screenshot(code, out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 10000
