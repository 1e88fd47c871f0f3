""""Did it learn?": the report of a run's validation scores (train/validation.py computes them after every
epoch), its verdict and the thresholds behind it.

- **improvement**: how far the validation loss with the trigger sits below the base model's. A LoRA that
  has not learned its concept yet barely moves it: under `LEARNED_MIN_IMPROVEMENT` it is "not learned".
- **leakage**, by one of two measures (`leak_measure`, train/validation.py): with a leak-check set
  (`leak_check_dir`, never trained on) or else regularisation images (`other_source`), "other concepts": how much the LoRA changes the prediction on those pictures with their captions, relative
  to its change on the trigger's pictures (0: other prompts untouched); over `LEAK_MAX_OTHER` at the last
  epoch the run "leaks". Without them leakage is not checked (`NOT_CHECKED`; why: train/validation.py) and the
  report says how to check it. Reports of older versions may carry `TRIGGER_REMOVED`, a pure-noise measure that
  also flagged good runs; they are shown as they were written.
The best epoch is the latest epoch that does not leak and whose validation loss is within one standard error
of the lowest (paired over the same noise, `NOISE_SE`): a later epoch that scores the same within the noise of 16
pairs has trained more, so a lucky earlier minimum does not win. When every epoch leaks: the lowest validation
loss among the epochs leaking about least (`LEAK_MARGIN`) of those that learned at least half the run's best
improvement (`LEAKING_PICK_MIN_SHARE`), not a barely-trained early one. Its LoRA file is kept.

Thresholds: see their comment below; the report states them and where they come from.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

# The verdict's thresholds, in this one place; every report states them with THRESHOLDS_SOURCE.
LEARNED_MIN_IMPROVEMENT = 0.02  # validation loss at least 2% below the base model's: the concept shows
# leaking, "other concepts" (regularisation images): measured on the shipped demo model and a candidate demo
# model with the other shapes' pictures and captions (bench/results/demo_lora_cpu/
# candidate_lesson_and_leakage_2026-12-05.md). §2, LoRA files trained without them: runs whose LoRA keeps at
# least half of the other shapes' prompts drawn as asked read 0.24-0.47, those that override more than half
# 0.51-1.10. §4, the engine on runs trained with them (the demo's): the demo's settings 0.26-0.35 at the last
# epoch (0.17-0.49 from the third epoch; the first one or two read 0.50-0.87), the over-trained ones 0.55-0.82.
# §5, the same pictures as a leak-check set (never trained on), the demo's way: the demo's settings 0.40-0.44 at
# the last epoch (0.29-0.57 from the third epoch, 6 of 84 epochs over 0.5), the over-trained ones 0.94-1.14 (every
# epoch 0.61-1.60); kept at 0.5, as §2's LoRAs (also scored on pictures they never trained on) read. On the shipped
# (longer-pretrained) demo model with its settings (shipped_candidate_2026-12-05.md): the demo 0.31, the LoRAs that
# draw the asked shape for under a third of other prompts 0.64-1.02; at 44-86% asked it orders runs loosely.
LEAK_MAX_OTHER = 0.5
# LearnReport.leak_measure: other concepts' pictures, none (not checked), or an older version's pure-noise measure
OTHER_CONCEPTS, NOT_CHECKED, TRIGGER_REMOVED = "other_concepts", "not_checked", "trigger_removed"
LEAK_CHECK, REGULARISATION = "leak_check", "regularisation"  # LearnReport.other_source (other concepts' pictures)
# what a report without other concepts' pictures says (its verdict cannot be "leaks")
NOT_CHECKED_HOW = ("Leakage into other prompts was not checked: give a leak-check folder (pictures of other "
                   "subjects with their captions, never trained on) or regularisation images to check it.")
LEAK_MARGIN = 0.05  # when every epoch leaks: epochs within this of the least leakage count as equally clean
# when every epoch leaks, only epochs that learned at least this share of the run's best improvement are picked from:
# without it the least-leaking epoch was at times one that had barely trained (epochs 1 and 5 of 30 at 5.5% and
# 3.7% against the best 22.8% / 17.3%), and on the second demo model such a pick drew the concept in 10.9% of
# generations against the last epoch's 33.6%: worse than the last on star share × asked share beyond the noise
# (-3.3 +- 0.9 points). bench/results/demo_lora_cpu/best_epoch_pick_rule_2026-12-06.md
LEAKING_PICK_MIN_SHARE = 0.5
# the best-epoch pick: an epoch after the lowest validation loss counts as equally good when its loss is above it
# by at most this many standard errors of the paired per-pair difference (the "one standard error" rule)
NOISE_SE = 1.0
THRESHOLDS_SOURCE = ("demo model, bench/results/learn_thresholds_demo_cpu.md: the learned limit separates 4 steps "
                     "at lr 3e-5 (0.1%) from the demo's settings (2.3% after 4 steps, 6.3% after 8)")
THRESHOLDS_SOURCE_OTHER = ("demo models, bench/results/demo_lora_cpu/candidate_lesson_and_leakage_2026-12-05.md: "
                           "the leakage limit (regularisation images) sits between runs that keep at least half of "
                           "the other shapes' prompts drawn as asked (0.24-0.47) and runs that override more "
                           "(0.51-1.10), and between the demo's runs with the other shapes as regularisation images "
                           "(0.26-0.35 at the last epoch) and over-trained ones (0.55-0.82), and with them as a "
                           "leak-check set, never trained on (the demo's way): 0.40-0.44 against 0.94-1.14; on the "
                           "shipped demo model (shipped_candidate_2026-12-05.md): the demo 0.31, LoRAs that override "
                           "most other prompts 0.64-1.02; the learned limit: bench/results/learn_thresholds_demo_cpu.md")


def thresholds_for(measure: str) -> dict[str, Any]:
    """The verdict's thresholds for a leakage measure, with where they come from (what a report states)."""
    if measure == OTHER_CONCEPTS:
        return {"learned_min_improvement": LEARNED_MIN_IMPROVEMENT, "leak_max": LEAK_MAX_OTHER,
                "source": THRESHOLDS_SOURCE_OTHER}
    return {"learned_min_improvement": LEARNED_MIN_IMPROVEMENT, "leak_max": None, "source": THRESHOLDS_SOURCE}


