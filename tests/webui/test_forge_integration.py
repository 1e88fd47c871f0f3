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

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXT_NAME = "lora-trainer-under-test"
RUN = f"lf{int(time.time()) % 100000}"  # unique LoRA names for this session
SEED = 1234
PROMPT = "a photo of sks"

pytestmark = pytest.mark.webui


def _harness() -> Path | None:
    for base in (os.environ.get("LORA_TRAINER_HARNESS_DIR"), ROOT.parent / "shared" / "harness"):
        if base and (Path(base) / "forge" / "launch.sh").is_file():
            return Path(base) / "forge"
    return None


class Forge:
    def __init__(self, webui: Path, port: int, harness: Path, ext_dir: Path) -> None:
        self.webui, self.port, self.harness = webui, port, harness
        self.work = webui.parent
        self.python = self.work / "venv" / "bin" / "python"
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.work / "run" / "webui.log"
        self.env = {**os.environ, "FORGE_WORK": str(self.work), "FORGE_PORT": str(port),
                    "EXT_DIR": str(ext_dir), "EXT_NAME": EXT_NAME}
        self.facts: dict = {}

    def script(self, name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(self.harness / name), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def freeze(self) -> dict[str, str]:
        out = subprocess.run([str(self.python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                             check=True).stdout
        pairs = (line.split("==", 1) for line in out.splitlines() if "==" in line)
        return {name.lower().replace("_", "-"): ver for name, ver in pairs}

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 900) -> dict:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path} -> {e.code}: {e.read()[:800]!r}") from None

    def wait_job(self, job_id: str, timeout: float = 1800) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.call("GET", f"/lora-trainer/v1/jobs/{job_id}")
            if job["state"] in ("done", "failed", "stopped"):
                return job
            time.sleep(1)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s")

    def txt2img(self, prompt: str):
        """Pixels only: the PNG's text chunk carries the prompt and LoRA hashes."""
        import numpy as np
        from PIL import Image

        res = self.call("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": SEED, "steps": 3, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 7, "batch_size": 1, "n_iter": 1})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB"))

    def train(self, data: str, name: str, **extra) -> dict:
        body = {"data": data, "name": name, "resolution": 64, "enable_bucket": False, "max_steps": 2, "rank": 4,
                "alpha": 4, "learning_rate": 1e-2, "train_text_encoder": True, **extra}
        return self.wait_job(self.call("POST", "/lora-trainer/v1/train", body)["job_id"])


