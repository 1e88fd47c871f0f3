"""What the core asks of the program it runs in: the WebUI (A1111, Forge) or nothing (standalone).

The job runner (jobs.py) and the API/UI talk to a Host; `lora_trainer.webui` implements it for
each WebUI, StandaloneHost (to be built with jobs.py) for the CLI, tests and `serve`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .models.bundle import ModelBundle


@runtime_checkable
class Host(Protocol):
    name: str  # "standalone" | "a1111" | "forge"

    def acquire_model(self, config: Any) -> ModelBundle | None:
        """The model to train: the host's loaded model (zero-copy), or None to let the engine load
        `config.model` (or the host's `model` attribute) from disk."""

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


class StandaloneHost:
    """The host when no WebUI is around: the CLI's `serve`/`ui`, tests, scripts.

    bundle_factory: builds the model to train (tests: a tiny model); without it `config.model`
    is loaded from disk for each run and dropped afterwards.
    """

    name = "standalone"

    def __init__(self, lora_dir: str | Path, *, model: str | Path | None = None,
                 bundle_factory: Callable[[], ModelBundle] | None = None, device: str = "cpu",
                 allowed_roots: list[Path] | None = None) -> None:
        self._lora_dir = Path(lora_dir)
        self.model = Path(model) if model else None
        self._bundle_factory = bundle_factory
        self._device = device
        self._roots = [Path(r) for r in allowed_roots] if allowed_roots is not None else None
        self._lock = threading.Lock()
        self._factory_info: dict[str, Any] | None = None
        self.events: list[Any] = []  # the last events reported, for tests and debugging
        self.saved: list[Path] = []

    def acquire_model(self, config: Any) -> ModelBundle | None:
        """The factory's bundle; None lets the engine load the checkpoint itself (placed and cast for
        training on the best device, which a bundle handed in as "the host's model" would not be)."""
        if self._bundle_factory is not None:
            return self._bundle_factory()
        return None

    def release_model(self, bundle: ModelBundle | None) -> None:
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass

    @property
    def fixed_model(self) -> str | None:
        """What every run trains whatever a request names (the factory's model), else None."""
        return "its built-in model (started with --tiny)" if self._bundle_factory is not None else None

    def model_info(self) -> dict[str, Any]:
        """What a run will train on, for the tab (optional host hook): name, family label, device."""
        if self._bundle_factory is not None:
            if self._factory_info is None:  # tests and `--tiny`: small, built once to read its facts
                bundle = self._bundle_factory()
                self._factory_info = {"name": bundle.name, "family": bundle.family.label,
                                      "device": str(next(bundle.unet.parameters()).device)}
                del bundle
            return dict(self._factory_info)
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # where the engine's "auto" trains
        if self.model is None:
            return {"name": "", "family": None, "device": device,
                    "note": "none given: type a checkpoint file in step 4, or start with --model"}
        return {"name": self.model.name, "family": checkpoint_family(self.model), "device": device}

    def lora_dir(self) -> Path:
        return self._lora_dir

    def gpu_lock(self) -> AbstractContextManager[Any]:
        return self._lock

    def device(self) -> torch.device:
        import torch

        return torch.device(self._device)

    def report(self, event: Any) -> None:
        self.events = (self.events + [event])[-200:]

    def interrupted(self) -> bool:
        return False

    def after_save(self, lora_path: Path) -> None:
        self.saved.append(Path(lora_path))

    def allowed_roots(self) -> list[Path] | None:
        return self._roots


def checkpoint_family(path: str | Path) -> str | None:
    """The family label of a .safetensors checkpoint from its header (None when it cannot tell cheaply)."""
    if Path(path).suffix.lower() != ".safetensors":
        return None
    try:
        return _header_family(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return None


@functools.lru_cache(maxsize=32)
def _header_family(path: str, mtime_ns: int) -> str | None:  # the tab asks about once a second
    try:
        from .models.detect import classify, read_safetensors_header

        return classify(read_safetensors_header(path)[0], Path(path).name).label
    except Exception:  # noqa: BLE001 - not knowing the family is fine here; training checks properly
        return None