@dataclass
class EpochCheck:
    epoch: int
    step: int
    val_loss: float  # with the trigger
    improvement: float  # 1 - val_loss / base loss
    leak: float | None  # the report's leakage measure (LearnReport.leak_measure); None: no trigger in the captions
    pair_losses: list[float] | None = None  # the validation loss of each fixed pair (same pairs every epoch)


@dataclass
class LearnReport:
    """What `TrainResult.report`, the "validation" event and the job JSON's `report` carry."""

    method: str  # "held-out" | "training images, fixed noise"
    images: int
    pairs: int
    trigger: str  # "" when the captions hold none
    base_loss: float | None  # None until the base model is scored (at the first scored epoch)
    epochs: list[EpochCheck] = field(default_factory=list)
    best_epoch: int | None = None
    best_path: str | None = None  # the kept file of the best epoch (the final LoRA when it is the last)
    verdict: str = "pending"  # "learned" | "not_learned" | "leaks" | "pending"
    message: str = ""
    thresholds: dict[str, Any] = field(default_factory=lambda: thresholds_for(NOT_CHECKED))
    # OTHER_CONCEPTS: the leak-check set or the regularisation images with their captions against the trigger's
    # pictures (`other_images` of them scored); NOT_CHECKED: no such pictures (or no trigger)
    leak_measure: str = NOT_CHECKED
    other_images: int = 0
    other_source: str = ""  # OTHER_CONCEPTS: LEAK_CHECK (leak_check_dir, never trained on) or REGULARISATION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LearnReport:
        data = dict(data)
        data.setdefault("leak_measure", TRIGGER_REMOVED)  # reports from before the measure was named
        data["epochs"] = [EpochCheck(**e) for e in data.get("epochs", [])]
        return cls(**data)

    @property
    def leak_limit(self) -> float:
        """The leakage over which an epoch leaks; only "other concepts" judges leakage (infinite otherwise)."""
        return LEAK_MAX_OTHER if self.leak_measure == OTHER_CONCEPTS else math.inf

    def clean_epochs(self) -> list[EpochCheck]:
        """The epochs that do not leak (or were not measured for it)."""
        return [e for e in self.epochs if e.leak is None or e.leak <= self.leak_limit]

    def judge(self) -> None:
        """Pick the best epoch and write the verdict (one sentence) from the epochs scored so far."""
        if not self.epochs:
            self.verdict, self.message = "pending", "No epoch has been scored yet."
            return
        limit = self.leak_limit
        clean = self.clean_epochs()
        learned = [e for e in self.epochs if e.improvement >= LEARNED_MIN_IMPROVEMENT]
        if clean:
            low = min(clean, key=lambda e: e.val_loss)
            best = max((e for e in clean if e.epoch >= low.epoch and _as_good(e, low)), key=lambda e: e.epoch)
        else:
            best = pick_when_every_epoch_leaks(learned or self.epochs)
        self.best_epoch = best.epoch
        last = self.epochs[-1]
        top = max(e.improvement for e in self.epochs)
        if top < 0:  # every epoch scores worse than the base model: the run diverged, it did not under-train
            self.verdict = "not_learned"
            self.message = (f"Not learned: the validation loss with the trigger ended {-last.improvement:.0%} above "
                            f"the base model's and never fell below it; lower the learning rate.")
        elif not learned:
            self.verdict = "not_learned"
            self.message = (f"Not learned yet: the validation loss with the trigger fell only {top:.1%} below the "
                            f"base model's (a learned concept shows at least {LEARNED_MIN_IMPROVEMENT:.0%}); "
                            "train longer or raise the learning rate.")
        elif last.leak is not None and last.leak > limit:
            better = f"; epoch {best.epoch} is the better pick" if best.epoch != last.epoch else ""
            self.verdict = "leaks"
            self.message = (f"Leaks: on the {other_words(self.other_source)}' own prompts the LoRA changes the "
                            f"picture {last.leak:.0%} as much as on its trigger's (more than {limit:.0%}){better}; use "
                            "fewer steps or a lower rank.")
        else:
            leak = "" if last.leak is None or self.leak_measure != OTHER_CONCEPTS else (
                f", and on the {other_words(self.other_source)}' prompts it changes the picture {last.leak:.0%} as "
                "much as on its trigger's")
            pick = f"; epoch {best.epoch} scored best" if best.epoch != last.epoch else ""
            unchecked = (f" {NOT_CHECKED_HOW}" if self.trigger and self.leak_measure == NOT_CHECKED else "")
            self.verdict = "learned"
            self.message = (f"Learned: the validation loss with the trigger is {last.improvement:.1%} below the base "
                            f"model's{leak}{pick}.{unchecked}")


