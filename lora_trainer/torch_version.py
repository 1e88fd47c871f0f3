"""The running torch's version, for features that need a minimum one."""

from __future__ import annotations

import torch


def torch_at_least(major: int, minor: int) -> bool:
    """torch is `major.minor` or newer; pre-releases and local builds ("2.8.0a0+git…", NGC images) count as
    their release, since they carry its features."""
    parts = torch.__version__.split("+")[0].split(".")[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts) >= (major, minor)
