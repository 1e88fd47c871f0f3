"""Sample images at the end of an epoch, apart from the step loop: the family's sampler on the model as it
trains (modes and placement put back afterwards), PNGs in `OUT/sample/`, a "sample" event.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.bundle import ModelBundle
from .events import ProgressEvent
from .sampling import save_png


class SamplingMixin:
    """`_Run`'s sampling (it uses the run's config, placement, family, clock and events)."""

    def _sample(self, bundle: ModelBundle, device: torch.device, epoch: int) -> None:
        config = self.config
        modes = {id(m): m.training for m in (bundle.unet, *bundle.text_encoders)}
        self.placement.to(bundle.vae, device)
        self.models.text_encoders()
        bundle.unet.eval()
        n, steps = len(config.sample_prompts), config.sample_steps

        def progress(image: int, step: int) -> None:  # image and step 1-based
            self._emit_phase("sample", (image - 1) * steps + step, n * steps,
                             f"Sampling after epoch {epoch}: image {image}/{n}, step {step}/{steps}")
        try:
            progress(1, 0)
            with self.clock.phase("sample"):
                images = self.family.generate(bundle, config.sample_prompts, seed=config.sample_seed, steps=steps,
                                  cfg_scale=config.sample_cfg_scale, width=config.resolution,
                                  height=config.resolution, negative_prompt=config.sample_negative_prompt,
                                  clip_skip=config.clip_skip, on_step=progress)
        finally:
            bundle.unet.train(modes[id(bundle.unet)])
            for te in bundle.text_encoders:
                te.train(modes[id(te)])
            for te in self.cached_encoders:  # trained encoders stay where training needs them
                te.to("cpu")
            bundle.vae.to("cpu")
            self._free(device)
        paths = [save_png(img, Path(config.output_dir) / "sample" / f"{config.name}_e{epoch:06d}_{i:02d}.png")
                 for i, img in enumerate(images)]
        self.samples += paths
        self.emit(ProgressEvent("sample", step=self.pos.step, total_steps=self.plan.total_steps, epoch=epoch,
                                total_epochs=self.plan.epochs, message=f"{len(paths)} sample image(s)",
                                path=str(paths[0]) if paths else None, paths=[str(p) for p in paths]))