def candidates(report: LearnReport) -> set[int]:
    """The epochs a later `judge()` could still pick: their weights are kept (on disk) until the run ends. With a
    clean epoch, only the pick: the lowest loss can only move to a new epoch and the pick is the latest clean epoch
    as good as it, so a later pick is a later epoch. Where every epoch leaks, every epoch of the pick's pool at or
    over its improvement floor as well: the floor only rises, so an epoch under it never comes back, but one over
    it becomes the pick again when the epochs that leak less fall under the floor."""
    if report.best_epoch is None:
        return set()
    if report.clean_epochs():
        return {report.best_epoch}
    pool = [e for e in report.epochs if e.improvement >= LEARNED_MIN_IMPROVEMENT] or report.epochs
    return {e.epoch for e in over_floor(pool)} | {report.best_epoch}


def over_floor(pool: list[EpochCheck], min_share: float = LEAKING_PICK_MIN_SHARE) -> list[EpochCheck]:
    """The epochs of `pool` whose improvement is at least `min_share` of its best (all when none improved)."""
    top = max(e.improvement for e in pool)
    return [e for e in pool if e.improvement >= min_share * top] if top > 0 else pool


def pick_when_every_epoch_leaks(pool: list[EpochCheck], min_share: float = LEAKING_PICK_MIN_SHARE) -> EpochCheck:
    """The best epoch when every epoch leaks (`pool`: the learned epochs, or all where none learned): among the
    epochs whose improvement is at least `min_share` of the pool's best (`LEAKING_PICK_MIN_SHARE`: not one that has
    barely trained), the lowest validation loss among those leaking (about, `LEAK_MARGIN`) least, so that a noisy
    early epoch does not win on leakage alone. `min_share` 0: the rule before 2026-12-06."""
    pool = over_floor(pool, min_share)
    least = min(e.leak or 0.0 for e in pool)
    return min((e for e in pool if (e.leak or 0.0) <= least + LEAK_MARGIN), key=lambda e: e.val_loss)


def _as_good(epoch: EpochCheck, low: EpochCheck) -> bool:
    """`epoch`'s validation loss is within `NOISE_SE` standard errors of `low`'s, paired pair by pair (both
    scored the same fixed noise); without per-pair losses (a report from an older version) only `low` is."""
    if epoch is low:
        return True
    a, b = epoch.pair_losses, low.pair_losses
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return False
    diff = [x - y for x, y in zip(a, b)]
    return statistics.fmean(diff) <= NOISE_SE * statistics.stdev(diff) / math.sqrt(len(diff))


