"""The "did it learn?" report in the tab, in headless Chromium: after a run the result card says the
one-sentence verdict, the best epoch and its file in the Lora folder, what was scored and the
thresholds with where they come from; the loss figure is drawn again with the validation scores.
Runs `python -m lora_trainer ui --tiny sd1` (Gradio 3.41 on the A1111 stack, 4.40 on Forge's; skipped
where Gradio or Chromium is missing). What the figure plots is checked in test_report_view.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="Gradio is not installed in this stack")

from browser_support import ROOT_JS, chromium, chromium_path, websockets_ok
from server_support import cli_server
from train_support import make_dataset

from lora_trainer.train import report as report_mod

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(chromium_path() is None or not websockets_ok(),
                                reason="needs chromium (apt-get install chromium) and websockets")
VERDICTS = ("Learned:", "Not learned yet:", "Leaks:")


def _plot_src(page) -> str:
    return page.eval(f"(() => {{ const i = {ROOT_JS}.querySelector('#lora_trainer_loss_plot img');"
                     " return i ? i.src : ''; })()") or ""


def test_tab_shows_the_report_after_a_run(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "ds", n=2, repeats=2, name="shape")
    lora_dir, work = tmp_path / "Lora", tmp_path / "runs"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = ["ui", "--tiny", "sd1", "--lora-dir", str(lora_dir), "--work-dir", str(work)]
    with cli_server(args, "/", timeout=180, poll_s=0.5, cwd=tmp_path) as (base, _), chromium() as browser:
        page = browser.new_page(base + "/")
        try:
            page.wait_text("#lora_trainer_run_state", "Nothing is training")
            page.fill("lora_trainer_name", "learn")
            page.fill("lora_trainer_data", data)
            page.fill("lora_trainer_epochs", 3)
            page.fill("lora_trainer_batch_size", 1)
            page.fill("lora_trainer_rank", 4)
            page.fill("lora_trainer_lr", 0.001)
            page.fill("lora_trainer_resolution", 64)
            page.click("#lora_trainer_train")
            card = page.wait_text("#lora_trainer_result", "LoRA ready: learn", timeout=240)
            card = page.wait_text("#lora_trainer_result", "Did it learn?")
        except BaseException:
            page.screenshot(tmp_path / "failure.png")
            print(f"page at the failure: {tmp_path / 'failure.png'}")
            raise
        record = json.loads(next(work.glob("*/job.json")).read_text(encoding="utf-8"))
        rep = record["report"]
        assert [e["epoch"] for e in rep["epochs"]] == [1, 2, 3]
        # the one-sentence verdict, as the engine wrote it, with its remedy
        assert rep["message"] in card and card.count(rep["message"]) == 1
        verdict = next(line for line in card.splitlines() if line.startswith(VERDICTS))
        remedy = {"not_learned": "train longer or raise the learning rate",
                  "leaks": "fewer steps, a lower rank, or add regularisation images"}.get(rep["verdict"], "")
        assert remedy in verdict
        # the best epoch and its file, named as in the Lora folder
        best = re.search(r"Best epoch: (\d+) \((\S+)\)", card)
        assert best and int(best.group(1)) == rep["best_epoch"]
        assert best.group(2) == rep["best_lora"] and (lora_dir / f"{rep['best_lora']}.safetensors").is_file()
        # what was scored, and the thresholds with where they come from
        # (no leak-check folder or regularisation images here: leakage not checked, and the card says so)
        assert "leakage not checked (no leak-check folder or regularisation images)" in card
        assert f"at least {report_mod.LEARNED_MIN_IMPROVEMENT:.0%} below the base model" in card
        assert "leaking means not judged without pictures of other subjects" in card
        assert report_mod.THRESHOLDS_SOURCE in card
        # the figure beside it is the one drawn with the scores (a picture: its lines are checked in Python)
        assert _plot_src(page).startswith("data:image/")
        errors = [c for c in page.console if "fonts.googleapis" not in c and "preload" not in c]
        assert not errors, errors
