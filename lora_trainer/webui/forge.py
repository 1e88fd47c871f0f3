"""The Host for Stable Diffusion WebUI Forge and its forks (Forge Neo, ersatzForge, reForge, Forge Classic).

`register()` (webui/__init__.py) picks ForgeHost when `is_forge()` says so. Everything that
touches Forge's modules is imported inside the methods: importing this file costs nothing and
works without Forge (tests, A1111).

What differs from A1111 (see docs/forge.md):
- the model is loaded lazily (`FakeInitialModel` until the first generation): we load the
  selected checkpoint with `sd_models.forge_model_reload()`, under the queue lock;
- weights are inference tensors in Forge's own modules: forge_model.bundle_from_forge() aliases
  them into diffusers modules (zero copy) after putting back the weights without LoRAs;
- low-bit storage (fp8/int8/nf4/GGUF/SVDQ: forge_storage) and the older `ldm_patched` backend
  (reForge, Forge Classic, Forge 1.x) train from the checkpoint file instead;
- which Forge this is comes from its code (forge_kind.detect()), and the tab says it;
- afterwards the LoRA state is reset so the next generation re-applies its LoRAs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedModelError
from . import forge_kind
from .a1111 import A1111Host
from .common import tensor_fingerprint

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


class ForgeHost(A1111Host):
    """Host protocol (lora_trainer.host.Host) for Forge.

    Progress, Interrupt, the Lora folder, allowed roots, the tagger cache and the A/B grid work
    as in A1111 (same `modules.shared`, `call_queue.queue_lock`, `processing` API); the model
    hand-off is Forge's own.
    """

    name = "forge"

    def __init__(self, *, settings: dict[str, Any] | None = None, kind: forge_kind.ForgeKind | None = None) -> None:
        super().__init__(settings=settings)
        self.kind = kind or forge_kind.detect(forge=True)  # which Forge (Neo, reForge, ...), from its code
        self._forge_model: Any = None  # the Forge model the current bundle aliases
        self._forge_fingerprint: dict[str, str] | None = None

    # -- model handoff ---------------------------------------------------------------
    def acquire_model(self, config: Any) -> ModelBundle:
        """The loaded model (aliased, zero copy) or, where that cannot be trained, its checkpoint file.

        Called with gpu_lock() held (jobs.JobManager), so no generation runs meanwhile.
        """
        self.last_notes = []
        requested = getattr(config, "model", "") or ""
        if not has_forge_backend():
            return self._load_file(requested or self._selected_checkpoint(),
                                   reason=f"{self.kind.label} keeps its model in the older ldm_patched backend")
        from modules import sd_models

        sd_model, _ = sd_models.forge_model_reload()  # Forge loads the selected checkpoint lazily
        info = getattr(sd_model, "sd_checkpoint_info", None)
        loaded = getattr(sd_model, "filename", None) or getattr(info, "filename", None)
        if requested and not _same_file(requested, loaded):
            return self._load_file(requested, reason=None)

        from . import forge_flux, forge_model

        forge_model.restore_clean_weights(sd_model)
        flux = None
        try:
            if forge_flux.is_flux(sd_model):  # Flux: read in place in any storage Forge holds (forge_flux.py)
                flux = forge_flux.acquire(sd_model, config, device=self.device(), name=_model_name(info, loaded),
                                          model_hash=getattr(info, "sha256", None))
                bundle = flux.bundle
            else:
                bundle = forge_model.bundle_from_forge(sd_model, device=self.device(),
                                                       name=_model_name(info, loaded),
                                                       model_hash=getattr(info, "sha256", None))
        except forge_model.LowBitModelError as e:
            if not loaded:
                raise
            return self._load_file(loaded, reason=e.cause)
        self._forge_model = sd_model
        self._forge_fingerprint = tensor_fingerprint(forge_model.forge_tensors(sd_model)) if self._verify else None
        self._begin_state("Training a LoRA")
        if flux is not None:
            self._note(flux.note)
            _say(flux.line)
            if flux.advice:  # e.g. fp8 weights that Forge merges LoRAs into: how to use the LoRA at full effect
                self._note(flux.advice)
            return bundle
        share = forge_model.shared_fraction(bundle, sd_model)  # rounded down: "100%" only when nothing is copied
        widened = forge_model.widened_per_layer(bundle)
        _say(f"training on Forge's loaded model {bundle.name} ({bundle.family.label}, {bundle.prediction_type}; "
             + ("zero copy" if share == 1.0 else f"{int(share * 100)}% of the weights shared with Forge, the rest copied "
                "to fp32 / the training device")
             + (f"; Linear weights read in place ({widened}) and widened to fp32 one layer at a time)" if widened
                else ")"))
        return bundle

    def _load_file(self, path: str | None, *, reason: str | None) -> ModelBundle:
        if not path or not Path(path).is_file():
            raise UnsupportedModelError(f"No checkpoint file is selected in {self.kind.label}; choose one in the "
                                    "checkpoint menu or give a model file.")
        import torch

        from ..models.loader import check_model_header, load_model

        if reason:
            self._note(f"cannot train on the loaded model in place ({reason}); loading {Path(path).name} "
                       "from disk instead (uses extra memory)")
        self._unload_forge_models()  # make room: training gets its own copy of the weights
        self._forge_model = None
        self._begin_state("Training a LoRA")
        device = self.device()
        family = check_model_header(path)  # None: only loading can tell (.ckpt)
        if device.type == "cpu" and not (family and family.is_flux):
            # The file's tensors memory-mapped as stored, half-precision Linears widened per layer: beside the
            # WebUI's own copy in RAM, only the small rest becomes an fp32 copy (an SDXL: ~2 GB, not 14).
            from . import forge_model

            return forge_model.widen_half_linears(load_model(Path(path), dtype=None, device=None))
        return load_model(Path(path), dtype=torch.float32, device=device)

    def release_model(self, bundle: ModelBundle) -> None:
        """Drop our aliases, check Forge's weights are unchanged, make its next generation re-apply LoRAs."""
        import gc

        sd_model, self._forge_model = self._forge_model, None
        before, self._forge_fingerprint = self._forge_fingerprint, None
        bundle.unet = bundle.vae = None
        bundle.text_encoders = []
        try:
            if sd_model is not None:
                from . import forge_model

                forge_model.reset_lora_state(sd_model)
                if before is not None:
                    after = tensor_fingerprint(forge_model.forge_tensors(sd_model), like=before)
                    changed = [k for k, h in before.items() if after.get(k) != h]
                    if changed:
                        _say(f"{len(changed)} weights of Forge's model changed during training (first: "
                             f"{changed[0]}); reload the checkpoint.")
                    else:
                        _say("Forge's model is bit-identical after training")
        finally:
            del bundle
            gc.collect()
            self._end_state()
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
        except Exception:  # any failure means "don't know": the caller says no checkpoint is selected
            log.debug("no selected checkpoint", exc_info=True)
            return None

    def _unload_forge_models(self) -> None:
        try:
            from backend import memory_management

            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
        except ImportError:  # ldm_patched forks: their own memory manager keeps working as it is
            pass

    def model_info(self) -> dict[str, Any]:
        """The tab's model line; for a loaded Flux model also how it is stored and that it trains in place."""
        from modules import sd_models

        from . import forge_flux

        sd_model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        if sd_model is not None and forge_flux.is_flux(sd_model):
            return forge_flux.model_info(sd_model)
        return super().model_info()

    def card_sd_version(self, label: str) -> str:
        """The "sd version" for the LoRA's card (jobs._publish): Neo names families by its presets."""
        return self.kind.card_sd_version(label)

    def describe(self) -> str:
        """Which WebUI this is and what training does in it (markdown, for the tab and /status)."""
        return self.kind.summary()

    # -- host services that differ from A1111 ------------------------------------------------
    def device(self) -> torch.device:
        try:
            from backend import memory_management

            return memory_management.get_torch_device()
        except ImportError:
            return super().device()

    def interrupted(self) -> bool:
        if not self._state_begun:
            return False
        from modules import shared

        st = shared.state
        return bool(st.interrupted or getattr(st, "skipped", False) or getattr(st, "stopping_generation", False))


def _say(text: str) -> None:
    """Console line (the WebUI shows print output; our logger has no handler there)."""
    print(f"LoRA Trainer: {text}", flush=True)


def _model_name(info: Any, filename: str | None) -> str:
    name = getattr(info, "model_name", None)
    if name:
        return str(name)
    return Path(filename).stem if filename else "forge-model"
