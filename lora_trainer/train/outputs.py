"""A run's output names, claimed before step 1, and the checks that they can be written.

Two runs writing the same `OUT/<name>*` at once would overwrite each other's LoRAs and state, and
an output folder that cannot be written (a file, read-only, a full disk) used to fail only after
the last step. `claim_outputs` runs before the model loads:

- OUT is (or can be created as) a folder we can write into;
- the run's name in OUT is claimed with an OS file lock (`OUT/.lora-trainer/<name>.lock`, via
  `filelock`): a second live run of the same name, or one whose planned files overlap ours, is
  refused at once with who holds it. The OS drops the lock when its process ends, however it ends,
  so the claim of a killed run is free again; its leftover files are tidied by the next claim;
- no planned file exists already (unless `overwrite`, or it is a file the resumed run saved itself),
  no folder stands where a file goes, and an earlier run's resumable state is not overwritten by a
  new run (resume it, or pass `overwrite`).
`OutputClaim.check_room` (called by the engine once the adapters exist, before step 1) checks that
the disk has room for every file the run will write. The claim is released when the run ends.
Fixed names (docs/internals.md): `OUT/<name>.safetensors`, `-NNNNNN`, `-stepNNNNNNNN`, `<name>-state/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..paths import check_can_create_in

log = logging.getLogger(__name__)

CLAIMS_DIR = ".lora-trainer"  # inside OUT: the locks and who holds them
_DIR_LOCK = "claims.lock"  # held only while claiming or releasing, so those steps never interleave
MARGIN_BYTES = 32 << 20  # headroom beyond the estimate (metadata, sample images, the file system)


class OutputsInUseError(ConfigError):
    """Another live training run writes (some of) the same files."""


def free_bytes(folder: Path) -> int:
    """Free space on the disk holding `folder` (a function of its own so tests can stand in a full disk)."""
    return shutil.disk_usage(folder).free


def _file_lock(path: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(path), timeout=0)


def _try_lock(path: Path) -> Any | None:
    """The lock on `path` if nobody holds it, else None."""
    from filelock import Timeout

    lock = _file_lock(path)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


@contextlib.contextmanager
def _dir_lock(claims: Path, timeout: float = 60.0) -> Iterator[None]:
    from filelock import FileLock

    lock = FileLock(str(claims / _DIR_LOCK), timeout=timeout)
    with lock:
        yield


def _owner_text(info: dict[str, Any]) -> str:
    parts = []
    if info.get("pid"):
        where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
        parts.append(f"process {info['pid']}{where}")
    if info.get("started"):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"]))))
    return f" ({', '.join(parts)})" if parts else ""


def _read_info(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _writable_folder(out: Path) -> None:
    """Create OUT if needed, once a file is proven creatable there (paths.check_can_create_in)."""
    remedy = "choose a folder you can write to with --out (it is created when missing)"
    check_can_create_in(out, "output folder", remedy)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a race with another program, or a disk that filled meanwhile
        raise ConfigError(f"The output folder {out} cannot be created ({e.strerror or e}); {remedy}.") from None


@dataclass
class OutputClaim:
    """The claim on a run's names in OUT; `release()` (or leaving the `with` block) gives it back."""

    out: Path
    name: str
    files: list[Path]  # the LoRA files planned (final, epoch and step saves)
    resumed: set[str] = field(default_factory=set)
    _lock: Any = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def check_room(self, *, lora_bytes: int, state_bytes: int, sample_bytes: int = 0) -> None:
        """ConfigError when the disk lacks room for what the run still writes: each planned LoRA file
        not written yet, a stop file, the resumable state twice (the new one is complete before the old
        one goes) and the samples."""
        left = sum(1 for p in self.files if str(p) not in self.resumed) + 1
        need = left * lora_bytes + 2 * state_bytes + sample_bytes + MARGIN_BYTES
        try:
            free = free_bytes(self.out)
        except OSError:  # cannot tell: the writes themselves will say
            return
        if free < need:
            mib = 1 << 20
            raise ConfigError(
                f"The disk holding {self.out} has {free / mib:,.0f} MiB free, but this run writes about "
                f"{need / mib:,.0f} MiB ({left} LoRA file(s) of {lora_bytes / mib:,.1f} MiB and a resumable state "
                f"of {state_bytes / mib:,.1f} MiB); free some space or choose another folder with --out.")

    def release(self) -> None:
        if self._lock is None:
            return
        claims = self.out / CLAIMS_DIR
        try:
            with _dir_lock(claims):
                with contextlib.suppress(OSError):
                    (claims / f"{self.name}.json").unlink()
                self._lock.release()
                self._lock = None
                with contextlib.suppress(OSError):
                    (claims / f"{self.name}.lock").unlink()
        except Exception:  # never fail a finished run over its claim; the OS lock goes with the process
            log.warning("could not release the claim on %s in %s", self.name, self.out, exc_info=True)
            if self._lock is not None:
                with contextlib.suppress(Exception):
                    self._lock.release()
                self._lock = None

    def __enter__(self) -> OutputClaim:  # noqa: PYI034 - a dataclass, not meant to be subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_outputs(config: Any, planned: Iterable[Path], *, resumed: Iterable[str] = ()) -> OutputClaim:
    """Check OUT and claim `config.name` in it (see the module docstring); raise ConfigError if not."""
    out = Path(config.output_dir)
    name = str(config.name)
    files = list(planned)
    resumed = {str(p) for p in resumed}
    _writable_folder(out)
    claims = out / CLAIMS_DIR
    try:
        claims.mkdir(exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot write into the output folder {out} ({e.strerror or e}); choose a folder you "
                          "can write to with --out.") from None
    ours = {p.name.casefold() for p in files} | {config.state_dir().name.casefold()}
    with _dir_lock(claims):
        _check_other_claims(claims, name, ours)
        lock = _try_lock(claims / f"{name}.lock")
        if lock is None:  # same name, same folder, alive
            info = _read_info(claims / f"{name}.json")
            raise OutputsInUseError(
                f"Another training run{_owner_text(info)} is writing {name} into {out} right now; wait for it "
                "to finish, or choose another --name or --out.")
        try:
            _check_existing(config, files, resumed)
            info = {"name": name, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                    "command": " ".join(sys.argv)[:500], "files": sorted(ours)}
            (claims / f"{name}.json").write_text(json.dumps(info), encoding="utf-8")
        except BaseException:
            lock.release()
            raise
    return OutputClaim(out=out, name=name, files=files, resumed=resumed, _lock=lock)


