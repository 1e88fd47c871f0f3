"""Where the parts of a model are while a run needs them, and in which dtype.

A model the engine loads itself comes from `load_model(path, dtype=None, device=None)`: its weights
are the checkpoint's own tensors, memory-mapped and not read yet. Each part is read, cast and moved
in one copy when the run first needs it on the device (the VAE for latents, the text encoders for
captions, the UNet for training): there is no pass over the whole model on the CPU, and on CUDA the
cast runs on the GPU. Where the GPU has room, the UNet is uploaded on a side stream while the
latents are being cached. Parts the run will not use again are dropped instead of being copied back
to the CPU.

A host's model (the WebUI's, `Placement(bundle, device, None)`) is only moved, never cast or dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from ..models.bundle import ModelBundle
from ..prefetch import in_background

log = logging.getLogger(__name__)

# Upload the UNet beside latent caching only when the GPU has this much room to spare besides it:
# caching peaks at a few GiB (SDXL's fp32 VAE at 1024 px), so small cards keep the strict order.
_OVERLAP_FACTOR = 3
_OVERLAP_SPARE = 4 * 2**30


def vae_dtype(bundle: ModelBundle, dtype: torch.dtype) -> torch.dtype:
    """The VAE encodes in the training dtype unless the family says otherwise (SDXL's with fp16
    training: its fp16 activations overflow (kohya's --no_half_vae), so fp32; bf16 has fp32's range:
    SDXL's VAE runs in it as kohya's does by default, at a third of fp32's time and half its memory)."""
    from .family import family_for

    return family_for(bundle).vae_dtype(bundle, dtype)


def training_dtypes(bundle: ModelBundle, dtype: torch.dtype) -> dict[int, torch.dtype]:
    """The dtype of each part in training: UNet and text encoders in `dtype`, the VAE in `vae_dtype`."""
    vae = vae_dtype(bundle, dtype)
    dtypes = {id(bundle.unet): dtype, id(bundle.vae): vae}
    dtypes.update({id(te): dtype for te in bundle.text_encoders})
    return dtypes


class Placement:
    """Moves a bundle's parts; `dtype` given = a model the engine owns (cast on the way, may drop parts)."""

    def __init__(self, bundle: ModelBundle, device: torch.device | str, dtype: torch.dtype | None):
        self.device = torch.device(device)
        self._dtypes = training_dtypes(bundle, dtype) if dtype is not None else {}
        self._uploads: dict[int, tuple[Future, torch.cuda.Stream]] = {}

    def owns(self, module: torch.nn.Module) -> bool:
        return id(module) in self._dtypes

    def to(self, module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
        """Put `module` on `device` (in its training dtype when the engine owns it)."""
        if self._finish_upload(module):
            return module
        device = torch.device(device)
        dtype = self._dtypes.get(id(module))
        if dtype is None:
            return module.to(device)
        # non_blocking: a host-to-GPU copy then casts on the GPU (a blocking one would cast on the CPU first).
        return module.to(device=device, dtype=dtype, non_blocking=device.type == "cuda")

    def upload_in_background(self, module: torch.nn.Module, then: Callable[[], Any] | None = None) -> bool:
        """Start putting an owned `module` on the CUDA device on a side stream, if the GPU has room for
        it beside the caching that runs meanwhile; `to()` waits for it. False: nothing started. `then`: more
        work on the module in the same thread and stream once it is there (e.g. adding LoRA adapters); `to()`
        waits for it too and raises its error."""
        dtype = self._dtypes.get(id(module))
        if dtype is None or self.device.type != "cuda" or id(module) in self._uploads:
            return False
        if any(p.device.type == "cuda" for p in module.parameters()):
            return False
        need = sum(p.numel() for p in module.parameters()) * torch.empty((), dtype=dtype).element_size()
        free, _ = torch.cuda.mem_get_info(self.device)
        if free < _OVERLAP_FACTOR * need + _OVERLAP_SPARE:
            return False
        stream = torch.cuda.Stream(self.device)

        def upload() -> None:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                module.to(device=self.device, dtype=dtype, non_blocking=True)
                if then is not None:
                    then()
            stream.synchronize()

        self._uploads[id(module)] = (in_background(upload, name="upload"), stream)
        return True

    def _finish_upload(self, module: torch.nn.Module) -> bool:
        pending = self._uploads.pop(id(module), None)
        if pending is None:
            return False
        future, stream = pending
        future.result()  # re-raises the upload's error (e.g. out of memory)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(stream)
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cuda":
                tensor.record_stream(current)  # allocated on the side stream, used on this one from now on
        return True

    def release(self, module: torch.nn.Module, *, needed_later: bool) -> None:
        """The run is done with `module` for now: an owned part not needed again is dropped (no copy
        back to the CPU); anything else goes to the CPU until it is needed."""
        if self.owns(module) and not needed_later:
            module.to("meta")
        else:
            module.to("cpu")

    def close(self) -> None:
        """Wait for uploads still running (a run that failed before it needed them)."""
        for module_id in list(self._uploads):
            future, _ = self._uploads.pop(module_id)
            try:
                future.result()
            except Exception:  # the run already failed for another reason; keep that one
                log.debug("background upload failed", exc_info=True)


def place_bundle(bundle: ModelBundle, device: torch.device | str, dtype: torch.dtype, *,
                 defer_unet: bool = False) -> ModelBundle:
    """Lay out a model held in memory as the engine trains one it loaded itself: UNet on the device
    in the training dtype, text encoders in that dtype, VAE in `vae_dtype` (the engine's own
    loads go part by part through `Placement` instead). `defer_unet` keeps the UNet on the
    CPU, for callers that cache latents before training."""
    bundle.unet.to(device="cpu" if defer_unet else device, dtype=dtype)
    for te in bundle.text_encoders:
        te.to(dtype=dtype)
    bundle.vae.to(dtype=vae_dtype(bundle, dtype))
    return bundle
