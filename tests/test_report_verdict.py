""""Did it learn?" (train/report.py): the verdict, the best-epoch pick, the thresholds and the report as text, on
reports built by hand (no training); tests/test_train_report.py checks the engine's scoring and where the report
goes."""

from __future__ import annotations

import json

from lora_trainer.train import report as report_mod
from lora_trainer.train.report import EpochCheck, LearnReport
from lora_trainer.train.validation import strip_trigger, trigger_words


def test_trigger_words_and_stripping():
    assert trigger_words("", ["shape", "thing"]) == ["shape", "thing"]
    assert trigger_words("demostar, red theme", ["shape"]) == ["demostar", "red theme"]
    assert strip_trigger("yellow demostar, blue background", ["demostar"]) == "yellow, blue background"
    assert strip_trigger("Shape, circle, colour 1", ["shape"]) == "circle, colour 1"
    assert strip_trigger("shapeshifter, circle", ["shape"]) is None  # whole words only
    assert strip_trigger("red circle", ["demostar"]) is None


def _report(*epochs, measure: str = report_mod.OTHER_CONCEPTS) -> LearnReport:
    r = LearnReport(method="training images, fixed noise", images=4, pairs=16, trigger="x", base_loss=1.0,
                    leak_measure=measure, thresholds=report_mod.thresholds_for(measure))
    r.epochs = [EpochCheck(epoch=k + 1, step=10 * (k + 1), val_loss=1 - imp, improvement=imp, leak=leak)
                for k, (imp, leak) in enumerate(epochs)]
    r.judge()
    return r


def test_verdicts_and_best_epoch():
    lo, hi = report_mod.LEARNED_MIN_IMPROVEMENT, report_mod.LEAK_MAX_OTHER
    r = _report((lo / 4, 0.1), (lo / 2, 0.1))
    assert r.verdict == "not_learned" and "train longer or raise the learning rate" in r.message
    assert r.best_epoch == 2
    r = _report((lo * 2, hi / 3), (lo * 3, hi / 2))
    assert r.verdict == "learned" and r.best_epoch == 2 and r.message.startswith("Learned")
    assert "not checked" not in r.message
    # the last epoch leaks: the verdict says so and the best pick is the last epoch that did not
    r = _report((lo * 2, hi / 2), (lo * 4, hi * 0.9), (lo * 5, hi * 1.5))
    assert r.verdict == "leaks" and r.best_epoch == 2
    assert "fewer steps or a lower rank" in r.message and "epoch 2 is the better pick" in r.message
    # everything leaks: the learned epoch that leaks least
    r = _report((lo / 2, hi * 1.2), (lo * 2, hi * 1.4), (lo * 3, hi * 2))
    assert r.verdict == "leaks" and r.best_epoch == 2
    assert LearnReport.from_dict(r.to_dict()) == r


def test_without_other_subjects_pictures_leakage_is_not_checked_and_the_report_says_how_to():
    """No leak-check folder and no regularisation images: no leakage reading, no "leaks" verdict (nothing the
    engine has separates a LoRA bound to its trigger from one that overrides every prompt; the pure-noise measure
    tried before read 0.99-1.0 for every run on the demo model); the verdict says how to check it."""
    lo = report_mod.LEARNED_MIN_IMPROVEMENT
    r = _report((lo * 2, None), (lo * 3, None), measure=report_mod.NOT_CHECKED)
    assert r.verdict == "learned" and r.best_epoch == 2 and r.thresholds["leak_max"] is None
    assert "Leakage into other prompts was not checked" in r.message and "leak-check folder" in r.message
    assert LearnReport(method="held-out", images=1, pairs=1, trigger="x", base_loss=1.0).leak_measure == \
        report_mod.NOT_CHECKED  # the default
    text = report_mod.report_text(r.to_dict())
    assert "leakage not checked (no leak-check folder or regularisation images)" in text
    assert "leaks = not judged without pictures of other subjects" in text
    r = _report((lo / 4, None), (lo / 2, None), measure=report_mod.NOT_CHECKED)
    assert r.verdict == "not_learned" and "not checked" not in r.message
    # no trigger in the captions: nothing to check leakage against, and nothing said about it
    r = _report((lo * 2, None), measure=report_mod.NOT_CHECKED)
    r.trigger = ""
    r.judge()
    assert r.verdict == "learned" and "not checked" not in r.message


