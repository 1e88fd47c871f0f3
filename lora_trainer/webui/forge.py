"""The Host for Stable Diffusion WebUI Forge (and, where its backend differs, reForge / Forge Classic).

`register()` (webui/__init__.py) picks ForgeHost when `is_forge()` says so. Everything that
touches Forge's modules is imported inside the methods: importing this file costs nothing and
works without Forge (tests, A1111).

What differs from A1111 (see docs/forge.md):
- the model is loaded lazily (`FakeInitialModel` until the first generation): we load the
  selected checkpoint with `sd_models.forge_model_reload()`, under the queue lock;
- weights are inference tensors in Forge's own modules: forge_model.bundle_from_forge() aliases
  them into diffusers modules (zero copy) after putting back the weights without LoRAs;
- low-bit storage (fp8/nf4/GGUF) and the older `ldm_patched` backend (reForge, Forge Classic)
  train from the checkpoint file instead;
- afterwards the LoRA state is reset so the next generation re-applies its LoRAs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle

log = logging.getLogger(__name__)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def is_forge() -> bool:
    """True inside Forge, reForge or Forge Classic (they all ship `modules_forge`)."""
    return _importable("modules_forge")


def has_forge_backend() -> bool:
    """Forge 2.x (`backend/`, HF-style components); False for the older `ldm_patched` forks."""
    return is_forge() and _importable("backend.memory_management")


def forge_install_requirements() -> list[str]:
    """What install.py may install on Forge: at most the CPU onnxruntime, and only if missing.

    Forge already pins diffusers 0.31.0, peft 0.13.2, transformers 4.46.1 and huggingface-hub
    0.26.2, which our code supports; installing anything else would move its pins.
    """
    return [] if _importable("onnxruntime") else ["onnxruntime"]


def _same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


class ForgeHost:
    """Host protocol (lora_trainer.host.Host) for Forge."""

    name = "forge"

    def __init__(self, *, extra_roots: list[Path] | None = None) -> None:
        self._extra_roots = [Path(r) for r in (extra_roots or [])]
        self._sd_model: Any = None  # the Forge model the current bundle aliases
        self._state_begun = False

    # -- model handoff ---------------------------------------------------------------
    def acquire_model(self, config: Any) -> ModelBundle:
        """The loaded model (aliased, zero copy) or, where that cannot be trained, its checkpoint file.

        Called with gpu_lock() held (jobs.JobManager), so no generation runs meanwhile.
        """
        requested = getattr(config, "model", "") or ""
        if not has_forge_backend():
            return self._from_file(requested or self._selected_checkpoint(), reason="this Forge version's backend")
        from modules import sd_models

        sd_model, _ = sd_models.forge_model_reload()  # loads the selected checkpoint if not yet loaded
        info = getattr(sd_model, "sd_checkpoint_info", None)
        loaded = getattr(sd_model, "filename", None) or getattr(info, "filename", None)
        if requested and not _same_file(requested, loaded):
            return self._from_file(requested, reason=None)

        from . import forge_model

        forge_model.restore_clean_weights(sd_model)
        try:
            bundle = forge_model.bundle_from_forge(sd_model, device=self.device(), name=_model_name(info, loaded),
                                                   model_hash=getattr(info, "sha256", None))
        except forge_model.LowBitModelError as e:
            if not loaded:
                raise
            log.warning("%s Training from %s instead.", e, loaded)
            return self._from_file(loaded, reason="low-bit weights")
        self._sd_model = sd_model
        self._begin_state()
        return bundle

    def _from_file(self, path: str | None, *, reason: str | None) -> ModelBundle:
        if not path:
            raise UnsupportedModelError("No checkpoint is selected in Forge; choose one in the checkpoint menu.")
        try:
            from ..models.loader import load_model
        except ImportError:  # pragma: no cover - the loader ships with the package
            raise UnsupportedModelError(
                f"Training on Forge's loaded model is not possible with {reason} and this build cannot load "
                "checkpoint files; update LoRA Trainer.") from None
        if reason:
            log.info("LoRA Trainer: loading %s from disk (%s).", path, reason)
        self._unload_forge_models()  # make room: training gets its own copy of the weights
        bundle = load_model(Path(path), device=str(self.device()))
        self._begin_state()
        return bundle

    def release_model(self, bundle: ModelBundle) -> None:
        """Drop our aliases; reset Forge's LoRA state so the next generation re-applies its LoRAs."""
        for attr in ("unet", "vae"):
            setattr(bundle, attr, None)
        bundle.text_encoders = []
        try:
            if self._sd_model is not None:
                from . import forge_model

                forge_model.reset_lora_state(self._sd_model)
        finally:
            self._sd_model = None
            self._end_state()
            import gc

            gc.collect()
            try:
                from backend import memory_management

                memory_management.soft_empty_cache()
            except ImportError:
                pass

    def _selected_checkpoint(self) -> str | None:
        try:
            from modules import shared

            info = getattr(shared.sd_model, "sd_checkpoint_info", None)
            if info is not None:
                return info.filename
            from modules import sd_models

            selected = sd_models.select_checkpoint()
            return selected.filename if selected else None
        except Exception:
            log.debug("no selected checkpoint", exc_info=True)
            return None

    def _unload_forge_models(self) -> None:
        try:
            from backend import memory_management

            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
        except ImportError:
            pass

    # -- progress / interrupt -----------------------------------------------------------
    def _begin_state(self) -> None:
        from modules import shared

        shared.state.begin(job="lora_trainer")
        shared.state.textinfo = "Training LoRA"
        self._state_begun = True

    def _end_state(self) -> None:
        if self._state_begun:
            self._state_begun = False
            from modules import shared

            shared.state.end()

    def report(self, event: Any) -> None:
        if not self._state_begun:
            return
        from modules import shared

        step, total = getattr(event, "step", None), getattr(event, "total_steps", None)
        if step is not None and total:
            shared.state.job_count = 1
            shared.state.sampling_steps = int(total)
            shared.state.sampling_step = int(step)
            loss = getattr(event, "loss", None)
            shared.state.textinfo = f"Training LoRA: step {step}/{total}" + (
                f", loss {loss:.4f}" if isinstance(loss, float) else "")

    def interrupted(self) -> bool:
        if not self._state_begun:
            return False
        from modules import shared

        return bool(shared.state.interrupted or getattr(shared.state, "stopping_generation", False))

    # -- places, locks ---------------------------------------------------------------------
    def lora_dir(self) -> Path:
        from modules import shared

        return Path(shared.cmd_opts.lora_dir)

    def gpu_lock(self) -> AbstractContextManager[Any]:
        from modules.call_queue import queue_lock

        return queue_lock

    def device(self) -> torch.device:
        try:
            from backend import memory_management

            return memory_management.get_torch_device()
        except ImportError:
            from modules import devices

            return devices.device

    def after_save(self, lora_path: Path) -> None:
        """Let Forge's Lora list see the new file (the cards refresh from the browser)."""
        try:
            import networks  # extensions-builtin/sd_forge_lora (or A1111's Lora), on sys.path in the WebUI

            networks.list_available_networks()
        except Exception:
            log.warning("Could not refresh Forge's LoRA list", exc_info=True)

    def allowed_roots(self) -> list[Path] | None:
        from modules import paths_internal, shared

        roots = [Path(paths_internal.data_path), Path(paths_internal.models_path), self.lora_dir()]
        extra = getattr(shared.opts, "lora_trainer_extra_roots", None) or []
        if isinstance(extra, str):
            extra = [p.strip() for p in extra.splitlines() if p.strip()]
        roots += [Path(p) for p in extra] + self._extra_roots
        return [r.expanduser().resolve() for r in roots]

    def tagger_cache_dir(self) -> Path:
        """Forge points HF_HOME at models/diffusers: keep WD14 downloads in their own folder."""
        from modules import paths_internal

        return Path(paths_internal.models_path) / "lora_trainer" / "tagger"


def _model_name(info: Any, filename: str | None) -> str:
    name = getattr(info, "model_name", None)
    if name:
        return str(name)
    return Path(filename).stem if filename else "forge-model"
