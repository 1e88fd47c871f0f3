"""The Host for AUTOMATIC1111's WebUI (1.10): train on the model the WebUI has loaded.

The WebUI's LDM/SGM modules are never wrapped or changed: `bundle_from_ldm_state_dict` builds
diffusers modules that hold the very same tensors (views), peft wraps those. Before that, weights
the built-in Lora extension patched in place are put back with the extension's own restore. After
the run, everything is checked to be bit-identical (hashes) and where it was.

Everything from the WebUI (`modules.*`, the Lora extension's `networks`) is imported inside the
methods, so this file imports without a WebUI (tests pass stand-ins for `shared`).
"""

from __future__ import annotations

import logging
import sys
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraTrainerError, UnsupportedModelError
from .a1111_grid import AB_WEIGHTS, grid_after_run, make_ab_grid  # noqa: F401  (the grid's old home)
from .common import allowed_roots_for, split_roots, tensor_fingerprint

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle

log = logging.getLogger("lora_trainer.webui")

# A1111's wrappers (sd_hijack: FrozenCLIPEmbedderWithCustomWords.wrapped, EmbeddingsWithFixes.wrapped)
# add a ".wrapped" level to state_dict keys; the checkpoint layout has none.
_WRAPPED = ".wrapped."
_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


class LoraPatchedError(LoraTrainerError):
    """The WebUI's weights carry an applied LoRA that cannot be taken off."""


def ldm_state_dict(sd_model: Any) -> dict[str, torch.Tensor]:
    """The loaded model's tensors under checkpoint key names (same tensor storage, no copies)."""
    out: dict[str, Any] = {}
    for key, tensor in sd_model.state_dict(keep_vars=True).items():
        while _WRAPPED in key:
            key = key.replace(_WRAPPED, ".", 1)
        if key.startswith(_PREFIXES) and key not in out:
            out[key] = tensor.data if hasattr(tensor, "data") else tensor
    return out


def restore_lora_patches(sd_model: Any, networks: Any | None = None) -> int:
    """Undo LoRAs the built-in extension merged into the weights (it keeps CPU backups and
    restores them itself before the next generation); returns how many modules were restored."""
    patched = [m for m in sd_model.modules() if getattr(m, "network_current_names", ())]
    if not patched:
        return 0
    networks = networks if networks is not None else sys.modules.get("networks")
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    if restore is None:
        raise LoraPatchedError("The loaded model still has a LoRA merged into its weights and the built-in "
                               "Lora extension is not loaded to take it off; generate one image without any "
                               "<lora:...> in the prompt, then start training again.")
    import torch

    for module in patched:
        if getattr(module, "network_weights_backup", None) is None and getattr(module, "network_bias_backup", None) is None:
            raise LoraPatchedError("The loaded model has a LoRA merged into its weights without a backup to "
                                   "restore; reload the checkpoint (Settings → Actions → Unload/Reload), "
                                   "then start training again.")
        with torch.no_grad():  # the extension restores under no_grad too (weights are leaf tensors)
            restore(module)
        module.network_current_names = ()  # the extension re-applies its LoRAs at the next generation
    return len(patched)


@dataclass
class ModelFacts:
    """What training must know about the loaded model, read from the model itself."""

    family: str  # "SD1" | "SD2" | "SDXL"
    prediction_type: str
    scale_factor: float
    linear_start: float
    linear_end: float
    num_timesteps: int
    clip_skip: int
    config_path: str | None
    checkpoint: str | None
    name: str
    notes: list[str] = field(default_factory=list)


