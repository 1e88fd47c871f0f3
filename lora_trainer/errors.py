"""Errors meant for users: one sentence of cause and one of remedy, shown without a traceback."""

from __future__ import annotations


class LoraTrainerError(Exception):
    """Base class: the message is complete and safe to show to a user as is."""


class UnsupportedModelError(LoraTrainerError):
    """The file is not a model we can train on (wrong family, format, truncated, ...)."""


class ConfigError(LoraTrainerError):
    """A training or tagging setting is invalid."""


class DatasetError(LoraTrainerError):
    """The dataset folder or one of its files cannot be used."""


class TaggerError(LoraTrainerError):
    """The WD14 tagger model is missing or cannot run."""


class TrainingError(LoraTrainerError):
    """Training stopped for a reason the user can act on (OOM, NaN loss, ...)."""


class MissingPackageError(LoraTrainerError):
    """An optional package is needed for the chosen setting."""

    def __init__(self, package: str, needed_for: str):
        super().__init__(
            f"{needed_for} needs the Python package '{package}', which is not installed; "
            f"install it with `pip install {package}` or choose another setting."
        )
        self.package = package
