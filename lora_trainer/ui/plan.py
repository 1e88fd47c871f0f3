"""What the tab says before training: which model, which device and how much memory, whether the
preset fits the model, and how long the run will take. No Gradio here.

Everything is read from the host (`model_info()`, an optional hook; `device()`) and the plan, so a new
model family or host shows up here without changes: the family is whatever label the host reports.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from ..config import PRESETS
from ..train.events import Schedule, estimate_seconds

log = logging.getLogger(__name__)

# Rough training speed of a mid-range consumer GPU (12-16 GB) for one image at the family's usual
# resolution, used only before this computer has trained once; after that, its measured speed is used.
# Families not listed get no first-time guess.
# Flux: an H200 trains 1.0-1.36 it/s at 1024 px over the Flux Forge holds (bench/results/flux_forge_handoff_h200.md);
# a 16-24 GB card about half of that.
# Chroma: Flux's guess. Its transformer has 8.90B parameters against FLUX.1-dev's 11.90B (our ChromaTransformer at
# full size = kohya's Chroma: 8,899,983,424, docs/internals.md; FLUX.1-dev 11,901 M, docs/forge.md); the 3.28B it
# lacks (modulation Linears, time/vector/guidance embedders; it adds a 0.28B approximator) run once per image, not
# per token: the per-token Linears and attention, which set a step's time, are FLUX.1's. Not measured on a GPU yet.
_FIRST_GUESS_IT_S = {"SD1": (6.0, 512), "SD2": (5.0, 768), "SDXL": (1.2, 1024), "Flux": (0.5, 1024),
                     "Chroma": (0.5, 1024)}


@dataclass
class Setup:
    model: str  # what will be trained on, in words
    family: str | None  # "SD1", "SDXL", ... as the host reports it; None when unknown yet
    device: str  # "cuda" / "cpu" / ...
    device_text: str  # "NVIDIA RTX 4070" / "CPU (...)"
    note: str = ""  # e.g. "loads when training starts"
    free: int | None = None  # bytes free on the device (GPU memory; RAM for the CPU), None when unknown
    total: int | None = None


def describe_setup(host: Any) -> Setup:
    info: dict[str, Any] = {}
    hook = getattr(host, "model_info", None)
    if callable(hook):
        try:
            info = dict(hook() or {})
        except Exception:  # a host that cannot tell must not break the tab
            log.debug("host.model_info failed", exc_info=True)
    device = str(info.get("device") or _host_device(host))
    free, total = _memory(device)
    return Setup(model=str(info.get("name") or ""), family=info.get("family") or None, device=device,
                 device_text=_device_text(device), note=str(info.get("note") or ""), free=free, total=total)


def _host_device(host: Any) -> str:
    try:
        return str(host.device())
    except Exception:  # noqa: BLE001 - a host that cannot tell trains where torch decides
        return "cpu"


def _device_text(device: str) -> str:
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(torch.device(device).index or 0)
        except Exception:  # no driver, busy device: say what we know
            log.debug("cannot read the GPU's name", exc_info=True)
    if device.startswith("cpu"):
        return "CPU (no CUDA GPU: fine for the tiny test model, very slow for a real one)"
    return device


def _memory(device: str) -> tuple[int | None, int | None]:
    """(free, total) bytes where a run on `device` keeps its weights: the GPU's memory, or RAM."""
    try:
        if device.startswith("cuda"):
            import torch

            if torch.cuda.is_available():
                return torch.cuda.mem_get_info(torch.device(device).index or 0)
        elif device.startswith("cpu"):
            page = os.sysconf("SC_PAGE_SIZE")
            return _ram_available() or os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except Exception:  # not POSIX, no driver, busy device: the line says nothing about memory
        log.debug("cannot read the device's memory", exc_info=True)
    return None, None


