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
def encode_latent(vae, pixels: torch.Tensor, scaling_factor: float, generator: torch.Generator,
                  shift_factor: float = 0.0) -> torch.Tensor:
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    # Sample on the CPU generator so the draw is the same on every device.
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
    latent = dist.mean.float() + dist.std.float() * noise.to(dist.mean.device)
    if not torch.isfinite(latent).all() and param.dtype != torch.float32:
        # SDXL's VAE overflows in fp16 on some images: redo that one in fp32.
        vae32 = copy.deepcopy(vae).float()
        dist = vae32.encode(pixels.to(param.device, torch.float32)).latent_dist
        latent = dist.mean + dist.std * noise.to(dist.mean.device)
        del vae32
    if shift_factor:  # Flux's AE: (z - shift) * scale
        latent = latent - shift_factor
    return (latent * scaling_factor).cpu()


def cache_latents(dataset: Dataset, vae, scaling_factor: float, *, flip: bool, seed: int,
                  disk_dir: Path | None = None, progress: Callable[[int, int], None] | None = None,
                  shift_factor: float = 0.0) -> list[CachedLatent]:
    vae_id = vae_identity(vae, scaling_factor, shift_factor)
    generator = torch.Generator().manual_seed(seed)
    out: list[CachedLatent] = []
    if disk_dir is not None:
        disk_dir.mkdir(parents=True, exist_ok=True)
    items = dataset.items
    cached = [_from_disk(disk_dir, item, vae_id, flip) if disk_dir is not None else None for item in items]
    todo = [i for i, entry in enumerate(cached) if entry is None]
    with closing(prefetched(image_tensor, [items[i] for i in todo], ahead=_DECODE_AHEAD,
                            name="latent-decode")) as decoded:
        for n, item in enumerate(items):
            entry = cached[n]
            if entry is None:
                pixels = next(decoded).result().unsqueeze(0)
                latent = encode_latent(vae, pixels, scaling_factor, generator, shift_factor)[0]
                flipped = (encode_latent(vae, pixels.flip(-1), scaling_factor, generator, shift_factor)[0]
                           if flip else None)
                entry = CachedLatent(latent, flipped)
                if disk_dir is not None:
                    _to_disk(disk_dir, item, vae_id, flip, entry)
            out.append(entry)
            if progress:
                progress(n + 1, len(items))
    return out


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
