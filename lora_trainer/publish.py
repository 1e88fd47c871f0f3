"""Names and copies of a run's LoRA files in the Lora folder.

The engine writes every LoRA of a run into its run folder (`<name>.safetensors` final,
`<name>-NNNNNN` epoch saves, `<name>-stepNNNNNNNN` step and stop saves). What the user sees in the
Lora folder says what each file is: the finished LoRA gets the name they chose; anything else says
where in the run it was saved (`<name>-epoch03`, `<name>-step0120`), so a stopped, half-trained
file never takes the name the finished one should have. Each copy gets the WebUI's `<stem>.json`
(activation text, preferred weight, "sd version", a description of what it is) and, when there is
one, a `<stem>.preview.png`. Files are never overwritten: a name in use by another file gets `_2`;
the same file published again (a resumed run lists its earlier saves) is recognised and left alone.
`publish_run` does all of this for a finished or stopped training job (`JobManager` calls it).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hashing import sha256_file
from .paths import fresh_stem, lora_subdir, validate_lora_name, write_new_file

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".json", ".preview.png")
_EPOCH = re.compile(r"-(\d{6})$")
_STEP = re.compile(r"-step(\d{8})$")
_CONCEPT_DIR = re.compile(r"^\d+_(.+)$")
PREFERRED_WEIGHT = 0.8


@dataclass(frozen=True)
class SaveKind:
    """What an engine file is: "final", "epoch" (after epoch `number`) or "step" (after step `number`)."""

    kind: str
    number: int = 0


def save_kind(name: str, path: str | Path) -> SaveKind:
    """Read the engine's file naming (`<name>`, `<name>-NNNNNN`, `<name>-stepNNNNNNNN`)."""
    stem = Path(path).stem
    rest = stem.removeprefix(name)
    if m := _STEP.search(rest):
        return SaveKind("step", int(m.group(1)))
    if m := _EPOCH.search(rest):
        return SaveKind("epoch", int(m.group(1)))
    return SaveKind("final")


def lora_stem(name: str, kind: SaveKind, *, total_epochs: int = 0, total_steps: int = 0) -> str:
    """The name in the Lora folder: `name`, `name-epoch03` (of 10), `name-step0120` (of 1000)."""
    if kind.kind == "epoch":
        return f"{name}-epoch{kind.number:0{max(2, len(str(total_epochs)))}d}"
    if kind.kind == "step":
        return f"{name}-step{kind.number:0{max(2, len(str(total_steps)))}d}"
    return name


def describe(kind: SaveKind, *, stopped: bool, step: int, total_steps: int, epoch: int, total_epochs: int) -> str:
    """One sentence for the `.json` description: what this file is within its run."""
    if kind.kind == "final":
        return f"Finished LoRA: {step} steps, {total_epochs} epochs."
    if stopped:
        return (f"Stopped during epoch {epoch} of {total_epochs}, at step {step} of {total_steps}; "
                "Resume in LoRA Trainer continues it.")
    if kind.kind == "epoch":
        return f"Intermediate save after epoch {kind.number} of {total_epochs}."
    return f"Intermediate save at step {kind.number} of {total_steps}."


@dataclass
class Published:
    path: Path  # the .safetensors in the Lora folder
    stem: str
    files: list[Path]  # everything written or found: .safetensors, .json, .preview.png
    new: bool  # False: this very file was published before (kept as it was)


def publish_file(src: Path, dest_dir: Path, stem: str, *, preview: bytes | None = None) -> Published:
    """Copy `src` into `dest_dir` as `<stem>.safetensors` (or `<stem>_2`... when the name is taken by
    another file). The caller writes the `.json` beside `path` when `new`."""
    n = 1
    while (same := dest_dir / f"{_numbered(stem, n)}.safetensors").exists():  # published before?
        if _same_file(same, src):
            found = _numbered(stem, n)
            files = [p for p in (same, same.with_suffix(".json"), dest_dir / f"{found}.preview.png") if p.exists()]
            return Published(same, found, files, new=False)
        n += 1
    for _ in range(100):  # another writer may claim a name between the check and the write
        fresh = fresh_stem(dest_dir, stem, LORA_SUFFIXES)
        path = dest_dir / f"{fresh}.safetensors"
        try:
            write_new_file(path, src=src)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 races in a row
        from .job_record import JobError

        raise JobError(f"Could not find a free file name for {stem} in {dest_dir}; choose another LoRA name.")
    files = [path]
    if preview is not None:
        try:
            write_new_file(dest_dir / f"{fresh}.preview.png", preview)
            files.append(dest_dir / f"{fresh}.preview.png")
        except FileExistsError:
            log.warning("%s.preview.png appeared meanwhile; left it alone", fresh)
    return Published(path, fresh, files, new=True)