def model_facts(sd_model: Any, opts: Any = None) -> ModelFacts:
    from ..models.bundle import EPSILON, V_PREDICTION

    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        family = "SDXL"
    elif getattr(sd_model, "is_sd2", False):
        family = "SD2"
    elif getattr(sd_model, "is_sd1", True):
        family = "SD1"
    else:  # pragma: no cover
        family = "unknown"
    discretization = getattr(getattr(sd_model, "denoiser", None), "discretization", None)
    info = getattr(sd_model, "sd_checkpoint_info", None)
    checkpoint = getattr(info, "filename", None)
    return ModelFacts(
        family=family,
        prediction_type=V_PREDICTION if getattr(sd_model, "parameterization", "eps") == "v" else EPSILON,
        scale_factor=float(getattr(sd_model, "scale_factor", 0.13025 if family == "SDXL" else 0.18215)),
        linear_start=float(getattr(sd_model, "linear_start", getattr(discretization, "linear_start", 0.00085))),
        linear_end=float(getattr(sd_model, "linear_end", getattr(discretization, "linear_end", 0.012))),
        num_timesteps=int(getattr(sd_model, "num_timesteps", getattr(discretization, "num_timesteps", 1000))),
        clip_skip=int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1),
        config_path=getattr(sd_model, "used_config", None),
        checkpoint=checkpoint,
        name=Path(checkpoint).stem if checkpoint else getattr(info, "model_name", "model") or "model",
    )


def reuse_blocker(sd_model: Any, *, fp8: bool, device: Any) -> str | None:
    """Why the loaded weights cannot be trained on in place (then the file is loaded), or None."""
    import torch

    if sd_model is None:
        return "no model is loaded"
    if getattr(sd_model, "is_sd3", False) or getattr(sd_model, "is_ssd", False):
        raise UnsupportedModelError("The loaded model is SD3 or SSD-1B, which LoRA Trainer cannot train; "
                                    "load an SD1.x, SD2.x or SDXL checkpoint in the WebUI.")
    if fp8:
        return "the WebUI keeps its weights in fp8 (Settings → Optimizations → FP8 weight)"
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        return "the loaded model has no LDM UNet"
    params = list(unet.parameters())
    if any(p.is_meta for p in params):
        return "the loaded weights are not materialised"
    dtypes = {p.dtype for p in params}
    if any("float8" in str(d) for d in dtypes):
        return "the WebUI keeps its weights in fp8"
    dev = torch.device(device)
    if dev.type == "cpu" and dtypes & {torch.float16, torch.bfloat16}:
        return "the weights are half precision on the CPU, where training needs fp32 (start the WebUI with --no-half)"
    return None