def test_best_epoch_is_the_latest_within_the_noise_of_the_lowest_loss():
    """The pick compares epochs pair by pair (the same fixed noise every epoch): a later epoch whose loss is
    above the lowest by less than one standard error of the paired difference counts as good and, having
    trained more, wins; one clearly above does not; a leaking one never does."""
    base = [0.10, 0.30, 0.20, 0.50, 0.15, 0.25, 0.40, 0.35]
    noise = [0.004, -0.006, 0.005, -0.003, 0.006, -0.005, 0.003, -0.004]  # mean 0, standard error ~0.0017

    def epoch(k: int, shift: float, leak: float = 0.3, jitter: bool = True) -> EpochCheck:
        losses = [b + shift + (n if jitter else 0.0) for b, n in zip(base, noise)]
        val = sum(losses) / len(losses)
        return EpochCheck(epoch=k, step=10 * k, val_loss=val, improvement=1 - val, leak=leak, pair_losses=losses)

    def pick(*epochs: EpochCheck) -> int | None:
        r = LearnReport(method="held-out", images=4, pairs=8, trigger="x", base_loss=1.0,
                        leak_measure=report_mod.OTHER_CONCEPTS)
        r.epochs = list(epochs)
        r.judge()
        assert LearnReport.from_dict(r.to_dict()) == r  # the per-pair losses survive a resume
        return r.best_epoch

    lowest = epoch(2, -0.05, jitter=False)
    assert pick(epoch(1, 0.0), lowest, epoch(3, -0.0495)) == 3  # 0.0005 above: noise
    assert pick(epoch(1, 0.0), lowest, epoch(3, -0.040)) == 2  # 0.01 above, six standard errors: worse
    assert pick(epoch(1, 0.0), lowest, epoch(3, -0.0495, leak=report_mod.LEAK_MAX_OTHER + 0.01)) == 2  # leaks
    assert pick(epoch(1, 0.0), lowest, epoch(3, -0.0495), epoch(4, -0.030)) == 3  # the latest good one
    # reports from before per-pair losses were kept: the lowest loss, as then
    old = [EpochCheck(e.epoch, e.step, e.val_loss, e.improvement, e.leak) for e in (lowest, epoch(3, -0.0495))]
    assert pick(*old) == 2


def test_with_regularisation_images_leakage_is_other_concepts_and_its_own_limit():
    """With regularisation images the leakage is the LoRA's change on their pictures relative to its change on
    the trigger's ("other concepts"), judged against its own limit (0.5, measured on the demo models)."""
    lo, limit = report_mod.LEARNED_MIN_IMPROVEMENT, report_mod.LEAK_MAX_OTHER
    assert limit == 0.5

    def other(*epochs) -> LearnReport:
        r = LearnReport(method="held-out", images=4, pairs=16, trigger="x", base_loss=1.0,
                        leak_measure=report_mod.OTHER_CONCEPTS, other_images=16,
                        thresholds=report_mod.thresholds_for(report_mod.OTHER_CONCEPTS))
        r.epochs = [EpochCheck(epoch=k + 1, step=10 * (k + 1), val_loss=1 - imp, improvement=imp, leak=leak)
                    for k, (imp, leak) in enumerate(epochs)]
        r.judge()
        return r

    r = other((lo * 2, 0.3), (lo * 3, 0.47))  # the demo's run on the shipped model read 0.39-0.47
    assert r.verdict == "learned" and "regularisation images' prompts" in r.message and "47%" in r.message
    r = other((lo * 2, 0.3), (lo * 3, 0.83))  # an over-trained one 0.83-1.08: leaks
    assert r.verdict == "leaks" and r.best_epoch == 1
    assert "regularisation images' own prompts" in r.message and "fewer steps or a lower rank" in r.message
    assert "add regularisation images" not in r.message and "epoch 1 is the better pick" in r.message
    assert r.thresholds["leak_max"] == limit and "candidate_lesson_and_leakage" in r.thresholds["source"]
    assert LearnReport.from_dict(r.to_dict()) == r
    text = report_mod.report_text(r.to_dict())
    assert "leakage on 16 regularisation images with their own captions" in text
    assert "changed more than 50% as much as the trigger's" in text
    # a report written before the measure was named reads as the pure-noise one of that time, shown as written
    old = {k: v for k, v in _report((lo * 2, 0.5)).to_dict().items() if k not in ("leak_measure", "other_images")}
    assert LearnReport.from_dict(old).leak_measure == report_mod.TRIGGER_REMOVED
    assert "with and without the trigger 'x'" in report_mod.report_text(old)


