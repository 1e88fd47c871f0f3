"""What the tab shows of a run, computed without Gradio: the progress bars (training and the phase it is in),
the loss figure, sample thumbnails, A/B grids, the result card and the "did it learn?" report.

Kept apart from the layout so the same code runs on Gradio 3.41 and 4.x and is easy to test; `logic`
re-exports every name (the tab and tests read them there).
"""

from __future__ import annotations

import html
import logging
import math
import re
from pathlib import Path
from typing import Any

from PIL import Image

from .texts import form_message

log = logging.getLogger(__name__)


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


PHASE_WORDS = {"cache": "Preparing", "sample": "Sampling", "save": "Saving", "grid": "Before/after grid"}


def progress_html(job: dict[str, Any] | None) -> str:
    """A progress bar with step/epoch/loss/speed/ETA/GPU memory, a second bar for the phase the run is
    in when it is not a training step (caching, sampling, saving), and the job's message."""
    if not job:
        return "<div id='lora_trainer_progress_idle'>No training run yet.</div>"
    total = job.get("total_steps") or 0
    step = job.get("step") or 0
    pct = 100.0 * step / total if total else 0.0
    state = job["state"]
    colour = {"failed": "#d9534f", "stopped": "#f0ad4e", "done": "#5cb85c"}.get(state, "#3b82f6")
    parts = [f"<b>{html.escape(state.capitalize())}</b>"]
    if total:
        parts.append(f"step {step}/{total}")
    if job.get("total_epochs"):
        parts.append(f"epoch {job.get('epoch') or 0}/{job['total_epochs']}")
    if job.get("loss") is not None:
        smoothed = job.get("smoothed_loss")
        parts.append(f"loss {job['loss']:.4f}" + (f" (avg {smoothed:.4f})" if smoothed is not None else ""))
    if job.get("it_per_s"):
        parts.append(f"{job['it_per_s']:.2f} it/s")
    if state == "running" and job.get("eta_s") is not None:
        parts.append(f"ETA {_hms(job['eta_s'])}")
    phase = ""
    if state == "running" and job.get("phase") in PHASE_WORDS:
        done, of = job.get("phase_done") or 0, job.get("phase_total") or 0
        width = 100.0 * done / of if of else 0.0
        phase = (f"<div class='lora_trainer_phase' data-phase='{html.escape(job['phase'])}' style='margin-top:4px'>"
                 f"<div style='background:#8883;border-radius:4px;height:6px;overflow:hidden'>"
                 f"<div style='width:{width:.1f}%;background:#a855f7;height:100%'></div></div>"
                 f"<b>{PHASE_WORDS[job['phase']]}</b> {done}/{of}</div>")
    if job.get("vram_bytes"):  # the process's peak reserved GPU memory, as nvidia-smi counts it
        parts.append(f"GPU memory {job['vram_bytes'] / 2**30:.1f} GiB")
    message = form_message(job.get("error") or job.get("message") or "", bold=False)
    notes = "".join(f"<div class='lora_trainer_note' style='margin-top:4px'>Note: {html.escape(n)}</div>"
                    for n in job.get("notes") or [])  # the host's word on the model (e.g. trained from the file)
    return (
        "<div class='lora_trainer_progress'>"
        f"<div style='background:#8883;border-radius:6px;height:14px;overflow:hidden'>"
        f"<div style='width:{pct:.1f}%;background:{colour};height:100%'></div></div>"
        f"<div style='margin-top:6px'>{' · '.join(parts)}</div>{phase}"
        f"<div style='margin-top:4px;opacity:.85'>{html.escape(message)}</div>{notes}</div>"
    )


def loss_figure(history: list[list[Any]], report: dict[str, Any] | None = None):
    """Loss per step and its running average, as a matplotlib Figure (no pyplot global state); once
    the "did it learn?" report has scored an epoch, `report_figure` (validation and leakage beside it)."""
    if report and report.get("epochs"):
        return report_figure(report, history)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    if history:
        steps = [h[0] for h in history]
        ax.plot(steps, [h[1] for h in history], color="#93c5fd", linewidth=1, label="loss")
        smooth = [(h[0], h[2]) for h in history if len(h) > 2 and h[2] is not None]
        if smooth:
            ax.plot([s for s, _ in smooth], [v for _, v in smooth], color="#1d4ed8", linewidth=2,
                    label="average")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "the loss curve appears once training runs", ha="center", va="center",
                transform=ax.transAxes, color="#888")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even in short runs
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def ab_grids(outputs: list[str]) -> list[str]:
    """The A/B grid images among a job's outputs (written by the WebUI adapters after a run)."""
    return [p for p in outputs if re.search(r"\.ab-grid(-\d+)?\.png$", p)]


def sample_items(paths: list[str], limit: int = 24) -> list[tuple[Image.Image, str]]:
    items = []
    for p in paths[-limit:]:
        try:
            with Image.open(p) as im:
                items.append((im.convert("RGB").copy(), Path(p).stem))
        except OSError:
            log.debug("cannot read sample %s", p, exc_info=True)
    return items


