"""Concept / class names that become folder names (`10_mychar woman`): safe on every OS."""

from __future__ import annotations

from ..errors import DatasetError

_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
_FORBIDDEN = set('<>:"|?*')
MAX_NAME = 120


def validate_name(name: str | None, what: str = "Concept") -> str:
    """Return `name` if it can be a folder name inside the dataset; raise DatasetError otherwise."""
    example = "'mychar woman'" if what == "Concept" else "'woman'"
    remedy = f"use a plain name such as {example}."
    if name is None or not name.strip():
        raise DatasetError(f"{what} name is empty; {remedy}")
    if "/" in name or "\\" in name:
        raise DatasetError(f"{what} name '{name}' contains a path separator; {remedy}")
    if ".." in name or name in (".",):
        raise DatasetError(f"{what} name '{name}' contains '..'; {remedy}")
    bad = sorted({c for c in name if c in _FORBIDDEN or ord(c) < 32})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise DatasetError(f"{what} name '{name}' contains characters not allowed in folder names ({shown}); {remedy}")
    if name != name.strip() or name.endswith("."):
        raise DatasetError(f"{what} name '{name}' starts or ends with a space or ends with a dot; {remedy}")
    if name.split(".")[0].upper().rstrip() in _WINDOWS_RESERVED:
        raise DatasetError(f"{what} name '{name}' is a reserved device name on Windows; {remedy}")
    if len(name) > MAX_NAME:
        raise DatasetError(f"{what} name is {len(name)} characters long (at most {MAX_NAME}); {remedy}")
    return name


def validate_repeats(repeats: int, what: str = "Repeats") -> int:
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= 10000:
        raise DatasetError(f"{what} {repeats!r} is not a whole number from 1 to 10000; use e.g. 10.")
    return repeats