def _export_tree(dest: Path) -> Path:
    """What a user gets from `git clone`: tracked + untracked-not-ignored files."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def forge(forge_dir: Path, webui_port: int, tmp_path_factory: pytest.TempPathFactory):
    harness = _harness()
    if harness is None:
        pytest.skip("shared/harness/forge not found beside the repository")
    if not (forge_dir / "modules_forge").is_dir():
        pytest.fail(f"--forge-dir {forge_dir} is not a Forge checkout (no modules_forge/)")
    for entry in (forge_dir / "extensions").iterdir():
        if entry.name != EXT_NAME and (entry / "scripts" / "lora_trainer_tab.py").exists():
            pytest.fail(f"another copy of LoRA Trainer is installed as {entry}; remove it first")
    ext = _export_tree(tmp_path_factory.mktemp("ext") / "lora-trainer")
    ui = Forge(forge_dir, webui_port, harness, ext)
    if (ui.work / "run" / "webui.pid").exists():
        pytest.fail("a Forge started by launch.sh is running; run shared/harness/forge/stop.sh first")
    ui.facts["freeze_before"] = ui.freeze()
    inst = ui.script("install_extension.sh")
    ui.facts["install_output"] = inst.stdout + inst.stderr
    assert inst.returncode == 0, ui.facts["install_output"]
    ui.facts["freeze_after"] = ui.freeze()
    # No warm-up generation: Forge then has no model loaded (FakeInitialModel) until something asks.
    launched = subprocess.run(["bash", str(harness / "launch.sh")], env={**ui.env, "FORGE_NO_WARMUP": "1"},
                              capture_output=True, text=True, timeout=900, check=False)
    if launched.returncode != 0:
        ui.script("install_extension.sh", "--remove")
        pytest.fail("launch.sh failed:\n" + launched.stdout[-3000:] + launched.stderr[-3000:])
    # Forge listens on --server-name 127.0.0.1, which the WebUI counts as "non-local": typed paths
    # must lie inside the WebUI folder, so the data goes there.
    data = forge_dir / f"lora_trainer_it_{RUN}"
    data.mkdir()
    ui.facts["data"] = data
    try:
        yield ui
    finally:
        ui.script("stop.sh")
        ui.script("install_extension.sh", "--remove")
        shutil.rmtree(data, ignore_errors=True)
        for f in (forge_dir / "models" / "Lora").glob(f"{RUN}*"):
            f.unlink()
        for d in (forge_dir / "models" / "lora_trainer_runs").glob(f"{RUN}*"):
            shutil.rmtree(d, ignore_errors=True)


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
    from lora_trainer.dataset.samples import write_images
    from lora_trainer.tagger.demo_model import write_demo_tagger

    ui = forge
    assert "Model loaded in" not in ui.log.read_text(errors="replace")
    ui.call("POST", "/sdapi/v1/options", {"lora_trainer_ab_steps": 2})
    raw = ui.facts["data"] / "photos"
    write_images(raw, 3, (64, 64), captions=False)
    tagger = write_demo_tagger(ui.facts["data"] / "tagger")  # a WD14-shaped ONNX model (no Hub here)
    tag = ui.wait_job(ui.call("POST", "/lora-trainer/v1/tag", {"data": str(raw), "model": str(tagger),
                                                             "trigger": "sks"})["job_id"])
    assert tag["state"] == "done", (tag["error"], tag["message"])
    assert all(p.read_text().startswith("sks") for p in raw.glob("*.txt")) and len(list(raw.glob("*.txt"))) == 3
    prep = ui.wait_job(ui.call("POST", "/lora-trainer/v1/prepare", {
        "source": str(raw), "out": str(ui.facts["data"] / "ds"), "concept": "sks", "repeats": 1,
        "resolution": 64})["job_id"])
    assert prep["state"] == "done", (prep["error"], prep["message"])
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
    res = subprocess.run([sys.executable, str(forge.harness / "smoke_test.py"), "--port", str(forge.port),
                          "--lora", forge.facts["lora"], "--expect-ext-tab", "--no-controls",
                          "--log", str(forge.log)],
                         capture_output=True, text=True, timeout=900, env=forge.env, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_forge_interrupt_button_stops_training_gracefully(forge: Forge):
    ui = forge
    if "lora" not in ui.facts:
        pytest.skip("needs the training test")
    base = ui.txt2img(PROMPT)
    job_id = ui.call("POST", "/lora-trainer/v1/train", {
        "data": str(ui.facts["data"] / "ds"), "name": f"{RUN}_stop", "resolution": 64, "enable_bucket": False,
        "max_steps": 500, "rank": 2, "alpha": 1})["job_id"]
    deadline = time.time() + 600
    while time.time() < deadline and (ui.call("GET", f"/lora-trainer/v1/jobs/{job_id}")["step"] or 0) < 1:
        time.sleep(1)
    ui.call("POST", "/sdapi/v1/interrupt")  # Forge's own Interrupt button
    job = ui.wait_job(job_id, timeout=600)
    assert job["state"] == "stopped", (job["error"], job["message"])
    assert 1 <= job["step"] < 500 and job["lora_name"] and Path(job["outputs"][0]).is_file()
    assert (ui.txt2img(PROMPT) == base).all()


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
    out = ROOT / "docs" / "screenshots" / "forge-train-lora-tab.png"
    if os.environ.get("LORA_TRAINER_UPDATE_SCREENSHOTS") != "1":
        out = tmp_path / "tab.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import screenshot as s\n"
            "s.screenshot(sys.argv[2], sys.argv[3])\n"
            "print(json.dumps(s.LAST))\n")
    res = subprocess.run([str(forge.python), "-c", code, str(Path(__file__).parent), forge.url, str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 10000
