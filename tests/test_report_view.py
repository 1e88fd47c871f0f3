"""The "did it learn?" card and figure the tab shows (ui/logic.py, no Gradio)."""

from __future__ import annotations

import pytest

from lora_trainer.train import report as report_mod
from lora_trainer.train.report import EpochCheck, LearnReport
from lora_trainer.ui import logic


def _report() -> dict:
    r = LearnReport(method="training images, fixed noise", images=8, pairs=16, trigger="demostar", base_loss=0.2,
                    leak_measure=report_mod.OTHER_CONCEPTS, other_images=16, other_source=report_mod.LEAK_CHECK,
                    thresholds=report_mod.thresholds_for(report_mod.OTHER_CONCEPTS))
    r.epochs = [EpochCheck(1, 10, 0.19, 0.05, 0.6), EpochCheck(2, 20, 0.17, 0.15, 0.45), EpochCheck(3, 30, 0.16, 0.2, 0.995)]
    r.judge()
    r.best_path = "/runs/x/demo-000002.safetensors"
    return {**r.to_dict(), "best_lora": "demo-epoch2"}


def test_report_card_says_verdict_best_epoch_and_thresholds():
    md = logic.report_md(_report())
    assert md.startswith("### Did it learn? Leaks")
    assert "Leaks: on the leak-check images' own prompts the LoRA changes the picture 100% as much" in md
    assert "Best epoch: **2** (`demo-epoch2`)" in md
    assert "leakage on 16 leak-check images (never trained on)" in md and "trigger `demostar`" in md
    assert f"({report_mod.THRESHOLDS_SOURCE_OTHER})." in md
    assert logic.report_md(None) == ""
    # no pictures of other subjects: leakage not checked, and the card says how to check it
    r = LearnReport(method="held-out", images=8, pairs=16, trigger="demostar", base_loss=0.2)
    r.epochs = [EpochCheck(1, 10, 0.19, 0.05, None)]
    r.judge()
    md = logic.report_md(r.to_dict())
    assert md.startswith("### Did it learn? Learned") and "Leakage into other prompts was not checked" in md
    assert "leakage not checked (no leak-check folder or regularisation images)" in md
    assert "leaking means not judged without pictures of other subjects" in md
    none = {**_report(), "trigger": "", "epochs": [{**e, "leak": None} for e in _report()["epochs"]]}
    assert "leakage is not measured" in logic.report_md(none)


def test_report_figure_plots_losses_leakage_and_best_epoch():
    pytest.importorskip("matplotlib")
    fig = logic.report_figure(_report(), [[1, 0.3, 0.3], [10, 0.2, 0.25], [30, 0.1, 0.18]])
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"training loss (average)", "validation loss (trigger)", "base model", "best: epoch 2"} <= set(labels)
    assert fig.axes[1].get_lines()[0].get_label() == "leakage (right)"
    best = next(line for line in ax.get_lines() if line.get_label() == "best: epoch 2")
    assert list(best.get_xdata()) == [20]
    empty = logic.report_figure(None, [])
    assert "the report appears after the first epoch" in empty.axes[0].texts[0].get_text()