def test_a_run_worse_than_the_base_model_is_told_to_lower_the_learning_rate():
    r = _report((-0.7, 1.0), (-2.5, 1.0))
    assert r.verdict == "not_learned" and "lower the learning rate" in r.message
    assert "raise the learning rate" not in r.message and "250% above" in r.message


def test_report_text_block_ends_with_the_verdict():
    r = _report((0.001, 0.1), (0.004, 0.2)).to_dict()
    text = report_mod.report_text(r)
    lines = text.splitlines()
    assert lines[0] == "Did it learn? not learned yet"
    assert lines[-1] == r["message"] and "train longer or raise the learning rate" in lines[-1]
    assert any(ln.startswith("  epoch 2: validation loss") and ln.endswith("<- best") for ln in lines)
    assert any("thresholds: learned = at least 2% below the base model" in ln and r["thresholds"]["source"] in ln
               for ln in lines)
    many = _report(*[(0.05, 0.1)] * 9 + [(0.01, 0.1)]).to_dict()  # best epoch 1 of 10: listed, the oldest others not
    many["best_epoch"] = 1
    shown = report_mod.report_text(many)
    assert "  epoch 1: validation loss" in shown and "epoch 2:" not in shown and "epoch 10:" in shown
    assert "earlier epochs not listed" in shown and len(shown.splitlines()) <= 12


def test_when_every_epoch_leaks_alike_the_lowest_loss_is_best():
    """Leakage that hardly differs between epochs does not decide the pick: the lowest validation loss among the
    epochs leaking about least (within `LEAK_MARGIN`) does."""
    lo, hi = report_mod.LEARNED_MIN_IMPROVEMENT, 1.0
    r = _report((lo * 2, hi * 1.9), (lo * 6, hi * 1.92), (lo * 9, hi * 1.94))
    assert r.verdict == "leaks" and r.best_epoch == 3
    r = _report((lo * 6, hi * 1.2), (lo * 8, hi * 1.9), (lo * 9, hi * 2))  # clearly rising: the early one
    assert r.best_epoch == 1


def test_when_every_epoch_leaks_a_barely_trained_epoch_is_not_picked():
    """Where every epoch leaks, the pick comes from the epochs that learned at least `LEAKING_PICK_MIN_SHARE` (half)
    of the run's best improvement: the second demo model's over-trained seed 3 leaked least at epoch 5 (3.7%
    against the best 17.3%), a pick worse than the last epoch on the classifier (best_epoch_pick_rule_2026-12-06.md)."""
    assert report_mod.LEAKING_PICK_MIN_SHARE == 0.5
    lo = report_mod.LEARNED_MIN_IMPROVEMENT
    # the rule before: the least-leaking learned epoch (epoch 1: 5.5% of a best 22.8%)
    r = _report((0.055, 0.649), (0.128, 0.80), (0.142, 0.94), (0.228, 1.06))
    assert r.verdict == "leaks" and r.best_epoch == 2 and "epoch 2 is the better pick" in r.message
    assert report_mod.pick_when_every_epoch_leaks(r.epochs, 0.0).epoch == 1
    # every learned epoch at half the best or more: as before, the least leaking
    r = _report((lo / 2, 0.6), (0.10, 0.9), (0.16, 1.2), (0.17, 1.3))
    assert r.best_epoch == 2
    # no epoch learned: all of them, as before (the verdict says "not learned")
    r = _report((lo / 4, 0.9), (lo / 2, 0.8))
    assert r.verdict == "not_learned" and r.best_epoch == 2


def test_a_report_before_the_first_scored_epoch_says_the_base_is_not_scored_yet():
    # the base model is scored at the first scored epoch (not before step 1): a Stop before then
    # leaves base_loss None, which stays valid JSON and reads as "not scored yet"
    r = LearnReport(method="held-out", images=2, pairs=16, trigger="x", base_loss=None)
    r.judge()
    data = r.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False))["base_loss"] is None
    text = report_mod.report_text(data)
    assert "base model: not scored yet" in text and text.splitlines()[-1] == "No epoch has been scored yet."
