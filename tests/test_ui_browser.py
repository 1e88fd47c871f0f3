"""The tab in headless Chromium: load, tag, edit, prepare, train and see the result (opt-in, slow).

Runs `python -m lora_trainer ui --tiny sd1` and docs/screenshots/drive.js (playwright-core driving
the system chromium). Opt-in (LORA_TRAINER_BROWSER_TEST=1) and skipped unless chromium, node and
playwright-core are there (`npm install playwright-core@1`, NODE_PATH=<its node_modules>).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from server_support import cli_server

pytest.importorskip("gradio", reason="Gradio is not installed in this stack")

from train_support import shape_image

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _browser_ready() -> str | None:
    if os.environ.get("LORA_TRAINER_BROWSER_TEST") != "1":
        return "opt-in: set LORA_TRAINER_BROWSER_TEST=1 (about a minute)"
    if not shutil.which("chromium") or not shutil.which("node"):
        return "chromium or node is not installed"
    probe = subprocess.run(["node", "-e", "require('playwright-core')"], capture_output=True, env=os.environ,
                           check=False)
    return None if probe.returncode == 0 else "node cannot load playwright-core (set NODE_PATH)"


def test_train_through_the_browser(tmp_path):
    why = _browser_ready()
    if why:
        pytest.skip(why)
    from lora_trainer.tagger.demo_model import write_demo_tagger

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        shape_image(i, (96, 96)).save(photos / f"shape{i}.png")
    tagger = write_demo_tagger(tmp_path / "tagger")
    with cli_server(["ui", "--tiny", "sd1", "--lora-dir", str(tmp_path / "Lora")], "/", timeout=120, poll_s=0.5,
                    cwd=tmp_path) as (base, _):
        shot = tmp_path / "shot.png"
        run = subprocess.run(["node", str(ROOT / "docs" / "screenshots" / "drive.js"), f"{base}/",
                              str(shot)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "LT_PHOTOS": str(photos), "LT_TAGGER": str(tagger)}, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "result: LoRA ready: shapes" in run.stdout
        assert "send text: <lora:shapes:0.8> shape" in run.stdout
        assert (tmp_path / "Lora" / "shapes.safetensors").is_file() and shot.is_file()
