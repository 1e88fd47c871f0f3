"""A Flux LoRA trained on the Flux that lllyasviel's Forge main has loaded (CPU, random FLUX.1-dev), opt-in:

    pytest tests/webui/test_forge_flux_integration.py --forge-dir <work>/webui [--webui-port 7875]

`<work>` is laid out as shared/harness/forge/ expects (Forge main at dfdcbab6, see test_forge_integration.py),
with a random Flux set in its models folder. Forge main builds every Flux transformer at the full FLUX.1 depth
(huggingface_guess sets depth 19 / 38 single blocks whatever the file holds), so the transformer must be a
full-depth one: the Neo harness's writer with `--double 19 --single 38 --flux-dtype float8_e4m3fn` writes it
(11.9 B params, 11.1 GiB as fp8 e4m3fn, which Forge keeps as fp8: "Using Detected UNet Type"), beside the VAE,
CLIP-L and the fp8 T5-XXL (docs/forge.md, "Flux in lllyasviel's Forge main", has the commands):

    models/Stable-diffusion/flux1-dev-full-random-fp8.safetensors
    models/VAE/flux-ae-random.safetensors
    models/text_encoder/clip_l-random.safetensors, t5xxl_fp8_e4m3fn-random.safetensors

Checks, through the API only: install; train on the loaded Flux (transformer fp8 as stored, trained over in
place); Forge's weights bit-identical afterwards and the no-LoRA image identical before and after;
`<lora:n:1>` changes the image, `<lora:n:0>` equals none, every key matched in Forge's log ("skipped 0 keys",
nothing unmatched). Forge main merges LoRAs into fp8 weights (no "(fp16 LoRA)"), so the run's notes must say so;
with "Automatic (fp16 LoRA)" (what that note advises) the run has no such note and Forge applies the LoRA on the fly.

A full FLUX.1 on 2 CPU cores: Forge holds ~17 GiB (the fp8 transformer and T5 in RAM), so give the machine
swap; one prompt throughout (each new prompt or LoRA set costs a T5-XXL pass), 64 px, 2 steps, CFG 1,
Euler + Simple (Euler + "Automatic" gives NaN on Flux), training 1 step. About 30 minutes (docs/forge.md).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import pytest
from forge_family import FluxForgeFamilyServer
from webui_server import EXT_NAME, export_tree, harness_dir

RUN = f"lff{int(time.time()) % 100000}"  # unique LoRA names for this session
PROMPT = "a photo of sks"
MODEL = "flux1-dev-full-random-fp8"
MODULES = ["flux-ae-random.safetensors", "clip_l-random.safetensors", "t5xxl_fp8_e4m3fn-random.safetensors"]
TRAIN = {"t5_max_token_length": 32, "train_text_encoder": True, "max_steps": 1}

pytestmark = pytest.mark.webui


def _files(webui: Path) -> list[Path]:
    models = webui / "models"
    return [models / "Stable-diffusion" / f"{MODEL}.safetensors", models / "VAE" / MODULES[0],
            models / "text_encoder" / MODULES[1], models / "text_encoder" / MODULES[2]]


FluxForge = FluxForgeFamilyServer  # txt2img with Flux settings, lora_lines: shared with the Neo Flux suite


@pytest.fixture(scope="module")
def forge_flux(forge_dir: Path, webui_port: int, tmp_path_factory: pytest.TempPathFactory):
    harness = harness_dir("forge")
    if harness is None:
        pytest.skip("shared/harness/forge not found beside the repository")
    if not (forge_dir / "modules_forge").is_dir():
        pytest.fail(f"--forge-dir {forge_dir} is not a Forge checkout (no modules_forge/)")
    missing = [str(p) for p in _files(forge_dir) if not p.is_file()]
    if missing:
        pytest.skip(f"no full-depth random Flux set in {forge_dir} ({missing[0]}): see docs/forge.md, "
                    "\"Flux in lllyasviel's Forge main\"")
    ext = export_tree(tmp_path_factory.mktemp("ext") / "lora-trainer")
    ui = FluxForge(forge_dir, webui_port, harness, ext, env_prefix="FORGE", label="Forge", ext_name=EXT_NAME,
                   script_timeout=900, call_timeout=3600, job_timeout=5400, poll_s=5)
    ui.refuse_other_copies()
    ui.install_and_launch(launch_env={"MODEL_NAME": MODEL, "FORGE_NO_WARMUP": "1"})
    keys = ("forge_additional_modules", "lora_trainer_ab_grid")
    before = {k: v for k, v in ui.call("GET", "/sdapi/v1/options").items() if k in keys}
    # the A/B grid would cost T5 passes and full-size Flux steps: off; the images below check the LoRA instead
    ui.call("POST", "/sdapi/v1/options", {"forge_additional_modules": MODULES, "lora_trainer_ab_grid": False})
    data = forge_dir / f"lora_trainer_it_{RUN}"  # --server-name 127.0.0.1: paths must lie in the WebUI's folder
    data.mkdir()
    ui.facts["data"] = data
    try:
        yield ui
    finally:
        with contextlib.suppress(AssertionError, OSError):
            ui.call("POST", "/sdapi/v1/options", before, timeout=60)
        ui.shut_down(RUN, data)


def test_install_and_the_tab_in_forge_with_flux_selected(forge_flux: FluxForge):
    changed, _added = forge_flux.changed_packages()
    assert not changed, f"install.py changed installed packages: {changed}\n{forge_flux.facts['install_output']}"
    status = forge_flux.call("GET", "/lora-trainer/v1/status")
    assert (status["host"], status["host_kind"]) == ("forge", "forge")
    tabs = [c["props"].get("label") for c in forge_flux.call("GET", "/config")["components"]
            if c.get("type") == "tabitem"]
    assert "Train LoRA" in tabs


def test_train_on_the_loaded_full_flux_and_forge_is_unchanged(forge_flux: FluxForge):
    ui = forge_flux
    ui.facts["prepared"] = ui.tag_and_prepare(ui.facts["data"])
    t0 = time.monotonic()
    base = ui.txt2img(PROMPT)  # loads the Flux set (transformer + VAE + CLIP-L + T5)
    t1 = time.monotonic()
    log = ui.log_text()
    assert "Model loaded in" in log and "Using Detected UNet Type: torch.float8_e4m3fn" in log, log[-3000:]
    assert "IntegratedFluxTransformer2DModel Missing" not in log, "Forge loaded the transformer incompletely"
    name = f"{RUN}_fp8"
    start = len(log)
    job = ui.wait_job(ui.call("POST", "/lora-trainer/v1/train", {
        "data": str(ui.facts["prepared"]), "name": name, "resolution": 64, "enable_bucket": False, "rank": 4,
        "alpha": 4, "learning_rate": 1e-2, **TRAIN})["job_id"])
    t2 = time.monotonic()
    assert job["state"] == "done", (job["error"], job["message"])
    assert job["lora_name"] == name and job["step"] == TRAIN["max_steps"]
    log = ui.log_text()[start:]
    line = re.search(r"LoRA Trainer: training on Forge's loaded Flux model (.*)", log)
    assert line and "(dev; transformer fp8 e4m3fn, CLIP-L fp16, T5 fp8 e4m3fn; " in line.group(1), log[-3000:]
    assert "Trains on the loaded Flux model as Forge holds it" in job["notes"][0], job["notes"]
    # Forge main merges LoRAs into fp8 weights unless "(fp16 LoRA)" is chosen: the run says how to avoid it
    assert [n for n in job["notes"] if "merging them into its fp8 e4m3fn" in n], job["notes"]
    assert "LoRA Trainer: Forge's model is bit-identical after training" in log, log[-3000:]
    lora = ui.webui / "models" / "Lora" / f"{name}.safetensors"
    assert str(lora) in job["outputs"]
    listed = {x["name"]: x for x in ui.call("GET", "/sdapi/v1/loras")}
    assert name in listed and "flux" in listed[name]["metadata"]["ss_base_model_version"]
    assert json.loads(lora.with_suffix(".json").read_text())["sd version"] == "Flux"  # Forge main's SdVersion name
    assert (ui.txt2img(PROMPT) == base).all(), "txt2img without a LoRA changed after training"
    ui.facts.update(base=base, trained=name, line=line.group(0))
    print(f"{line.group(0)}\nfirst txt2img (model load included) {t1 - t0:.0f} s, training job {t2 - t1:.0f} s, "
          f"txt2img after training {time.monotonic() - t2:.0f} s; job: "
          + json.dumps({k: job.get(k) for k in ("step", "loss_history", "notes")}))


def test_the_lora_changes_the_image_zero_is_none_and_forge_matches_every_key(forge_flux: FluxForge):
    ui, f = forge_flux, forge_flux.facts
    if "trained" not in f:
        pytest.skip("needs the training test")
    name, base = f["trained"], f["base"]
    start = len(ui.log_text())
    t0 = time.monotonic()
    with_lora = ui.txt2img(f"{PROMPT} <lora:{name}:1>")
    changed = float((with_lora != base).mean())
    print(f"<lora:{name}:1> changes {changed:.1%} of the pixel values ({time.monotonic() - t0:.0f} s)")
    assert changed > 0.05
    assert (ui.txt2img(f"{PROMPT} <lora:{name}:0>") == base).all()
    assert (ui.txt2img(PROMPT) == base).all()
    lines = ui.lora_lines(name, start)
    unet = [ln for ln in lines if "for KModel-UNet with" in ln]
    clip = [ln for ln in lines if "for KModel-CLIP with 72 keys" in ln]  # CLIP-L: 12 layers x 6 Linears
    assert unet and clip and all("(skipped 0 keys)" in ln for ln in unet + clip), lines
    assert not [ln for ln in lines if "unmatched" in ln or "mismatch" in ln.lower()], lines


def test_with_fp16_lora_forge_applies_the_lora_on_the_fly(forge_flux: FluxForge):
    """"Automatic (fp16 LoRA)", what the run's note advises on this fp8 base: no note, the LoRA applied on the fly."""
    ui, f = forge_flux, forge_flux.facts
    if "prepared" not in f:  # runs on its own too (-k fp16_lora)
        f["prepared"] = ui.tag_and_prepare(f["data"])
    start = len(ui.log_text())
    # forge_async_loading is a memory setting: changing it makes Forge re-read its loading parameters
    ui.call("POST", "/sdapi/v1/options", {"forge_unet_storage_dtype": "Automatic (fp16 LoRA)",
                                          "forge_async_loading": "Async"})
    try:
        assert "Using online LoRAs in FP16: True" in ui.log_text()[start:]
        base = ui.txt2img(PROMPT)  # the same fp8 storage ("Automatic"): Forge may keep the loaded model
        if "base" in f:
            print(f"no-LoRA image after the reload with '(fp16 LoRA)': "
                  f"{'identical to' if (base == f['base']).all() else 'different from'} the one before")
        name = f"{RUN}_otf"
        job = ui.wait_job(ui.call("POST", "/lora-trainer/v1/train", {
            "data": str(f["prepared"]), "name": name, "resolution": 64, "enable_bucket": False, "rank": 4,
            "alpha": 4, "learning_rate": 1e-2, **TRAIN})["job_id"])
        assert job["state"] == "done", (job["error"], job["message"])
        assert not [n for n in job["notes"] if "(fp16 LoRA)" in n], job["notes"]
        assert "bit-identical after training" in ui.log_text()[start:]
        assert (ui.txt2img(PROMPT) == base).all(), "txt2img without a LoRA changed after training"
        mark = len(ui.log_text())
        with_lora = ui.txt2img(f"{PROMPT} <lora:{name}:1>")
        changed = float((with_lora != base).mean())
        lines = ui.lora_lines(name, mark)
        print(f"'(fp16 LoRA)': <lora:{name}:1> changes {changed:.1%} of the pixel values; " + " | ".join(lines))
        assert changed > 0.05
        loaded = [ln for ln in lines if "Loaded" in ln]
        assert loaded and all("(skipped 0 keys)" in ln and "on_the_fly = True" in ln for ln in loaded), lines
        assert not [ln for ln in lines if "unmatched" in ln or "mismatch" in ln.lower()], lines
    finally:
        ui.call("POST", "/sdapi/v1/options", {"forge_unet_storage_dtype": "Automatic", "forge_async_loading": "Queue"})
