"""Names and copies of a run's LoRA files in the Lora folder.

The engine writes every LoRA of a run into its run folder (`<name>.safetensors` final,
`<name>-NNNNNN` epoch saves, `<name>-stepNNNNNNNN` step and stop saves). What the user sees in the
Lora folder says what each file is: the finished LoRA gets the name they chose; anything else says
where in the run it was saved (`<name>-epoch03`, `<name>-step0120`), so a stopped, half-trained
file never takes the name the finished one should have. Each copy gets the WebUI's `<stem>.json`
(activation text, preferred weight, "sd version", a description of what it is) and, when there is
one, a `<stem>.preview.png`. Files are never overwritten: a name in use by another file gets `_2`;
the same file published again (a resumed run lists its earlier saves) is recognised and left alone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .hashing import sha256_file
from .paths import fresh_stem, write_new_file

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".json", ".preview.png")
_EPOCH = re.compile(r"-(\d{6})$")
_STEP = re.compile(r"-step(\d{8})$")


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
        from .jobs import JobError

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
