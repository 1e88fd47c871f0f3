"""The extension inside real Forge Neo (CPU, random full-size SD1.5), opt-in:

    pytest tests/webui/test_neo_integration.py --neo-dir <work>/webui [--webui-port 7873] [--neo-model sdxl-random]
        [--neo-args=--bf16-unet]

`<work>` is laid out as shared/harness/neo/ expects (<work>/webui = the Neo tree, <work>/venv, <work>/run,
the checkpoint `sd15-random.safetensors` (and for `--neo-model sdxl-random` the SDXL one, written by
random_checkpoint.py) in webui/models/Stable-diffusion; docs/forge.md has the commit and the steps). Drives the harness scripts (install_extension.sh, launch.sh with --cpu
--skip-prepare-environment --skip-install --api, smoke_test.py, stop.sh); shares its steps with the Forge
suite (forge_family.py). About 15 minutes on 2 CPU cores. LORA_TRAINER_UPDATE_SCREENSHOTS=1 writes
docs/screenshots/neo-train-lora-tab.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from forge_family import ForgeFamilyServer
from webui_server import EXT_NAME, export_tree, harness_dir, screenshot_path

RUN = f"ln{int(time.time()) % 100000}"  # unique LoRA names for this session
PROMPT = "a photo of sks"
# Neo 3df257ae's requirements.txt pins (the harness venv keeps them; install.py must too).
NEO_PINS = {"diffusers": "0.36.0", "peft": "0.17.1", "transformers": "4.56.2", "huggingface-hub": "0.34.6",
            "numpy": "2.3.5", "gradio": "4.40.0", "safetensors": "0.7.0", "accelerate": "1.12.0"}

# What differs between the two families the suite runs on (kohya module counts: UNet, text encoders), and the
# memory (RAM + swap, `_total_ram_gib`) it takes to *use* a LoRA in Neo on the CPU (`use_lora_gib`, by how Neo
# stores the UNet): Neo keeps the UNet in fp32 there unless told otherwise, and merges a LoRA into it with a
# backup of every patched weight (on the fly only for low-bit storage). Measured with SDXL on a 24 GiB machine
# with 24 GiB of swap (2026-12-05, the whole suite passing): UNet in fp32, the Neo process peaked at 35.0 GiB
# (anonymous RSS + swapped out; 16.9 GiB of swap in use); with --bf16-unet at 21.9-24.2 GiB (1.4-4.5 GiB of
# swap in use; docs/forge.md, Neo "Results"). So below 36 GiB of RAM + swap the SDXL run launches Neo with
# --bf16-unet (HALF_UNET_ARGS): the UNet stored in bf16, as Neo stores it on a GPU (fp16/bf16), half the
# memory; our hand-off then reads its Linears in place and widens them one layer at a time. Below
# `use_lora_gib` the run trains and checks everything but generating with the LoRA (A/B grid off, no
# `<lora:…>` images, no smoke test); below `fp8_file_gib` it skips the fp8 fallback, which loads the
# checkpoint file beside Neo's own copy.
MODELS = {
    "sd15-random": {"family": "SD1", "card": "sd", "base_version": "sd_v1", "unet_keys": 192, "clip_keys": 72,
                    "use_lora_gib": {"fp32": 16, "bf16": 12, "fp16": 12}, "fp8_file_gib": 16, "smoke_max_s": 60,
                    "lora_changes": 0.05},
    "sdxl-random": {"family": "SDXL", "card": "xl", "base_version": "sdxl_base_v1-0", "unet_keys": 722,
                    "clip_keys": 264, "use_lora_gib": {"fp32": 36, "bf16": 28, "fp16": 28}, "fp8_file_gib": 28,
                    "smoke_max_s": 300, "lora_changes": 0.005},
}
HALF_UNET_ARGS = "--bf16-unet"
UNET_FLAGS = {"--bf16-unet": "bf16", "--fp16-unet": "fp16", "--fp32-unet": "fp32"}
TORCH_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}

pytestmark = pytest.mark.webui


@pytest.fixture(scope="module")
def neo(neo_dir: Path, neo_model: str, neo_args: str | None, webui_port: int,
        tmp_path_factory: pytest.TempPathFactory):
    harness = harness_dir("neo")
    if harness is None:
        pytest.skip("shared/harness/neo not found beside the repository")
    if not (neo_dir / "modules_forge" / "packages" / "huggingface_guess").is_dir():
        pytest.fail(f"--neo-dir {neo_dir} is not a Forge Neo tree (no modules_forge/packages/huggingface_guess)")
    ext = export_tree(tmp_path_factory.mktemp("ext") / "lora-trainer")
    ui = ForgeFamilyServer(neo_dir, webui_port, harness, ext, env_prefix="NEO", label="Forge Neo",
                           ext_name=EXT_NAME, script_timeout=900, call_timeout=900, job_timeout=1800, poll_s=1)
    if neo_model not in MODELS or not (neo_dir / "models" / "Stable-diffusion" / f"{neo_model}.safetensors").is_file():
        pytest.fail(f"--neo-model {neo_model}: needs one of {sorted(MODELS)} in models/Stable-diffusion")
    ui.facts.update(MODELS[neo_model], model=neo_model)
    if neo_args is None:
        fp32_gib = MODELS[neo_model]["use_lora_gib"]["fp32"]
        neo_args = HALF_UNET_ARGS if neo_model == "sdxl-random" and _total_ram_gib() < fp32_gib else ""
    storage = [UNET_FLAGS[a] for a in neo_args.split() if a in UNET_FLAGS]
    ui.facts["unet_storage"] = storage[-1] if storage else "fp32"  # Neo's choice on the CPU: fp32
    # No warm-up generation: Neo then has no model loaded until something asks (lazy, as Forge).
    ui.facts["launch_env"] = {"NEO_NO_WARMUP": "1", "MODEL_NAME": neo_model, "NEO_EXTRA_ARGS": neo_args}
    ui.refuse_other_copies()
    ui.install_and_launch(launch_env=ui.facts["launch_env"])
    # A second name for the same file: switching checkpoints is how Neo's API re-reads "Diffusion in Low
    # Bits" (set_config does not); selecting one loads nothing yet.
    folder = neo_dir / "models" / "Stable-diffusion"
    alias = folder / f"{RUN}_same_file.safetensors"
    alias.symlink_to(folder / f"{neo_model}.safetensors")
    ui.facts["alias"] = alias.stem
    ui.call("POST", "/sdapi/v1/refresh-checkpoints")
    _reload_with_storage(ui, "Automatic")
    ui.facts["use_lora_gib"] = ui.facts["use_lora_gib"][ui.facts["unet_storage"]]
    ui.facts["use_lora"] = _total_ram_gib() >= ui.facts["use_lora_gib"]
    ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_grid": ui.facts["use_lora"]})
    # --server-name 127.0.0.1 counts as "non-local" for the WebUI: typed paths must lie in its folder.
    data = neo_dir / f"lora_trainer_it_{RUN}"
    data.mkdir()
    ui.facts["data"] = data
    try:
        yield ui
    finally:
        with contextlib.suppress(AssertionError, OSError):  # Neo may be down already; shut_down cleans up
            # the next harness user finds Neo's defaults (its config.json keeps what the API set)
            defaults = {"forge_unet_storage_dtype": "Automatic", "lora_trainer_ab_grid": True}
            if (folder / "sd15-random.safetensors").is_file():  # the harness's default model, where present
                defaults["sd_model_checkpoint"] = "sd15-random"
            ui.call("POST", "/sdapi/v1/options", defaults, timeout=60)
        for f in folder.glob(f"{RUN}*"):
            f.unlink()
        ui.shut_down(RUN, data)


def test_install_py_adds_only_what_is_missing_and_changes_nothing(neo: ForgeFamilyServer):
    changed, added = neo.changed_packages()
    out = neo.facts["install_output"]
    assert not changed, f"install.py changed installed packages: {changed}\n{out}"
    assert {k: neo.facts["freeze_after"].get(k) for k in NEO_PINS} == NEO_PINS
    if added:  # the harness venv has no onnxruntime (Neo installs it only for its ControlNet preprocessors)
        assert "adding missing packages" in out and re.search(r"installed .*onnxruntime==1\.", out), out
        assert set(added) <= {"onnxruntime", "flatbuffers", "coloredlogs", "humanfriendly", "sympy", "mpmath"}, added
    else:
        assert "adding" not in out
    # Neo's own flag for "install nothing", as webui-user passes it (COMMANDLINE_ARGS), is honoured.
    res = subprocess.run([str(neo.python), str(neo.ext_dir / "install.py")], cwd=neo.webui, capture_output=True,
                         text=True, timeout=300, check=False,
                         env={**neo.env, "COMMANDLINE_ARGS": "--cpu --skip-install", "PYTHONPATH": str(neo.webui)})
    assert res.returncode == 0 and "--skip-install given: not checking or installing packages" in res.stdout
    assert neo.freeze() == neo.facts["freeze_after"]


def test_tab_api_and_which_forge_this_is(neo: ForgeFamilyServer):
    config = neo.call("GET", "/config")
    tabs = [c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"]
    assert "Train LoRA" in tabs
    host_info = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "lora_trainer_host_info"]
    assert host_info and "**Forge Neo**" in host_info[0]["props"]["value"]
    status = neo.call("GET", "/lora-trainer/v1/status")
    assert (status["host"], status["host_kind"]) == ("forge", "neo")
    assert "trains on the loaded model" in status["host_description"]
    assert Path(status["lora_dir"]).resolve() == (neo.webui / "models" / "Lora").resolve()
    log = neo.log_text()
    assert "LoRA Trainer: host Forge Neo: SD1, SDXL, FLUX.1; trains on the loaded model" in log
    assert "LoRA Trainer is disabled" not in log


def test_tag_prepare_and_train_before_neo_loaded_its_model(neo: ForgeFamilyServer):
    """Neo loads checkpoints lazily: training first must load the selected one itself."""
    ui = neo
    assert "Model loaded in" not in ui.log_text()
    ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_steps": 2})
    ds = ui.tag_and_prepare(ui.facts["data"])
    lazy = ui.train(str(ds), f"{RUN}_lazy", max_steps=1)
    assert lazy["state"] == "done", (lazy["error"], lazy["message"])
    log = ui.log_text()
    loaded, trained = log.find("Model loaded in"), log.find("LoRA Trainer: training on Forge's loaded model")
    assert 0 <= loaded < trained, "the training job did not load Neo's model first"
    ui.facts["prepared"] = ds


def _lora_lines(log: str, stem: str) -> list[str]:
    return [ln.strip() for ln in log.splitlines() if "[LORA]" in ln and f"{stem}.safetensors" in ln]


def test_train_on_the_loaded_model_and_find_the_lora_in_neo(neo: ForgeFamilyServer):
    ui = neo
    if "prepared" not in ui.facts:
        pytest.skip("needs the dataset from the previous test")
    base = ui.txt2img(PROMPT)
    name = f"{RUN}_a"
    train = ui.train(str(ui.facts["prepared"]), name)
    assert train["state"] == "done", (train["error"], train["message"])
    assert train["lora_name"] == name and train["step"] == 2 and not train["notes"]
    f = ui.facts
    lora = ui.webui / "models" / "Lora" / f"{name}.safetensors"
    assert str(lora) in train["outputs"]
    log = ui.log_text()
    storage = f["unet_storage"]
    assert re.search(rf"Using (Default|Override) Model Data Type: {TORCH_DTYPES[storage]}", log)  # what Neo holds
    # --cpu: the VAE is Neo's fp32 tensors, shared; so is an fp32 UNet. Neo's fp16 CLIP (and a bf16/fp16 UNet):
    # the Linears read in place and widened to fp32 per layer; the small rest (embeddings, norms, convs) copied
    widened = "text encoders fp16" if storage == "fp32" else f"UNet {storage}, text encoders fp16"
    assert re.search(rf"LoRA Trainer: training on Forge's loaded model {f['model']} \({f['family']}, epsilon; \d+% of "
                     rf"the weights shared with Forge, .*; Linear weights read in place \({widened}\) and widened to "
                     r"fp32 one layer at a time\)", log), log[-3000:]
    assert log.count("LoRA Trainer: Forge's model is bit-identical after training") == 2
    loras = {x["name"]: x for x in ui.call("GET", "/sdapi/v1/loras")}
    assert name in loras and loras[name]["metadata"]["ss_base_model_version"] == f["base_version"]
    # the card: Neo names SD1 "sd", SDXL "xl" (its presets), so its metadata editor and preset filter know it
    meta = json.loads(lora.with_suffix(".json").read_text())
    assert meta["sd version"] == f["card"] and meta["activation text"].startswith("sks")
    query = urllib.parse.urlencode({"page": "lora", "tabname": "txt2img", "name": name})
    card = ui.call("GET", f"/sd_extra_networks/get-single-card?{query}")["html"]
    assert name in card and "0.8" in card

    assert (ui.txt2img(PROMPT) == base).all(), "txt2img without a LoRA changed after training"
    ui.facts["base"] = base
    ui.facts["trained"] = name


def test_the_lora_changes_the_image_and_neo_matches_every_key(neo: ForgeFamilyServer):
    ui, f = neo, neo.facts
    if "trained" not in f:
        pytest.skip("needs the training test")
    if not f["use_lora"]:
        pytest.skip(f"generating with a {f['family']} LoRA in Neo on the CPU needs about {f['use_lora_gib']} GiB "
                    f"of RAM + swap ({_total_ram_gib():.0f} here; see MODELS)")
    name, base = f["trained"], f["base"]
    with_lora = ui.txt2img(f"{PROMPT} <lora:{name}:1>")
    # share of pixel values the LoRA changes (SD1.5 fp32: nearly all; the random SDXL with a bf16 UNet, 64 px,
    # 2 steps: 1.6% in Neo 3df257ae); `:0` and no LoRA must stay exactly the base image
    changed = (with_lora != base).mean()
    print(f"<lora:{name}:1> changed {changed:.2%} of the pixel values ({f['model']}, UNet {f['unet_storage']})")
    assert changed > f["lora_changes"]
    assert (ui.txt2img(f"{PROMPT} <lora:{name}:0>") == base).all()
    assert (ui.txt2img(PROMPT) == base).all()
    # Neo's loader matched every key (A/B grid and the calls above): no "unmatched", no "mismatch"
    lines = _lora_lines(ui.log_text(), name)
    assert any(f"for KModel-UNet with {f['unet_keys']} keys at weight" in ln and "(skipped 0 keys)" in ln
               for ln in lines), lines
    assert any(f"for KModel-CLIP with {f['clip_keys']} keys at weight" in ln and "(skipped 0 keys)" in ln
               for ln in lines), lines
    assert not [ln for ln in lines if "unmatched" in ln or "mismatch" in ln.lower()], lines
    ui.facts["lora"] = name


def test_harness_smoke_test_passes_with_the_trained_lora(neo: ForgeFamilyServer):
    if "lora" not in neo.facts:
        pytest.skip("needs the training test")
    res = neo.smoke_test(neo.facts["lora"], "--model", neo.facts["model"], "--max-seconds", str(neo.facts["smoke_max_s"]))
    print(res.stdout[-3000:])  # its findings (pytest -rP shows them)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_neo_interrupt_button_stops_training_gracefully(neo: ForgeFamilyServer):
    ui = neo
    if "base" not in ui.facts:
        pytest.skip("needs the training test")
    job_id = ui.call("POST", "/lora-trainer/v1/train", {
        "data": str(ui.facts["prepared"]), "name": f"{RUN}_stop", "resolution": 64, "enable_bucket": False,
        "max_steps": 500, "rank": 2, "alpha": 1})["job_id"]
    ui.wait_step(job_id, 1)
    # A txt2img sent now waits for Neo's queue lock, which the training run holds: training goes on
    # (the step count moves) while the request is pending, and the image comes after the run stopped.
    generated: list = []
    request = threading.Thread(target=lambda: generated.append(ui.txt2img(PROMPT)), daemon=True)
    request.start()
    moved_on = ui.wait_step(job_id, ui.call("GET", f"/lora-trainer/v1/jobs/{job_id}")["step"] + 2)
    assert request.is_alive() and not generated, "txt2img ran while the training run held the GPU"
    job = ui.interrupt_at(job_id, moved_on, timeout=600)  # Neo's own Interrupt (the progress bar's button)
    assert job["state"] == "stopped", (job["error"], job["message"])
    assert 1 <= job["step"] < 500 and job["lora_name"] and Path(job["outputs"][0]).is_file()
    request.join(600)
    assert generated and (generated[0] == ui.facts["base"]).all()  # the waiting request got the usual image
    assert (ui.txt2img(PROMPT) == ui.facts["base"]).all()
    ui.facts["stopped_job"] = job


def test_a_stopped_run_resumes_after_neo_restarts(neo: ForgeFamilyServer):
    ui = neo
    if "stopped_job" not in ui.facts:
        pytest.skip("needs the interrupt test")
    old = ui.facts["stopped_job"]
    assert old["state_dir"], old["message"]
    ui.relaunch(ui.facts["launch_env"])
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
    assert (ui.txt2img(PROMPT) == ui.facts["base"]).all()  # the same image after a restart, too


def _total_ram_gib() -> float:
    """What the machine can hold: physical RAM + swap (SwapTotal of /proc/meminfo; 0 where unreadable)."""
    swap_kib = 0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                swap_kib = int(line.split()[1])
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") + swap_kib * 1024) / 2**30


def _reload_with_storage(ui: ForgeFamilyServer, dtype: str) -> None:
    """Neo's API sets "Diffusion in Low Bits" without re-reading its loading parameters; a checkpoint
    change does re-read them, so switch to a second name of the same file and back."""
    ui.call("POST", "/sdapi/v1/options", {"forge_unet_storage_dtype": dtype})
    ui.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": ui.facts["alias"]})
    ui.call("POST", "/sdapi/v1/options", {"sd_model_checkpoint": ui.facts["model"]})


def test_fp8_storage_trains_from_the_checkpoint_file_and_says_so(neo: ForgeFamilyServer):
    ui = neo
    if "base" not in ui.facts:
        pytest.skip("needs the training test")
    if _total_ram_gib() < ui.facts["fp8_file_gib"]:
        # the fallback loads the checkpoint file while Neo keeps its own (fp8) copy in RAM
        pytest.skip(f"{ui.facts['family']} from the file beside Neo's loaded model needs about "
                    f"{ui.facts['fp8_file_gib']} GiB of RAM + swap ({_total_ram_gib():.0f} here)")
    ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_grid": False})
    _reload_with_storage(ui, "float8-e4m3fn")
    try:
        job = ui.train(str(ui.facts["prepared"]), f"{RUN}_fp8", max_steps=1)
    finally:
        _reload_with_storage(ui, "Automatic")
        ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_grid": ui.facts["use_lora"]})
    assert job["state"] == "done", (job["error"], job["message"])
    log = ui.log_text()
    assert "Using Override Model Data Type: torch.float8_e4m3fn" in log  # Neo really loaded it in fp8
    note = ("cannot train on the loaded model in place (The loaded model is stored in low bits (UNet in fp8 "
            "e4m3fn")
    assert job["notes"] and job["notes"][0].startswith(note), job["notes"]  # the tab shows job notes
    assert f"loading {ui.facts['model']}.safetensors from disk instead" in job["notes"][0]
    assert note in log
    assert (ui.txt2img(PROMPT) == ui.facts["base"]).all()  # back to Automatic: the same images as before


def test_tab_screenshot_in_headless_chromium(neo: ForgeFamilyServer, tmp_path: Path):
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium (apt-get install chromium)")
    out = screenshot_path("neo-train-lora-tab.png", tmp_path) if neo.facts["family"] == "SD1" else tmp_path / "tab.png"
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import screenshot as s\n"
            "s.screenshot(sys.argv[2], sys.argv[3])\n"
            "print(json.dumps(s.LAST))\n")
    res = neo.screenshot(code, out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 10000
