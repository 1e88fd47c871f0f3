"""Errors about LoRA files and networks, shown to users as is."""

from __future__ import annotations

from ..errors import LoraTrainerError


class LoraFileError(LoraTrainerError):
    """A LoRA file cannot be read, written, or does not fit the model."""