def _numbered(stem: str, n: int) -> str:  # fresh_stem's numbering
    return stem if n == 1 else f"{stem}_{n}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)
    except OSError:
        return False


def epoch_sample(samples: list[str], name: str, epoch: int) -> str | None:
    """The first sample image of `epoch` (the engine's `sample/<name>_eNNNNNN_00.png`)."""
    want = f"{name}_e{epoch:06d}_"
    return next((s for s in samples if Path(s).name.startswith(want)), None)


def publish_run(host: Any, job: Any, config: Any, result: Any, family: str | None) -> None:
    """Copy the run's LoRAs into the host's Lora folder: the finished one under the
    user's name, a stopped run's under `<name>-stepN`, intermediate saves under names that say
    which epoch/step they are; each with its `.json` (incl. "sd version") and a preview."""
    from .train.usermeta import write_user_metadata  # the engine's writer: one format everywhere

    dest_dir = lora_subdir(Path(host.lora_dir()), job.lora_subdir)
    name = validate_lora_name(config.name)
    stopped = bool(getattr(result, "stopped", False))
    main = Path(result.lora_path)
    family = family or file_sd_version(main)
    trigger = activation_text(config)
    meta = user_metadata(config, result, family=family, trigger=trigger)
    card_version = getattr(host, "card_sd_version", None)  # hosts that name families their own way
    if callable(card_version):
        meta["sd version"] = card_version(meta["sd version"])
    totals = {"total_epochs": job.total_epochs or getattr(config, "epochs", 0) or 0,
              "total_steps": job.total_steps or getattr(result, "steps", 0) or 0}
    files = [Path(p) for p in getattr(result, "saved", []) or []]
    files = [p for p in files if p != main and p.is_file()] + [main]  # intermediate saves first, main last
    outputs: list[str] = []
    for src in files:
        kind = save_kind(name, src)
        is_main = src == main
        if is_main and stopped and kind.kind == "final":  # a stop file always says it is one
            kind = SaveKind("step", int(getattr(result, "steps", 0) or job.step))
        sample = (job.samples[-1] if job.samples else None) if is_main else (
            epoch_sample(job.samples, name, kind.number) if kind.kind == "epoch" else None)
        best = bool(job.report) and str(src) == job.report.get("best_path") and not is_main
        stem = lora_stem(name, kind, **totals) + ("-best" if best else "")  # "did it learn?" pick
        done = publish_file(src, dest_dir, stem, preview=preview_png([sample] if sample else []))
        if done.new:
            what = describe(kind, stopped=stopped and is_main, step=int(getattr(result, "steps", 0) or 0),
                                    total_steps=totals["total_steps"], epoch=job.epoch,
                                    total_epochs=totals["total_epochs"])
            if best:
                what = f"{what} The best epoch by the run's \"did it learn?\" report: {job.report['message']}"
            json_path = write_user_metadata(done.path, activation_text=meta["activation text"],
                                            preferred_weight=meta["preferred weight"],
                                            sd_version=meta["sd version"],
                                            description=f"{what} {meta['description']}", notes=meta["notes"])
            done.files.insert(1, json_path)
        if job.report and str(src) == job.report.get("best_path"):  # the best epoch's file, as published
            job.report = {**job.report, "best_lora": done.stem}
        if is_main:
            job.lora_name = done.stem
            if done.stem != lora_stem(name, kind, **totals):
                job.notes.append(f"A LoRA named {lora_stem(name, kind, **totals)} was already in the "
                                 f"Lora folder, so this one is {done.stem}.")
            outputs = [str(p) for p in done.files] + outputs  # the LoRA to use comes first
        else:
            outputs += [str(p) for p in done.files]
        if done.new:
            try:
                host.after_save(done.path)
            except Exception:  # a failed Lora-list refresh must not fail the run
                log.warning("Refreshing the Lora list failed", exc_info=True)
    job.outputs = outputs
    weight = getattr(config, "preferred_weight", PREFERRED_WEIGHT) or PREFERRED_WEIGHT
    job.prompt_text = f"<lora:{job.lora_name}:{weight:g}>" + (f" {trigger}" if trigger else "")
    after_run = getattr(host, "after_run", None)  # optional hook (A1111: the A/B grid)
    if after_run is not None and not stopped:
        try:
            after_run(job)
        except Exception:
            log.warning("The host's after-run step failed", exc_info=True)


