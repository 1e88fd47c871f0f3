"""What the core asks of the program it runs in: the WebUI (A1111, Forge) or nothing (standalone).

The job runner (jobs.py) and the API/UI talk to a Host; `lora_trainer.webui` implements it for
each WebUI, StandaloneHost (to be built with jobs.py) for the CLI, tests and `serve`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .models.bundle import ModelBundle


@runtime_checkable
class Host(Protocol):
    name: str  # "standalone" | "a1111" | "forge"

    def acquire_model(self, config: Any) -> ModelBundle:
        """The model to train: the host's loaded model (zero-copy) or `config.model` loaded from disk."""

    def release_model(self, bundle: ModelBundle) -> None:
        """Give the host its model back exactly as it was (bit-identical, on its device); free memory."""

    def lora_dir(self) -> Path:
        """Where finished LoRAs go (the WebUI's Lora folder)."""

    def gpu_lock(self) -> AbstractContextManager[Any]:
        """Held for the whole run so generation waits instead of colliding (WebUI queue_lock)."""

    def device(self) -> torch.device:
        """Where to train."""

    def report(self, event: Any) -> None:
        """Mirror a ProgressEvent in the host's own progress display."""

    def interrupted(self) -> bool:
        """True once the host's own Interrupt/Skip button asked training to stop."""

    def after_save(self, lora_path: Path) -> None:
        """Make a new LoRA visible (refresh the host's Lora list)."""

    def allowed_roots(self) -> list[Path] | None:
        """Folders user-typed paths must stay inside; None when any path is allowed."""
