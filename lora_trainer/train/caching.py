"""The cache phase of a run, before the step loop: latents once (and the validator's held-out ones while
the VAE is still on the device), then the outputs of frozen text encoders when captions never change.

`CachingMixin` holds `_Run`'s caching methods (they use the run's config, dataset, family, placement,
models and events); the caches themselves are `cache.py` (latents) and `text_cache.py` (text outputs).
What it sets is read by each step (`step.py`): `text_cache`, and `step_keys` for the conditioning that
is encoded inside the step instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.bundle import ModelBundle
from .cache import CachedLatent, cache_latents
from .captions import captions_are_static, process_caption
from .data import Dataset
from .events import ProgressEvent
from .text_cache import cache_text_outputs
from .validation import Validator


class CachingMixin:
    """`_Run`'s cache phase (see the module's docstring)."""

    def _cache_latents(self, bundle: ModelBundle, device: torch.device, weight_dtype: torch.dtype,
                       sampling: bool) -> list[CachedLatent]:
        """Every image's latent, once; then the VAE leaves the GPU (kept near when samples need it)."""
        config = self.config
        disk = (Path(config.latent_cache_dir) if config.latent_cache_dir else Path(config.output_dir) / ".cache"
                / "latents") if config.cache_latents_to_disk else None

        def encode_latents() -> list[CachedLatent]:
            self.placement.to(bundle.vae, device)
            return cache_latents(self.dataset, bundle.vae, bundle.scaling_factor, flip=config.flip_aug,
                                 seed=config.seed, disk_dir=disk, progress=self._cache_progress("latents"),
                                 shift_factor=self.family.latent_shift(bundle))
        latents = self.dist.build_once(encode_latents)  # several GPUs: rank 0 encodes, the others receive
        if self.dist.is_main:  # "did it learn?" (report.py): fixed pairs, held-out latents; rank 0 scores
            self.validator = Validator.create(
                config, self.dataset, latents, bundle, self.family, device, weight_dtype, emit=self._emit_validation,
                cache=lambda items: cache_latents(Dataset(items, self.dataset.img_root, None, []), bundle.vae,
                                                  bundle.scaling_factor, flip=False, seed=config.seed,
                                                  shift_factor=self.family.latent_shift(bundle)))
        self.placement.release(bundle.vae, needed_later=sampling)
        self._free(device)
        return latents

    def _cache_text(self, bundle: ModelBundle, device: torch.device, weight_dtype: torch.dtype,
                    sampling: bool) -> None:
        """Outputs of frozen encoders cached when captions never change, the rest encoded per step."""
        config = self.config
        static = captions_are_static(config.shuffle_caption, config.caption_dropout_rate,
                                     config.caption_tag_dropout_rate)
        self.text_cache: list[dict[str, torch.Tensor]] | None = None
        cached = self.family.cacheable_cond_keys(config) if static else ()
        # conditioning encoded inside each step; `step_keys` given to tokenize only when part is cached (Flux: CLIP-L
        # trains, T5's outputs are cached)
        self.step_keys = tuple(k for k in self.family.cond_keys if k not in cached)
        partial = bool(cached and self.step_keys)
        self._tokenize_keys = {"keys": self.step_keys} if partial else {}
        step_encoders = self.family.encoders_for(bundle, self.step_keys) if self.step_keys else []
        self.cached_encoders = [] if not cached else [  # frozen, used only for the cache: leave the GPU after it
            te for te in (self.family.encoders_for(bundle, cached) if partial else bundle.text_encoders)
            if not any(te is s for s in step_encoders)]
        if cached:
            text_disk = None
            if config.cache_latents_to_disk:
                text_disk = (Path(config.latent_cache_dir) / "text" if config.latent_cache_dir
                             else Path(config.output_dir) / ".cache" / "text")
            captions = [process_caption(i.caption) for i in self.dataset.items]
            scored = self.validator.captions() if self.validator is not None else []
            self.text_cache = self.dist.build_once(lambda: cache_text_outputs(  # several GPUs: rank 0 encodes
                self.family, bundle, captions + scored, clip_skip=config.clip_skip, disk_dir=text_disk,
                ensure_encoders=lambda: self.models.text_encoders(only=self.cached_encoders),
                autocast=lambda: self._autocast(device, weight_dtype), keys=cached if partial else None))
            if self.validator is not None:  # the scored captions went through the same cache
                self.validator.set_text(scored, self.text_cache[len(captions):])
            self.text_cache = self.text_cache[:len(captions)]
            for te in self.cached_encoders:
                self.placement.release(te, needed_later=sampling)
            self._free(device)
        if step_encoders:
            self.models.text_encoders(only=step_encoders)

    def _cache_progress(self, what: str) -> Callable[[int, int], None]:
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = time.perf_counter()
            if done in (1, total) or now - last[0] >= 1.0:
                last[0] = now
                self.emit(ProgressEvent("cache", total_steps=self.plan.total_steps, total_epochs=self.plan.epochs,
                                        message=f"Caching {what}: {done}/{total} images", phase="cache",
                                        phase_done=done, phase_total=total))
        return report
