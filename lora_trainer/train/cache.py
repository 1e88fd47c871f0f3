"""Latents and text-encoder outputs computed once, before the loop.

Latents are kept in memory (CPU); with a disk cache they are also stored under a key made of the
image's *content* hash, its bucket/resize and the VAE's identity, so an edited image or another
VAE never reuses a stale latent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hashing import sha256_file
from ..prefetch import prefetched
from .data import Dataset, ImageItem, image_tensor

log = logging.getLogger(__name__)


@dataclass
class CachedLatent:
    latent: torch.Tensor  # (C, h, w) fp32 on CPU, already shifted and multiplied by the scaling factor
    flipped: torch.Tensor | None = None


def vae_identity(vae, scaling_factor: float, shift_factor: float = 0.0) -> str:
    """Cheap fingerprint: config + scaling/shift factors + the first and last encoder weights."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    h.update(str(scaling_factor).encode())
    if shift_factor:
        h.update(f"shift {shift_factor}".encode())
    for tensor in (vae.encoder.conv_in.weight, vae.encoder.conv_out.weight):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(item: ImageItem, vae_id: str, flip: bool) -> str:
    assert item.choice is not None
    (bw, bh), (rw, rh) = item.choice.bucket, item.choice.resized
    return f"{sha256_file(item.path)[:32]}-{bw}x{bh}-{rw}x{rh}-{vae_id}{'-flip' if flip else ''}"


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, scaling_factor: float, generator: torch.Generator,
                   shift_factor: float = 0.0) -> torch.Tensor:
    """Latents of a batch of images (B, 3, H, W), on the CPU. Each image's noise is drawn on the CPU
    generator in batch order, image by image: the same draws as encoding them one per call."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    # Sample on the CPU generator so the draw is the same on every device.
    noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=generator, dtype=torch.float32)
                         for _ in range(pixels.shape[0])])
    noise = noise.to(dist.mean.device)
    latent = dist.mean.float() + dist.std.float() * noise
    if param.dtype != torch.float32:
        bad = (~torch.isfinite(latent).flatten(1).all(1)).nonzero().flatten().tolist()  # one sync per batch
        if bad:
            # SDXL's VAE overflows in fp16 on some images: redo those in fp32.
            vae32 = copy.deepcopy(vae).float()
            dist = vae32.encode(pixels[bad].to(param.device, torch.float32)).latent_dist
            latent[bad] = dist.mean + dist.std * noise[bad]
            del vae32
    if shift_factor:  # Flux's AE: (z - shift) * scale
        latent = latent - shift_factor
    return (latent * scaling_factor).cpu()


def call_pixels(vae) -> int:
    """How many pixels (flipped copies counted) one VAE call may encode on the VAE's device; 0: one
    image per call."""
    return _CALL_PIXELS.get(next(vae.parameters()).device.type, 0)


def cache_latents(dataset: Dataset, vae, scaling_factor: float, *, flip: bool, seed: int,
                  disk_dir: Path | None = None, progress: Callable[[int, int], None] | None = None,
                  shift_factor: float = 0.0, batch_pixels: int | None = None) -> list[CachedLatent]:
    """Every item's latent (and its mirror image's with `flip`), from the disk cache where present.

    Consecutive images of one size are encoded together, up to `batch_pixels` per VAE call (default
    `call_pixels(vae)`; an image larger than that still gets a call of its own); the latents equal
    one-image calls' within float rounding (the same noise, drawn in the same order)."""
    vae_id = vae_identity(vae, scaling_factor, shift_factor)
    generator = torch.Generator().manual_seed(seed)
    budget = call_pixels(vae) if batch_pixels is None else batch_pixels
    if disk_dir is not None:
        disk_dir.mkdir(parents=True, exist_ok=True)
    items = dataset.items
    out: list[CachedLatent | None] = [_from_disk(disk_dir, item, vae_id, flip) if disk_dir is not None else None
                                      for item in items]
    todo = [i for i, entry in enumerate(out) if entry is None]
    done = 0
    pending: list[tuple[int, torch.Tensor]] = []  # (item index, pixels): same size, in order

    def report(count: int) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, len(items))

    def per_call(pixels: torch.Tensor) -> int:  # images (mirrors counted) per VAE call at this size
        return max(1, min(_MAX_BATCH, budget // (pixels.shape[-2] * pixels.shape[-1])))

    def flush() -> None:
        if not pending:
            return
        # [image 0, its mirror, image 1, ...]: the order one-image calls drew their noise in
        images = [p for _, pixels in pending for p in ((pixels, pixels.flip(-1)) if flip else (pixels,))]
        size = per_call(images[0])
        latents = torch.cat([encode_latents(vae, torch.stack(images[i:i + size]), scaling_factor, generator,
                                            shift_factor) for i in range(0, len(images), size)])
        per = 2 if flip else 1
        for k, (n, _) in enumerate(pending):
            entry = CachedLatent(latents[k * per].clone(), latents[k * per + 1].clone() if flip else None)
            if disk_dir is not None:
                _to_disk(disk_dir, items[n], vae_id, flip, entry)
            out[n] = entry
        report(len(pending))
        pending.clear()

    with closing(prefetched(image_tensor, [items[i] for i in todo], ahead=_DECODE_AHEAD,
                            name="latent-decode")) as decoded:
        for n in range(len(items)):
            if out[n] is not None:
                report(1)
                continue
            pixels = next(decoded).result()
            if pending and pixels.shape != pending[0][1].shape:
                flush()
            pending.append((n, pixels))
            if len(pending) * (2 if flip else 1) >= per_call(pixels):
                flush()
        flush()
    return out  # type: ignore[return-value]


# Pixels per VAE call by device type (mirror images counted): two 512 px images, so that caching stays under
# the training's own peak of memory (SD1.5 at 512 px, batch 1: UNet 1.7 GiB + VAE activations of ~0.33 GiB
# per image in bf16 under a 3.0 GiB peak; SDXL's VAE needs ~2.6 GiB per megapixel in fp32, half in bf16) and
# larger images keep one call each. On the CPU one image per call: batching is no faster there
# (bench/results/startup_cpu.md).
_CALL_PIXELS = {"cuda": 2 * 512 * 512}
_MAX_BATCH = 16
_DECODE_AHEAD = 8  # images decoded ahead of the VAE: bounded memory (8 x 3 x 1024 x 1024 fp32 = 100 MB)


def _disk_path(disk_dir: Path, item: ImageItem, vae_id: str, flip: bool) -> Path:
    return disk_dir / f"{cache_key(item, vae_id, flip)}.safetensors"


def _from_disk(disk_dir: Path, item: ImageItem, vae_id: str, flip: bool) -> CachedLatent | None:
    # safe_open, not safetensors.torch.load_file: Forge patches load_file to rename files it fails on.
    from safetensors import safe_open

    path = _disk_path(disk_dir, item, vae_id, flip)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            return CachedLatent(f.get_tensor("latent"), f.get_tensor("flipped") if "flipped" in names else None)
    except Exception:  # noqa: BLE001 - a half-written or foreign file: recompute it
        log.warning("latent cache file %s is unreadable; recomputing it", path.name)
        return None


def _to_disk(disk_dir: Path, item: ImageItem, vae_id: str, flip: bool, entry: CachedLatent) -> None:
    from safetensors.torch import save_file

    path = _disk_path(disk_dir, item, vae_id, flip)
    tensors = {"latent": entry.latent.contiguous()}
    if entry.flipped is not None:
        tensors["flipped"] = entry.flipped.contiguous()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