# ---------------------------------------------------------------------------------- as text (CLI)
_TITLES = {"learned": "learned", "not_learned": "not learned yet", "leaks": "leaks", "pending": "not scored yet"}
MAX_LINES = 6  # epochs listed in the text block (the best and the last ones)


def other_words(source: str | None) -> str:
    """The other concepts' pictures in words (`LearnReport.other_source`; a report without it: regularisation)."""
    return "leak-check images" if source == LEAK_CHECK else "regularisation images"


def leak_method(report: dict[str, Any], quote: str = "'") -> str:
    """How leakage was measured, in words (the report's `leak_measure`); the trigger between `quote`s."""
    trigger = report.get("trigger") or ""
    if not trigger:
        return "no trigger in the captions, so leakage is not measured"
    if report.get("leak_measure") == OTHER_CONCEPTS:
        held = " (never trained on)" if report.get("other_source") == LEAK_CHECK else ""
        return (f"leakage on {report.get('other_images', 0)} {other_words(report.get('other_source'))}{held} with "
                "their own captions: the "
                f"LoRA's change there against its change on the pictures with the trigger {quote}{trigger}{quote} "
                "(timestep 500, fixed noise)")
    if report.get("leak_measure", TRIGGER_REMOVED) == TRIGGER_REMOVED:  # an older version's report
        return f"with and without the trigger {quote}{trigger}{quote}"
    return "leakage not checked (no leak-check folder or regularisation images)"


def leak_limit_words(report: dict[str, Any]) -> str:
    """What "leaks" means for the report's measure, with its limit."""
    limit = (report.get("thresholds") or {}).get("leak_max")
    if limit is None:
        return "not judged without pictures of other subjects (a leak-check folder or regularisation images)"
    if report.get("leak_measure") == OTHER_CONCEPTS:
        return (f"the {other_words(report.get('other_source'))}' prompts changed more than {limit:.0%} as much as "
                "the trigger's")
    return f"more than {limit:.0%} of its effect shown without the trigger"


def epoch_line(report: dict[str, Any], epoch: dict[str, Any] | None = None) -> str:
    """One epoch's scores in words: `epoch 2: validation loss 0.1200 (2.7% below the base model's), leakage 20%`."""
    e = epoch or report["epochs"][-1]
    leak = "" if e.get("leak") is None else f", leakage {e['leak']:.0%}"
    return (f"epoch {e['epoch']}: validation loss {e['val_loss']:.5f} ({e['improvement']:.1%} below the base "
            f"model's){leak}")


def report_text(report: dict[str, Any] | None) -> str:
    """The report as a short text block for the CLI; its last line is the one-sentence verdict."""
    if not report:
        return ""
    epochs = report.get("epochs") or []
    best = report.get("best_epoch")
    shown = epochs[-MAX_LINES:]
    if best is not None and all(e["epoch"] != best for e in shown):
        shown = [e for e in epochs if e["epoch"] == best] + shown[1:]
    th = report.get("thresholds") or {}
    lines = [f"Did it learn? {_TITLES.get(report.get('verdict', ''), report.get('verdict', ''))}",
             f"  scored: {report.get('pairs', 0)} fixed noise/timestep pairs on {report.get('images', 0)} images "
             f"({report.get('method', '')}); " + leak_method(report),
             "  base model: " + (f"validation loss {report['base_loss']:.5f}" if report.get("base_loss") is not None
                                  else "not scored yet")]
    lines += ["  " + epoch_line(report, e) + ("  <- best" if e["epoch"] == best else "") for e in shown]
    if len(shown) < len(epochs):
        lines.insert(3, f"  ({len(epochs) - len(shown)} earlier epochs not listed)")
    if best is not None and (report.get("best_lora") or report.get("best_path")):
        lines.append(f"  best epoch {best}: {report.get('best_lora') or report.get('best_path')}")
    if th:
        lines.append(f"  thresholds: learned = at least {th.get('learned_min_improvement', 0):.0%} below the base "
                     f"model; leaks = {leak_limit_words(report)}" + (f" ({th['source']})" if th.get("source") else ""))
    lines.append(report.get("message", ""))
    return "\n".join(lines)
