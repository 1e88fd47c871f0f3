"""The demo models' autoencoder (`demo_pretrain.py`'s first stage) and the training helpers both stages share.

A KL autoencoder, factor 4 (64 px -> 16x16x4 latents), trained on fresh pictures of the synthetic world;
`finetune_decoder` later trains its decoder alone (the encoder, hence the denoisers' latents, unchanged),
on the seen shapes or on all seven; `encode_pool` encodes the pictures the denoisers train on. Parts are
saved as fp16 safetensors with their config in the metadata (`save_part`, `load_part`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from lora_trainer.demo.world import SEEN_SHAPES, colour_jitter, render, sample_scenes

SIZE = 64
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 32, "sample_size": SIZE,
    "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64), "layers_per_block": 1,
}


# ---------------------------------------------------------------------------------- training helpers
def lr_at(progress: float, step: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up by steps, then cosine by wall-clock progress down to `floor`."""
    warm = min(1.0, (step + 1) / warmup)
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class EMA:
    def __init__(self, modules: list[torch.nn.Module]):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.n = 0

    @torch.no_grad()
    def update(self, decay: float = 0.999) -> None:
        self.n += 1
        d = min(decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the modules for the block (in place: CUDA graphs keep their addresses)."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def render_batch(n: int, g: torch.Generator, device: torch.device, shapes: tuple[str, ...] = SEEN_SHAPES):
    scenes = sample_scenes(n, g, shapes=shapes)
    images = render(scenes, SIZE, device=device, jitter=colour_jitter(n, g, 0.05))
    return scenes, images * 2 - 1


def train_vae(seconds: float, device: torch.device, g: torch.Generator, *, batch: int, log: dict) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(int(torch.randint(2**31, (), generator=g)))
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda")
    start, step, losses = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * lr_at(elapsed / seconds, step, 100)
        _, x = render_batch(batch, g, device)
        with autocast(device):
            dist = vae.encode(x).latent_dist
            rec = vae.decode(dist.sample()).sample.float()
        err = rec - x
        kl = dist.kl().mean() / (4 * (SIZE // 4) ** 2)
        loss = (err ** 2).mean() + 0.1 * err.abs().mean() + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            losses.append([step, round(elapsed, 1), float(loss)])
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        _, x = render_batch(512, g, device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        psnr = float(10 * torch.log10(4 / ((rec - x) ** 2).mean()))
    log["vae"] = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "batch": batch,
                  "losses": losses, "psnr_db": round(psnr, 2)}
    print(f"VAE: {step} steps in {seconds:.0f} s, PSNR {psnr:.1f} dB", flush=True)
    return vae


PSNR_PICTURES = 512  # fresh pictures the VAE's PSNR is measured on


def psnr(vae, device: torch.device, g: torch.Generator, shapes: tuple[str, ...] = SEEN_SHAPES) -> float:
    n = PSNR_PICTURES
    with torch.no_grad():
        _, x = render_batch(n, g, device, shapes)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        return float(10 * torch.log10(4 / ((rec - x) ** 2).mean()))


def finetune_decoder(vae, until: float, device: torch.device, g: torch.Generator, *, batch: int, lr: float,
                     log: dict, save=None, save_every: float = 60.0,
                     shapes: tuple[str, ...] = SEEN_SHAPES) -> Any:
    """Train the decoder alone (the encoder, hence every latent the denoisers learn, stays as it is)
    until the wall-clock time `until`, on sampled latents of fresh pictures of `shapes`. With the star
    among them the decoder learns to draw what a LoRA may teach the denoiser (a generic image codec,
    as SD's VAE is); the denoisers and text encoder still never see a star."""
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    before = psnr(vae, device, g)
    star_before = psnr(vae, device, g, ("star",))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=device.type == "cuda")
    ema = EMA([vae.decoder, vae.post_quant_conv])
    start, step, losses, last_save = time.perf_counter(), 0, [], time.perf_counter()
    seconds = max(1.0, until - time.time())
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(elapsed / seconds, step, 50)
        _, x = render_batch(batch, g, device, shapes)
        with torch.no_grad(), autocast(device):
            z = vae.encode(x).latent_dist.sample()
        with autocast(device):
            rec = vae.decode(z.float()).sample.float()
        err = rec - x
        loss = (err ** 2).mean() + 0.1 * err.abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(0.995)
        step += 1
        if step % 50 == 0:
            losses.append([step, round(elapsed, 1), float(loss)])
            if step % 250 == 0:
                print(f"decoder: step {step}, {elapsed:.0f} s, loss {float(loss):.4f}", flush=True)
        if save is not None and time.perf_counter() - last_save > save_every:
            with ema.applied():
                save(vae)
            last_save = time.perf_counter()
    ema.copy_to_params()
    vae.eval().requires_grad_(False)
    after, star_after = psnr(vae, device, g), psnr(vae, device, g, ("star",))
    log["decoder"] = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "batch": batch, "lr": lr,
                      "shapes": list(shapes), "losses": losses, "psnr_db_before": round(before, 2),
                      "psnr_db": round(after, 2), "star_psnr_db_before": round(star_before, 2),
                      "star_psnr_db": round(star_after, 2)}
    print(f"decoder: {step} steps, PSNR {before:.1f} -> {after:.1f} dB (stars {star_before:.1f} -> "
          f"{star_after:.1f} dB)", flush=True)
    if save is not None:
        save(vae)
    return vae


@torch.no_grad()
def encode_pool(vae, n: int, device: torch.device, g: torch.Generator) -> dict[str, torch.Tensor]:
    """`n` fresh pictures of seen shapes, encoded once: latent mean/std + scene fields for captions."""
    means, stds, fields = [], [], []
    for start in range(0, n, 2048):
        scenes, x = render_batch(min(2048, n - start), g, device)
        with autocast(device):
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
        fields.append(torch.stack([scenes.colour, scenes.shape, scenes.background], 1))
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn(mean.shape, generator=g).to(device)
    return {"mean": mean, "std": std, "fields": torch.cat(fields), "scale": 1.0 / float(sample.std())}


def load_part(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}, json.loads(f.metadata()["config"])  # noqa: SIM118


def save_part(path: Path, module, config: dict[str, Any], kind: str) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata={"kind": kind, "config": json.dumps(config)})
    os.replace(tmp, path)


def load_vae(path: Path, device: torch.device):
    from diffusers import AutoencoderKL

    sd, cfg = load_part(path)
    scale = float(cfg.pop("scaling_factor"))
    vae = AutoencoderKL(**cfg)
    vae.load_state_dict(sd)
    return vae.to(device).eval().requires_grad_(False), scale