class A1111Host:
    """lora_trainer.host.Host for AUTOMATIC1111 1.10."""

    name = "a1111"

    def __init__(self, *, settings: dict[str, Any] | None = None) -> None:
        self.settings = settings if settings is not None else {}
        self._sd_model: Any = None
        self._homes: dict[str, Any] = {}
        self._fingerprint: dict[str, str] | None = None
        self._state_begun = False
        self._verify = True  # hash the host's weights before/after (cheap next to training)
        self.last_notes: list[str] = []

    # ------------------------------------------------------------------ model hand-off
    def acquire_model(self, config: Any) -> ModelBundle:
        from modules import devices, shared

        self.last_notes = []
        sd_model = shared.sd_model
        blocker = reuse_blocker(sd_model, fp8=bool(getattr(devices, "fp8", False)), device=devices.device)
        if blocker is not None:
            return self._from_file(sd_model, blocker)
        restored = restore_lora_patches(sd_model)
        if restored:
            self._note(f"took the applied LoRA off {restored} layers of the loaded model (it is re-applied "
                       "at the next generation)")
        facts = model_facts(sd_model, shared.opts)
        lowvram = bool(getattr(sd_model, "lowvram", False))
        if lowvram:  # --medvram/--lowvram move modules by hooks: park everything, train on copies
            from modules import lowvram as lowvram_mod

            lowvram_mod.send_everything_to_cpu()
            self._note("--medvram/--lowvram: the WebUI's model stays on the CPU; training uses a copy of "
                       "the UNet on the GPU (text encoders and VAE visit the GPU only for caching)")
        state = ldm_state_dict(sd_model)
        self._homes = {k: (t.device, t.dtype) for k, t in state.items()}
        self._verify = bool(self.settings.get("lora_trainer_verify_weights", True))
        self._fingerprint = tensor_fingerprint(state) if self._verify else None
        self._sd_model = sd_model
        bundle = self.bundle_from_model(sd_model, facts, state=state)
        if lowvram:  # .to() rebinds our Parameters to GPU copies; the WebUI's own stay on the CPU
            bundle.unet.to(devices.device)
        self._begin_state("Training a LoRA")
        log.info("LoRA Trainer: training on the loaded model %s (%s, %s)", facts.name, facts.family,
                 facts.prediction_type)
        return bundle

    @staticmethod
    def bundle_from_model(sd_model: Any, facts: ModelFacts, *, state: dict[str, Any] | None = None,
                          device: Any = None) -> ModelBundle:
        """Diffusers modules over the loaded model's own tensors, with the model's own facts."""
        from ..models.bundle import Schedule
        from ..models.loader import bundle_from_ldm_state_dict

        state = state if state is not None else ldm_state_dict(sd_model)
        config = facts.config_path if facts.config_path and Path(facts.config_path).is_file() else None
        bundle = bundle_from_ldm_state_dict(state, config=config, name=facts.name, device=device,
                                            source=f"the WebUI's loaded model ({facts.checkpoint or facts.name})")
        if bundle.family.label != facts.family:
            raise UnsupportedModelError(f"The loaded model looks like {facts.family} to the WebUI but like "
                                        f"{bundle.family.label} to LoRA Trainer; reload the checkpoint.")
        bundle.prediction_type = facts.prediction_type
        bundle.scaling_factor = facts.scale_factor
        bundle.schedule = Schedule(num_train_timesteps=facts.num_timesteps, beta_start=facts.linear_start,
                                   beta_end=facts.linear_end, beta_schedule="scaled_linear")
        if facts.checkpoint:
            bundle.model_hash = None  # the engine hashes the file only if asked; the WebUI knows it
        return bundle

    def _from_file(self, sd_model: Any, reason: str) -> ModelBundle:
        from ..models.loader import load_model

        info = getattr(sd_model, "sd_checkpoint_info", None)
        if info is None:
            from modules import sd_models

            info = sd_models.select_checkpoint()
        path = getattr(info, "filename", None)
        if not path or not Path(path).is_file():
            raise UnsupportedModelError(f"LoRA Trainer cannot use the loaded model ({reason}) and finds no "
                                        "checkpoint file to load; select a checkpoint in the WebUI first.")
        self._note(f"cannot train on the loaded model in place ({reason}); loading {Path(path).name} "
                   "from disk instead (uses extra memory)")
        self._sd_model = None
        self._begin_state("Training a LoRA")
        import torch
        from modules import devices

        return load_model(Path(path), dtype=torch.float32, device=devices.device)

    def release_model(self, bundle: ModelBundle) -> None:
        import gc

        sd_model, self._sd_model = self._sd_model, None
        try:
            if sd_model is not None:
                state = ldm_state_dict(sd_model)
                moved = [k for k, (dev, dt) in self._homes.items()
                         if k in state and (state[k].device != dev or state[k].dtype != dt)]
                if moved:  # the engine moves our modules, never the host's: this would be a bug
                    log.error("LoRA Trainer: %d host tensors changed place; moving them back", len(moved))
                    for k in moved:
                        state[k].data = state[k].data.to(*self._homes[k])
                if self._fingerprint is not None:
                    after = tensor_fingerprint(state, like=self._fingerprint)
                    changed = [k for k, h in self._fingerprint.items() if after.get(k) != h]
                    if changed:
                        log.error("LoRA Trainer: %d weights of the WebUI's model changed during training "
                                  "(first: %s); reload the checkpoint.", len(changed), changed[0])
                    else:
                        log.info("LoRA Trainer: the WebUI's model is bit-identical after training")
                if getattr(sd_model, "lowvram", False):
                    from modules import sd_models

                    sd_models.send_model_to_device(sd_model)
        finally:
            self._homes, self._fingerprint = {}, None
            del bundle  # drop our modules (they only alias the host's tensors)
            gc.collect()
            self._end_state()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass

    # ------------------------------------------------------------------ host services
    def model_info(self) -> dict[str, Any]:
        """What a run would train on, for the tab: the loaded model, without loading one (A1111's
        `shared.sd_model` loads on first access; `model_data.sd_model` does not)."""
        from modules import sd_models, shared

        sd_model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        selected = str(getattr(shared.opts, "sd_model_checkpoint", "") or "")
        if sd_model is None:
            return {"name": selected, "family": None, "note": "the WebUI loads it when training starts"}
        facts = model_facts(sd_model, shared.opts)
        return {"name": Path(facts.checkpoint).name if facts.checkpoint else facts.name,
                "family": None if facts.family == "unknown" else facts.family}

    def lora_dir(self) -> Path:
        from modules import shared

        return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(shared.models_path) / "Lora")

    def gpu_lock(self) -> AbstractContextManager[Any]:
        from modules.call_queue import queue_lock  # txt2img/img2img hold it too: they wait for us

        return queue_lock

    def device(self) -> torch.device:
        from modules import devices

        return devices.device

    def _begin_state(self, job: str) -> None:
        from modules import shared

        shared.state.begin(job=job)
        shared.state.job_count = 1
        shared.state.textinfo = "LoRA Trainer: loading"
        self._state_begun = True

    def _end_state(self) -> None:
        if not self._state_begun:
            return
        self._state_begun = False
        try:
            from modules import shared

            shared.state.end()
        except Exception:
            log.debug("shared.state.end failed", exc_info=True)

    def report(self, event: Any) -> None:
        """Mirror progress in the WebUI's own progress bar (`shared.state`)."""
        from modules import shared

        st = shared.state
        step, total = getattr(event, "step", 0) or 0, getattr(event, "total_steps", 0) or 0
        if total:  # the WebUI's bar = job_no/job_count + step/steps/job_count: one job, all steps
            st.job_count, st.job_no = 1, 0
            st.sampling_steps = int(total)
            st.sampling_step = int(step)
        epoch, epochs = getattr(event, "epoch", 0) or 0, getattr(event, "total_epochs", 0) or 0
        eta = getattr(event, "eta_s", None)
        loss = getattr(event, "smoothed_loss", None) or getattr(event, "loss", None)
        parts = ["LoRA Trainer"]
        message = getattr(event, "message", "") or ""
        if message and getattr(event, "kind", "") in ("cache", "epoch", "phase", "sample", "save"):
            parts.append(message.splitlines()[0][:120])  # e.g. "Caching latents: 12/40 images"
        if total:
            parts.append(f"step {step}/{total}")
        if epochs:
            parts.append(f"epoch {epoch}/{epochs}")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if eta is not None:
            parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        st.textinfo = ", ".join(parts)

    def interrupted(self) -> bool:
        from modules import shared

        return bool(self._state_begun and (shared.state.interrupted or shared.state.skipped))

    def after_save(self, lora_path: Path) -> None:
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()

    def allowed_roots(self) -> list[Path] | None:
        from modules import paths_internal, shared

        return allowed_roots_for(shared.cmd_opts, paths_internal.data_path,
                                 split_roots(self.settings.get("lora_trainer_extra_roots", "")))

    def tagger_cache_dir(self) -> Path:
        from modules import paths_internal

        custom = str(self.settings.get("lora_trainer_tagger_cache", "") or "").strip()
        return Path(custom) if custom else Path(paths_internal.models_path) / "lora_trainer" / "tagger"

    def _note(self, text: str) -> None:
        self.last_notes.append(text)
        print(f"LoRA Trainer: {text}", flush=True)

    # ------------------------------------------------------------------ A/B grid
    def after_run(self, job: Any) -> None:
        """After a successful run: the A/B grid with the WebUI's own pipeline (`a1111_grid`), into job.outputs."""
        grid_after_run(job, self.settings)