def _check_other_claims(claims: Path, name: str, ours: set[str]) -> None:
    """Refuse when a live run of another name plans one of our file names; tidy dead runs' claims."""
    for lock_path in claims.glob("*.lock"):
        other = lock_path.stem
        if lock_path.name == _DIR_LOCK or other == name:
            continue
        info_path = claims / f"{other}.json"
        held = _try_lock(lock_path)
        if held is not None:  # its process is gone: a stale claim
            held.release()
            for leftover in (info_path, lock_path):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            continue
        info = _read_info(info_path)
        clash = ours & {str(f).casefold() for f in info.get("files", [])}
        if clash:
            raise OutputsInUseError(
                f"Another training run{_owner_text(info)} named {other} is writing {min(clash)} into "
                f"{claims.parent} right now; wait for it to finish, or choose another --name or --out.")


def _check_existing(config: Any, files: list[Path], resumed: set[str]) -> None:
    for path in files:
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, where the LoRA file goes; remove or rename it, or choose "
                              "another name.")
        if path.exists() and not config.overwrite and str(path) not in resumed:
            raise ConfigError(f"{path} already exists; choose another name or output folder, or pass --overwrite.")
    state = config.state_dir()
    if state.exists() and not state.is_dir():
        raise ConfigError(f"{state} is a file, where the resumable state goes; remove or rename it, or choose "
                          "another name.")
    resuming_it = bool(config.resume) and Path(config.resume).resolve() == state.resolve()
    if state.is_dir() and any(state.iterdir()) and not resuming_it and not config.overwrite:
        raise ConfigError(f"{state} holds the resumable state of an earlier run of {config.name}; continue it with "
                          f"--resume {state}, or choose another name or output folder, or pass --overwrite.")
    samples = Path(config.output_dir) / "sample"
    if getattr(config, "sample_prompts", None) and samples.exists() and not samples.is_dir():
        raise ConfigError(f"{samples} is a file, where sample images go; remove or rename it.")
