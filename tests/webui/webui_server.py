"""Drives one real WebUI through the shell harness in shared/harness/<kind>/ (A1111 or Forge).

Shared by test_a1111_webui.py and test_forge_integration.py: what differs between the two hosts
(harness folder, env variable prefix, timeouts, poll interval, launch environment) is a parameter.
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
HERE = Path(__file__).resolve().parent
EXT_NAME = "lora-trainer-under-test"
SEED = 1234


def harness_dir(kind: str) -> Path | None:
    """shared/harness/<kind>/ beside the repository (or $LORA_TRAINER_HARNESS_DIR/<kind>)."""
    for base in (os.environ.get("LORA_TRAINER_HARNESS_DIR"), ROOT.parent / "shared" / "harness"):
        if base and (Path(base) / kind / "launch.sh").is_file():
            return Path(base) / kind
    return None


def export_tree(dest: Path) -> Path:
    """What a user gets from `git clone`: tracked + untracked-not-ignored files (no .venv, no caches)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """docs/screenshots/<name> with LORA_TRAINER_UPDATE_SCREENSHOTS=1, else a throwaway file."""
    out = ROOT / "docs" / "screenshots" / name
    if os.environ.get("LORA_TRAINER_UPDATE_SCREENSHOTS") != "1":
        out = tmp_path / "tab.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