def activation_text(config: Any) -> str:
    """The trigger word(s): the setting, else the concept names of the `<N>_<concept>` folders."""
    text = (getattr(config, "activation_text", "") or "").strip()
    if text or not getattr(config, "data", ""):
        return text
    root = Path(config.data)
    folder = root / "img" if (root / "img").is_dir() else root
    try:
        names = sorted(m.group(1).strip() for p in folder.iterdir() if p.is_dir()
                       and (m := _CONCEPT_DIR.match(p.name)))
    except OSError:
        return ""
    return ", ".join(dict.fromkeys(n for n in names if n))


def user_metadata(config: Any, result: Any, *, family: str | None, trigger: str) -> dict[str, Any]:
    """The WebUI's `<name>.json` user metadata (read by A1111's and Forge's Lora cards)."""
    plan = getattr(result, "plan", None)
    steps = getattr(result, "steps", 0)
    parts = [f"Trained with LoRA Trainer for {steps} steps"]
    if plan is not None and getattr(plan, "epochs", None):
        parts[0] += f" ({plan.epochs} epochs planned, {getattr(plan, 'num_images', '?')} images)"
    parts.append(f"rank {config.rank}, alpha {config.alpha:g}, learning rate {config.learning_rate:g}, "
                 f"resolution {config.resolution}, batch {config.batch_size}")
    if getattr(result, "final_loss", None) is not None:
        parts.append(f"final loss {result.final_loss:.4f}")
    if getattr(result, "stopped", False):
        parts.append("stopped early")
    return {
        "description": "; ".join(parts) + ".",
        "sd version": family or "Unknown",
        "activation text": trigger,
        "preferred weight": getattr(config, "preferred_weight", PREFERRED_WEIGHT) or PREFERRED_WEIGHT,
        "notes": f"base model: {Path(str(getattr(config, 'model', '') or 'the WebUI model')).name}",
    }


def file_sd_version(lora: Path) -> str | None:
    """"sd version" read from a LoRA file itself (its ss_* metadata or key shapes)."""
    try:
        from .lora.kohya_file import read_lora_info

        family = read_lora_info(lora).family
    except Exception:  # an unreadable header just means we cannot tell
        log.debug("cannot read %s", lora, exc_info=True)
        return None
    return family.label if family is not None else None


def engine_sd_version(result: Any) -> str | None:
    """"sd version" from the `<name>.json` the engine wrote beside its LoRA in the run folder."""
    lora = getattr(result, "lora_path", None)
    if not lora:
        return None
    try:
        from .train.usermeta import user_metadata_path

        data = json.loads(user_metadata_path(lora).read_text(encoding="utf-8"))
        return str(data.get("sd version") or "") or None
    except (OSError, ValueError, AttributeError):
        return None


def preview_png(samples: list[str]) -> bytes | None:
    """The last sample image as PNG bytes (None when there is none or it cannot be read)."""
    for path in reversed(samples):
        try:
            import io

            from PIL import Image

            with Image.open(path) as im:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                return buf.getvalue()
        except Exception:  # a bad sample just means no preview
            log.debug("cannot read sample %s", path, exc_info=True)
    return None