def result_md(job: dict[str, Any] | None) -> str:
    """The result card: where the LoRA is and how to use it, or what went wrong and what to change."""
    if not job or job.get("kind") != "train":
        return ""
    state = job["state"]
    if state == "failed":
        return f"### Training failed\n{form_message(job.get('error') or '')}"
    card = report_md(job.get("report"))  # "did it learn?", from the first scored epoch on
    if state not in ("done", "stopped") or not job.get("lora_name"):
        if state == "stopped":
            resume = ("\n\nIts training state was saved: choose it under **Stopped runs** and press **Resume** to "
                      "continue." if job.get("state_dir") else "")
            return f"### Stopped\nNo LoRA was saved before the stop.{resume}" + (f"\n\n{card}" if card else "")
        return card
    title = "LoRA ready" if state == "done" else "Stopped — the LoRA so far is saved"
    lines = [f"### {title}: `{job['lora_name']}`", f"Prompt: `{job.get('prompt_text', '')}`", "", "Files:"]
    lines += [f"- `{p}`" for p in job.get("outputs", [])]
    if state == "stopped" and job.get("state_dir"):
        lines.append("\nPress **Resume** to continue this run where it stopped (it is listed under **Stopped runs**).")
    lines += [f"\nNote: {n}" for n in job.get("notes") or []]
    if card:
        lines += ["", card]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- "did it learn?"
_VERDICT_TITLES = {"learned": "Learned", "not_learned": "Not learned yet", "leaks": "Leaks", "pending": "Scoring…"}


def report_md(report: dict[str, Any] | None) -> str:
    """The "did it learn?" card: the one-sentence verdict, the best epoch's file, what was measured
    and the thresholds with where they come from. Empty without a report."""
    if not report:
        return ""
    from ..train.report import leak_limit_words, leak_method

    title = _VERDICT_TITLES.get(report.get("verdict", ""), "Did it learn?")
    lines = [f"### Did it learn? {title}", report.get("message", "")]
    best = report.get("best_epoch")
    if best is not None:
        name = report.get("best_lora") or (Path(report["best_path"]).stem if report.get("best_path") else None)
        lines.append(f"\nBest epoch: **{best}**" + (f" (`{name}`)" if name else ""))
    epochs = report.get("epochs") or []
    if epochs:
        last = epochs[-1]
        leak = "" if last.get("leak") is None else f", leakage {last['leak']:.0%}"
        lines.append(f"Last epoch: validation loss {last['improvement']:.1%} below the base model's{leak}.")
    th = report.get("thresholds") or {}
    how = (f"Scored on {report.get('pairs', 0)} fixed noise/timestep pairs of {report.get('images', 0)} "
           f"images ({report.get('method', '')}); {leak_method(report, '`')}")
    if th:
        source = f" ({th['source']})" if th.get("source") else ""
        how += (f". Learned means at least {th.get('learned_min_improvement', 0):.0%} below the base model; "
                f"leaking means {leak_limit_words(report)}{source}.")
    lines.append(f"\n<small>{how}</small>")
    return "\n".join(lines)


def report_figure(report: dict[str, Any] | None, history: list[list[Any]] | None = None):
    """Training loss (average), validation loss with the trigger per epoch and leakage per epoch
    (right axis) against the step, the base model's validation loss dashed, the best epoch marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    epochs = (report or {}).get("epochs") or []
    if history:
        smooth = [(h[0], h[2]) for h in history if len(h) > 2 and h[2] is not None]
        if smooth:
            ax.plot([s for s, _ in smooth], [v for _, v in smooth], color="#93c5fd", linewidth=1,
                    label="training loss (average)")
    if epochs:
        steps = [e["step"] for e in epochs]
        ax.plot(steps, [e["val_loss"] for e in epochs], "o-", color="#1d4ed8", linewidth=2,
                label="validation loss (trigger)")
        base = report.get("base_loss")
        if base is not None and not math.isnan(base):
            ax.axhline(base, color="#1d4ed8", linestyle="--", linewidth=1, alpha=0.6, label="base model")
        best = report.get("best_epoch")
        for e in epochs:
            if e["epoch"] == best:
                ax.plot([e["step"]], [e["val_loss"]], marker="*", markersize=16, color="#f59e0b",
                        linestyle="none", label=f"best: epoch {best}")
        leaks = [(e["step"], e["leak"]) for e in epochs if e.get("leak") is not None]
        if leaks:
            ax2 = ax.twinx()
            ax2.plot([s for s, _ in leaks], [v for _, v in leaks], "s-", color="#dc2626", linewidth=1.5,
                     label="leakage (right)")
            limit = (report.get("thresholds") or {}).get("leak_max")
            if limit is not None:
                ax2.axhline(limit, color="#dc2626", linestyle=":", linewidth=1, alpha=0.7)
            ax2.set_ylim(0, max(1.0, max(v for _, v in leaks) * 1.1))
            ax2.set_ylabel("leakage")
            lines, labels = ax.get_legend_handles_labels()
            lines2, labels2 = ax2.get_legend_handles_labels()
            ax.legend(lines + lines2, labels + labels2, loc="best", fontsize=7)
        else:
            ax.legend(loc="best", fontsize=7)
    elif not history:
        ax.text(0.5, 0.5, "the report appears after the first epoch", ha="center", va="center",
                transform=ax.transAxes, color="#888")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
