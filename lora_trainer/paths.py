"""Safe handling of paths and names that come from users (the UI, the HTTP API).

A WebUI that listens beyond loopback lets anyone who can reach it type paths, so every typed path
is resolved (symlinks, `..`) and must stay inside the host's allowed roots; LoRA names and
sub-folders can never leave the Lora folder; published files never overwrite existing ones.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import LoraTrainerError


class UserPathError(LoraTrainerError):
    """A typed path is empty, missing, or of the wrong kind (file vs folder)."""


class PathNotAllowedError(UserPathError):
    """A typed path lies outside the folders this server may touch."""


class InvalidNameError(LoraTrainerError):
    """A LoRA name or sub-folder cannot be used as a file name."""


# Windows refuses these as file names whatever the extension; A1111 runs on Windows a lot.
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_BAD_CHARS = re.compile(r'[<>:"/\\|?*]')
MAX_NAME_LEN = 120


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_user_path(value: str | os.PathLike[str], roots: Sequence[Path] | None, *,
                      must_exist: bool = True, kind: str | None = "dir", what: str = "folder") -> Path:
    """The absolute, symlink-free path a user typed, checked against `roots` (None: anywhere).

    kind: "dir", "file" or None (either). `what` names the path in messages ("dataset folder").
    """
    text = str(value).strip().strip('"').strip("'")
    if not text:
        raise UserPathError(f"The {what} is empty; type the full path of the {what}.")
    if "\x00" in text:
        raise UserPathError(f"The {what} contains a NUL character; type a plain path.")
    path = Path(os.path.expanduser(text)).resolve()
    if roots is not None:
        resolved_roots = [Path(r).expanduser().resolve() for r in roots]
        if not any(_inside(path, r) for r in resolved_roots):
            allowed = ", ".join(str(r) for r in resolved_roots) or "(none)"
            raise PathNotAllowedError(
                f"The {what} {path} is outside the folders this server may use; "
                f"use a folder inside {allowed} or add it to the allowed folders in Settings.")
    if must_exist:
        if not path.exists():
            raise UserPathError(f"The {what} {path} does not exist; check the path.")
        if kind == "dir" and not path.is_dir():
            raise UserPathError(f"The {what} {path} is a file, not a folder; give its folder.")
        if kind == "file" and not path.is_file():
            raise UserPathError(f"The {what} {path} is not a file; give the path of a file.")
    return path


def check_can_create_in(folder: str | os.PathLike[str], what: str, remedy: str) -> Path:
    """Raise UserPathError unless new files can be created in `folder`, or, when it does not exist
    yet, unless it can be created (its nearest existing parent is a folder we can write into).
    Proven by creating and removing a temporary file: permissions, read-only disks, ACLs and a
    full disk all answer the same way. Nothing is left behind. Returns the folder as a Path."""
    folder = Path(folder)
    target = folder
    if target.exists():
        if not target.is_dir():
            raise UserPathError(f"The {what} {folder} is a file, not a folder; {remedy}.")
    else:
        parent = target.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UserPathError(f"The {what} {folder} cannot be created because {parent} is a file; {remedy}.")
        target = parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = f"the {what} {folder}" if target == folder else f"{target} (to create the {what} {folder})"
        raise UserPathError(f"Cannot write into {where}: {e.strerror or e}; {remedy}.") from None
    return folder


def check_new_file(path: str | os.PathLike[str], what: str, remedy: str) -> Path:
    """Raise UserPathError unless `path` can be written as a file: not a folder, in an existing folder
    we can write into (missing folders are not created: a typo should not make a tree of them)."""
    path = Path(path)
    if path.is_dir():
        raise UserPathError(f"The {what} {path} is a folder; give a file name, e.g. {path / 'report.json'}.")
    if not path.parent.is_dir():
        raise UserPathError(f"The folder of the {what} ({path.parent}) does not exist; create it first, or "
                            f"{remedy}.")
    check_can_create_in(path.parent, f"folder of the {what}", remedy)
    return path


def validate_lora_name(name: str, *, what: str = "LoRA name") -> str:
    """The name as a safe single file-name stem (a trailing `.safetensors` is dropped)."""
    text = unicodedata.normalize("NFC", str(name)).strip()
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")].rstrip()
    remedy = "use letters, digits, spaces, '-', '_' or '.' only"
    if not text:
        raise InvalidNameError(f"The {what} is empty; type a name for the LoRA.")
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise InvalidNameError(f"The {what} {text!r} contains control characters; {remedy}.")
    if _BAD_CHARS.search(text):
        raise InvalidNameError(f"The {what} {text!r} contains a path separator or a reserved character; {remedy}.")
    if text in {".", ".."} or text.startswith("."):
        raise InvalidNameError(f"The {what} {text!r} starts with a dot; {remedy} and start with a letter or digit.")
    if text.endswith((".", " ")):
        raise InvalidNameError(f"The {what} {text!r} ends with a dot or a space; remove it.")
    if text.split(".")[0].upper().rstrip() in _RESERVED:
        raise InvalidNameError(f"The {what} {text!r} is a reserved device name on Windows; choose another name.")
    if len(text) > MAX_NAME_LEN:
        raise InvalidNameError(f"The {what} is {len(text)} characters long; use at most {MAX_NAME_LEN}.")
    return text


def lora_subdir(lora_dir: Path, sub: str | None) -> Path:
    """`lora_dir/sub` for a relative sub-folder like "mine" or "people/alice"; never outside lora_dir."""
    base = Path(lora_dir).resolve()
    parts = [p for p in re.split(r"[/\\]", (sub or "").strip()) if p not in ("",)]
    for part in parts:
        validate_lora_name(part, what="output sub-folder")
    target = base.joinpath(*parts).resolve() if parts else base
    if not _inside(target, base):  # a symlinked sub-folder pointing elsewhere
        raise PathNotAllowedError(f"The output sub-folder {sub!r} leads outside the Lora folder {base}; "
                                  "choose a plain sub-folder name.")
    return target


def fresh_stem(dest_dir: Path, stem: str, suffixes: Iterable[str]) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... : the first for which no `<stem><suffix>` exists yet."""
    suffixes = list(suffixes)
    n = 1
    while True:
        candidate = stem if n == 1 else f"{stem}_{n}"
        if not any((dest_dir / f"{candidate}{s}").exists() for s in suffixes):
            return candidate
        n += 1


def _claim(tmp: Path, dest: Path) -> None:
    """Give the finished temp file the name `dest` unless that name exists (FileExistsError).

    A hard link claims the name atomically and fails instead of overwriting if another writer got
    there first; file systems without hard links fall back to an existence check + os.replace.
    """
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError:
        if dest.exists():
            raise FileExistsError(str(dest)) from None
        os.replace(tmp, dest)


def write_new_file(dest: Path, data: bytes | None = None, *, src: Path | None = None) -> None:
    """Create `dest` atomically from `data` or a copy of `src`; never overwrites (FileExistsError)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; LoRAs must be readable like any model file
    try:
        with os.fdopen(fd, "wb") as out:
            if src is not None:
                with open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out)
            else:
                out.write(data or b"")
            out.flush()
            os.fsync(out.fileno())
        _claim(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