class WebUIServer:
    """A WebUI in the harness layout <work>/{webui,venv,run}, started and stopped by the harness scripts.

    `env_prefix` names the harness variables (`A1111` → A1111_WORK/A1111_PORT); `script_timeout`
    bounds each harness script (and the smoke test), `call_timeout` each HTTP request, `job_timeout`
    and `poll_s` the wait for one of our jobs.
    """

    def __init__(self, webui: Path, port: int, harness: Path, ext_dir: Path, *, env_prefix: str,
                 label: str, ext_name: str = EXT_NAME, script_timeout: int = 600, call_timeout: float = 600,
                 job_timeout: float = 900, poll_s: float = 0.5) -> None:
        self.webui, self.port, self.harness, self.ext_dir = webui, port, harness, ext_dir
        self.label, self.ext_name = label, ext_name
        self.script_timeout, self.call_timeout = script_timeout, call_timeout
        self.job_timeout, self.poll_s = job_timeout, poll_s
        self.work = webui.parent
        self.python = self.work / "venv" / "bin" / "python"
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.work / "run" / "webui.log"
        self.env = {**os.environ, f"{env_prefix}_WORK": str(self.work), f"{env_prefix}_PORT": str(port),
                    "EXT_DIR": str(ext_dir), "EXT_NAME": ext_name}
        self.facts: dict = {}

    def script(self, name: str, *args: str, timeout: int | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(self.harness / name), *args], env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout or self.script_timeout, check=False)

    def freeze(self) -> dict[str, str]:
        out = subprocess.run([str(self.python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True,
                             check=True).stdout
        pairs = (line.split("==", 1) for line in out.splitlines() if "==" in line)
        return {name.lower().replace("_", "-"): ver for name, ver in pairs}

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.call_timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path} -> {e.code}: {e.read()[:800]!r}") from None

    def wait_job(self, job_id: str, timeout: float | None = None) -> dict:
        timeout = timeout or self.job_timeout
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.call("GET", f"/lora-trainer/v1/jobs/{job_id}")
            if job["state"] in ("done", "failed", "stopped"):
                return job
            time.sleep(self.poll_s)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s")

    def wait_step(self, job_id: str, step: int, timeout: float | None = None) -> int:
        """Wait until the job reached `step` (or ended); returns the step it is at."""
        deadline = time.time() + (timeout or self.job_timeout)
        while True:
            job = self.call("GET", f"/lora-trainer/v1/jobs/{job_id}")
            if (job["step"] or 0) >= step or job["state"] in ("done", "failed", "stopped") or time.time() > deadline:
                return job["step"] or 0
            time.sleep(self.poll_s)

    def interrupt_at(self, job_id: str, step: int, timeout: float | None = None) -> dict:
        """Press the WebUI's own Interrupt once the job reached `step`; returns the finished job."""
        self.wait_step(job_id, step, timeout)
        self.call("POST", "/sdapi/v1/interrupt")
        return self.wait_job(job_id, timeout)

    def relaunch(self, launch_env: dict[str, str] | None = None) -> None:
        """stop.sh then launch.sh: the same install, a new WebUI process."""
        self.script("stop.sh")
        launched = self.script("launch.sh", env=launch_env)
        assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]

    def txt2img(self, prompt: str):
        """Pixels only: the PNG's text chunk carries the prompt and LoRA hashes."""
        import numpy as np
        from PIL import Image

        res = self.call("POST", "/sdapi/v1/txt2img", {
            "prompt": prompt, "negative_prompt": "", "seed": SEED, "steps": 3, "width": 64, "height": 64,
            "sampler_name": "Euler", "cfg_scale": 7, "batch_size": 1, "n_iter": 1})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(res["images"][0]))).convert("RGB"))

    # -- life cycle (module fixtures) ------------------------------------------------------------

    def refuse_other_copies(self) -> None:
        """Fail when another LoRA Trainer is installed, or a harness-started WebUI still runs."""
        for entry in (self.webui / "extensions").iterdir():
            if entry.name != self.ext_name and (entry / "scripts" / "lora_trainer_tab.py").exists():
                pytest.fail(f"another copy of LoRA Trainer is installed as {entry}; remove it first")
        pid_file = self.work / "run" / "webui.pid"
        if pid_file.exists():
            pytest.fail(f"a {self.label} started by launch.sh is running (pid file {pid_file}); "
                        f"run {self.harness / 'stop.sh'} first")

    def install_and_launch(self, launch_env: dict[str, str] | None = None) -> None:
        """install_extension.sh between two `pip freeze`s (kept in facts), then launch.sh."""
        self.facts["freeze_before"] = self.freeze()
        inst = self.script("install_extension.sh")
        self.facts["install_output"] = inst.stdout + inst.stderr
        assert inst.returncode == 0, self.facts["install_output"]
        self.facts["freeze_after"] = self.freeze()
        launched = self.script("launch.sh", env=launch_env)
        if launched.returncode != 0:
            self.script("install_extension.sh", "--remove")
            pytest.fail("launch.sh failed:\n" + launched.stdout[-3000:] + launched.stderr[-3000:])

    def shut_down(self, run: str, *scratch: Path) -> None:
        """stop.sh, uninstall, and delete what this session wrote (LoRAs and runs named `run*`)."""
        self.script("stop.sh")
        self.script("install_extension.sh", "--remove")
        for d in scratch:
            shutil.rmtree(d, ignore_errors=True)
        for f in (self.webui / "models" / "Lora").glob(f"{run}*"):
            f.unlink()
        for d in (self.webui / "models" / "lora_trainer_runs").glob(f"{run}*"):
            shutil.rmtree(d, ignore_errors=True)

    # -- tools run beside the server -------------------------------------------------------------

    def smoke_test(self, lora: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """The harness's smoke_test.py against this server, with a LoRA the extension trained."""
        return subprocess.run([sys.executable, str(self.harness / "smoke_test.py"), "--port", str(self.port),
                               "--lora", lora, "--expect-ext-tab", "--no-controls", "--log", str(self.log), *extra],
                              capture_output=True, text=True, timeout=self.script_timeout, env=self.env, check=False)

    def screenshot(self, code: str, out: Path) -> subprocess.CompletedProcess[str]:
        """Runs `code` with screenshot.py importable and argv [tests/webui, url, out] in the WebUI's venv
        (it has `websockets`, which gradio needs and the DevTools client uses)."""
        return subprocess.run([str(self.python), "-c", code, str(HERE), self.url, str(out)],
                              capture_output=True, text=True, timeout=300, check=False)