def _ram_available() -> int | None:
    """Linux's MemAvailable: free RAM plus the file cache it would give up (what a run can still use)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # not Linux
        pass
    return None


def steady(setup: Setup, shown_free: int | None) -> Setup:
    """`setup` with the free memory the page already shows, unless it moved noticeably (half a GiB or 5%
    of the device, whichever is more): other programs and the run itself move it a little all the time,
    and a number that changes every second says nothing a user can act on."""
    if setup.free is None or shown_free is None:
        return setup
    if abs(setup.free - shown_free) < max(2**29, 0.05 * (setup.total or 0)):
        return replace(setup, free=shown_free)
    return setup


def setup_md(setup: Setup) -> str:
    model = f"`{setup.model}`" if setup.model else "none yet"
    family = f" ({setup.family})" if setup.family else ""
    note = f" — {setup.note}" if setup.note else ""
    memory = ""
    if setup.free is not None and setup.total:
        free, total = setup.free / 2**30, setup.total / 2**30
        memory = (f", {free:.1f} GiB of RAM free" if setup.device.startswith("cpu")
                  else f" ({free:.1f} of {total:.1f} GiB free)")
    return f"**Model:** {model}{family}{note} · **Device:** {setup.device_text}{memory}"


# Which model families a preset's key prefix is made for (a family not listed: its own name).
_PRESET_FITS = {"sd15": ("sd1", "sd2"), "sdxl": ("sdxl",), "flux": ("flux", "chroma")}


def preset_family(preset_key: str) -> str:
    """The family prefix of a preset key: "sd15-lowvram" → "sd15", "flux-12gb" → "flux"."""
    return preset_key.lower().split("-")[0]


def _fits(preset_key: str, family: str) -> bool:
    prefix = preset_family(preset_key)
    return family.lower() in _PRESET_FITS.get(prefix, (prefix,))


def preset_warning(preset_key: str, family: str | None) -> str:
    """A warning when the preset is made for another family than the model (e.g. SDXL on SD1)."""
    if not family or preset_key not in PRESETS or _fits(preset_key, family):
        return ""
    preset = PRESETS[preset_key]
    made_for = preset.label.split(" ")[0]  # "SDXL", "SD1.5", "Flux.1"
    res = preset.settings.get("resolution")
    fits = [p.label for k, p in PRESETS.items() if _fits(k, family)]
    hint = f"pick {' or '.join(fits)}" if fits else "pick a preset made for it"
    return (f"⚠️ The preset is made for {made_for} models (it trains at {res} px), but the model is {family}; "
            f"{hint}.")


# ---------------------------------------------------------------------------------- time
def _scaled_rate(rate: float, res_from: int, batch_from: int, res_to: int, batch_to: int) -> float:
    """Steps/s at another resolution and batch: time per step grows with pixels × images."""
    return rate * (res_from * res_from * max(1, batch_from)) / (res_to * res_to * max(1, batch_to))


def _measured(history: list[dict[str, Any]], family: str | None) -> dict[str, Any] | None:
    """The newest earlier run of the same family that measured its speed."""
    for job in sorted(history, key=lambda j: j.get("created") or 0, reverse=True):
        if job.get("kind") == "train" and job.get("it_per_s") and job.get("config") and (
                not family or not job.get("family") or job.get("family") == family):
            return job
    return None


def _hm(seconds: float) -> str:
    m = max(1, round(seconds / 60))
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


def time_estimate(config: Any, plan: Any, setup: Setup, history: list[dict[str, Any]]) -> str:
    """One line: about how long the training takes (steps, samples and saves), and what it is based on."""
    schedule = Schedule.of(config, plan)
    batch = max(1, plan.batch_size * plan.gradient_accumulation_steps)
    past = _measured(history, setup.family)
    if past is not None:
        cfg = past["config"]
        rate = _scaled_rate(float(past["it_per_s"]), int(cfg.get("resolution") or config.resolution),
                            int(cfg.get("batch_size") or 1) * int(cfg.get("gradient_accumulation_steps") or 1),
                            config.resolution, batch)
        seconds = estimate_seconds(schedule, 0, rate)
        when = "under a minute" if seconds < 60 else f"about {_hm(seconds)}"
        return (f"**Time:** {when} for {plan.total_steps} steps at about {rate:.2f} it/s (measured by the run "
                f"'{past.get('label', '')}' here, scaled to this resolution and batch), plus loading the model.")
    guess = _FIRST_GUESS_IT_S.get(setup.family or "")
    if setup.device.startswith("cuda") and guess:
        rate = _scaled_rate(guess[0], guess[1], 1, config.resolution, batch)
        low, high = (estimate_seconds(schedule, 0, rate * k) for k in (2.0, 0.5))
        return (f"**Time:** roughly {_hm(low)} to {_hm(high)} for {plan.total_steps} steps, depending on the GPU "
                "(a first guess; once a run has trained here, the estimate uses its measured speed).")
    if setup.device.startswith("cpu"):
        return (f"**Time:** {plan.total_steps} steps on the CPU; the speed is measured by the first run here "
                "(a real SD1.5 model takes about a minute per step on a CPU).")
    return f"**Time:** {plan.total_steps} steps; the speed is measured by the first run here."


def plan_md(config: Any, plan: Any, setup: Setup, history: list[dict[str, Any]], *, warnings: list[str] = ()
            ) -> str:
    """The "Check plan" answer: model/device, warnings, the time estimate and the steps arithmetic."""
    lines = [setup_md(setup)]
    warn = preset_warning(config.preset, setup.family) if getattr(config, "preset", "") else ""
    lines += [w for w in [warn, *warnings] if w]
    lines.append(time_estimate(config, plan, setup, history))
    return "\n\n".join(lines) + "\n\n```\n" + plan.text() + "\n```"
