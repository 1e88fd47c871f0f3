"""Pretrain the demo's SD1-architecture models from scratch on the synthetic world (`world.py`).

    python bench/demo_pretrain.py --out DIR [--device cuda] [--vae-seconds 45]
        [--variant shapes-sd1=110] [--variant shapes-mini=70] [--smoke]

Recipe (what the shipped `model/shapes-sd1` is): 64 px pictures of six shapes (never the star) in
twelve colours on flat backgrounds, captioned "red circle, blue background" with random omissions,
order swaps, empty captions (10%, for classifier-free guidance) and stray unknown words (so unknown
words, like a LoRA's trigger, do not derail the base model). First a KL autoencoder (factor 4: 64 px
-> 16x16x4 latents) on fresh pictures; then, on a fixed pool of encoded pictures, the UNet and the
CLIP text encoder together from random initialisation: epsilon prediction on SD1's noise schedule,
min-SNR-5 weighting, AdamW, bf16 autocast, EMA weights. Each stage runs for a fixed wall-clock time
(the step counts it reached are in the log). Afterwards a shape classifier reads samples of every
shape to measure what the model learned.

Writes into DIR: `vae.safetensors`, `<variant>-unet.safetensors`, `<variant>-te.safetensors` (fp16,
diffusers names, their configs in the metadata), `pretrain.json` (settings, losses, steps, timings,
measured shape accuracy) and `samples.png`. `python bench/demo_assemble.py` turns those parts
into the single-file checkpoint the package ships.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from demo_vae import (
    EMA,
    SIZE,
    VAE_CONFIG,
    autocast,
    encode_pool,
    finetune_decoder,
    load_part,
    load_vae,
    lr_at,
    save_part,
    train_vae,
)

from lora_trainer.accel.graphs import StepRunner
from lora_trainer.accel.options import AccelOptions
from lora_trainer.demo.world import COLOUR_NAMES, SEEN_SHAPES, SHAPES, sample_scenes


def unet_config(channels: tuple[int, ...], layers: int, heads: int, text_width: int) -> dict[str, Any]:
    """SD1's UNet layout (cross-attention on every level but the lowest), with these sizes."""
    n = len(channels)
    return {
        "sample_size": SIZE // 4, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
        "down_block_types": ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        "block_out_channels": tuple(channels), "layers_per_block": layers, "attention_head_dim": heads,
        "cross_attention_dim": text_width, "use_linear_projection": False,
    }


def text_config(width: int, layers: int, heads: int) -> dict[str, Any]:
    """CLIP ViT-L/14's text tower (vocabulary, 77 positions, quick GELU), narrow and shallow."""
    return {"vocab_size": 49408, "hidden_size": width, "intermediate_size": 4 * width,
            "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "projection_dim": width, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1}


VARIANTS: dict[str, dict[str, Any]] = {
    # shipped with the package (about 23 MB in fp16)
    "shapes-sd1": {"unet": unet_config((32, 64, 128, 96), 2, 4, 64), "text": text_config(64, 4, 4)},
    # the second, smaller model the defaults were also measured on (not shipped)
    "shapes-mini": {"unet": unet_config((32, 64, 64, 64), 2, 4, 32), "text": text_config(32, 3, 4)},
}
TRIGGER_WORDS = ("demo", "star")  # never in a pretraining caption: the demo's trigger "demostar" stays unknown


# ---------------------------------------------------------------------------------- captions as token ids
class CaptionTokens:
    """CLIP token ids for the world's captions, built straight from scene fields with random variations
    (vectorised: every word of the world is one token). Checked against the real tokenizer."""

    def __init__(self, tokenizer, generator: torch.Generator):
        self.g = generator
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        self.max_len = tokenizer.model_max_length

        def one(text: str) -> int:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            assert len(ids) == 1, (text, ids)
            return ids[0]

        self.colour = torch.tensor([one(c) for c in COLOUR_NAMES])
        self.shape = torch.tensor([one(s) for s in SHAPES])
        self.comma, self.background = one(","), one("background")
        used = set(self.colour.tolist()) | set(self.shape.tolist()) | {self.comma, self.background}
        used |= {i for w in TRIGGER_WORDS for i in tokenizer(w, add_special_tokens=False).input_ids}
        # stray words: ordinary vocabulary entries that none of our words (nor the trigger) use
        self.stray = torch.tensor([i for i in range(400, 40000) if i not in used])
        colour, shape, bg = torch.tensor([0, 11, 5]), torch.tensor([0, 4, 5]), torch.tensor([5, 8, 0])
        for k, ids in enumerate(self.batch(colour, shape, bg, variation=False).tolist()):
            text = f"{COLOUR_NAMES[colour[k]]} {SHAPES[shape[k]]}, {COLOUR_NAMES[bg[k]]} background"
            assert ids == tokenizer(text, padding="max_length", max_length=self.max_len).input_ids, text

    def batch(self, colour: torch.Tensor, shape: torch.Tensor, bg: torch.Tensor, *,
              variation: bool = True) -> torch.Tensor:
        """(N, 77) ids of "colour shape, bg background": colour dropped 10%, shape 15%, background
        15%, background first 30%, one stray word 20% (a second 10%), empty caption 10%."""
        n = len(colour)

        def chance(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=self.g) < p) if variation else torch.zeros(n, dtype=torch.bool)

        stray = self.stray[torch.randint(len(self.stray), (n, 2), generator=self.g)]
        # slots: colour, shape, comma, bg colour, "background", stray, stray
        tokens = torch.stack([self.colour[colour], self.shape[shape], torch.full((n,), self.comma),
                              self.colour[bg], torch.full((n,), self.background), stray[:, 0], stray[:, 1]], 1)
        swap = chance(0.3)
        first = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # object, comma, background
        second = torch.tensor([4.0, 5.0, 3.0, 1.0, 2.0])  # background, comma, object
        keys = torch.where(swap[:, None], second, first)
        keys = torch.cat([keys, torch.rand(n, 2, generator=self.g) * 5 + 0.5], 1)  # strays anywhere
        keep = torch.ones(n, 7, dtype=torch.bool)
        keep[:, 0] = ~chance(0.1)
        keep[:, 1] = ~chance(0.15)
        no_bg = chance(0.15)
        keep[:, 3] &= ~no_bg
        keep[:, 4] &= ~no_bg
        keep[:, 2] = (keep[:, 0] | keep[:, 1]) & ~no_bg
        keep[:, 5] = chance(0.2)
        keep[:, 6] = keep[:, 5] & chance(0.5)
        keep &= ~chance(0.1)[:, None]
        order = torch.where(keep, keys, torch.full_like(keys, 1e9)).argsort(dim=1)
        words = tokens.gather(1, order)
        count = keep.sum(1)
        out = torch.full((n, self.max_len), self.pad, dtype=torch.long)
        out[:, 0] = self.bos
        out[:, 1:8] = torch.where(torch.arange(7)[None] < count[:, None], words, self.pad)
        out[torch.arange(n), count + 1] = self.eos
        return out


def train_denoiser(name: str, spec: dict[str, Any], pool: dict[str, torch.Tensor], until: float,
                   device: torch.device, g: torch.Generator, *, batch: int, lr: float, log: dict,
                   init: Path | None = None, save=None, save_every: float = 60.0):
    """Train until the wall-clock time `until` (time.time()); `save(unet, te)` writes the EMA weights
    every `save_every` seconds and at the end, so a run stopped from outside still leaves a model."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizers import PAD_ENDOFTEXT, clip_tokenizer

    torch.manual_seed(int(torch.randint(2**31, (), generator=g)))
    unet = UNet2DConditionModel(**spec["unet"]).to(device)
    te = CLIPTextModel(CLIPTextConfig(**spec["text"])).to(device)
    if init is not None:  # continue an earlier run of this script from its saved (EMA) weights
        unet.load_state_dict(load_part(init / f"{name}-unet.safetensors")[0])
        te.load_state_dict(load_part(init / f"{name}-te.safetensors")[0], strict=False)
    tokens = CaptionTokens(clip_tokenizer(PAD_ENDOFTEXT), g)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    ac = sched.alphas_cumprod.to(device)
    snr = ac / (1 - ac)
    weight_t = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for epsilon prediction
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    ema = EMA([unet, te])
    n_pool, scale = len(pool["mean"]), pool["scale"]
    gd = torch.Generator(device).manual_seed(int(torch.randint(2**31, (), generator=g)))  # noise on the device

    def loss_fn(b: dict[str, torch.Tensor]) -> torch.Tensor:  # a pure function of the batch: CUDA-graphable
        a = ac[b["t"]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * b["latents"] + (1 - a).sqrt() * b["noise"]
        with autocast(device):
            hidden = te(b["ids"]).last_hidden_state
            pred = unet(noisy, b["t"], hidden).sample.float()
        return (((pred - b["noise"]) ** 2).mean(dim=(1, 2, 3)) * weight_t[b["t"]]).mean()

    # the whole step as one replayed CUDA graph (eager on the CPU): an eager step of these small
    # models is bound by kernel launches, not by the GPU
    runner = StepRunner(loss_fn, params, opt, AccelOptions(), max_grad_norm=1.0, device=device)
    start, step, losses = time.perf_counter(), 0, []
    seconds = max(1.0, until - time.time())
    last_save = start
    window = torch.zeros((), device=device)
    while (elapsed := time.perf_counter() - start) < seconds:
        for group in opt.param_groups:
            group["lr"] = lr * lr_at(elapsed / seconds, step, 200)
        if save is not None and time.perf_counter() - last_save > save_every:
            with ema.applied():
                save(unet, te)
            last_save = time.perf_counter()
        idx = torch.randint(n_pool, (batch,), generator=g)
        di = idx.to(device, non_blocking=True)
        latents = (pool["mean"][di] + pool["std"][di] * torch.randn(batch, 4, SIZE // 4, SIZE // 4,
                                                                    generator=gd, device=device)) * scale
        f = pool["fields"][idx]
        b = {"latents": latents, "ids": tokens.batch(f[:, 0], f[:, 1], f[:, 2]).to(device, non_blocking=True),
             "noise": torch.randn(latents.shape, generator=gd, device=device),
             "t": torch.randint(1000, (batch,), generator=gd, device=device)}
        loss = runner.step(b)
        ema.update()
        step += 1
        window = window + loss  # summed on the device: no host sync per step
        if step % 100 == 0:
            losses.append([step, round(elapsed, 1), float(window) / 100])
            window = torch.zeros((), device=device)
            if step % 500 == 0:
                print(f"{name}: step {step}, {elapsed:.0f} s, loss {losses[-1][2]:.4f}, "
                      f"{step / elapsed:.1f} it/s", flush=True)
    log.setdefault("runner", {})[name] = {**runner.stats, "graphs_off": runner.disabled_reason}
    ema.copy_to_params()
    if save is not None:
        save(unet, te)
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)
    n_params = {"unet": sum(p.numel() for p in unet.parameters()), "text": sum(p.numel() for p in te.parameters())}
    log[name] = {"steps": step, "seconds": round(time.perf_counter() - start, 1), "batch": batch, "lr": lr,
                 "losses": losses, "parameters": n_params}
    print(f"{name}: {step} steps in {seconds:.0f} s ({n_params})", flush=True)
    return unet, te


# ---------------------------------------------------------------------------------- export and checks
def bundle_of(unet, vae, te, scale: float):
    from lora_trainer.models.bundle import EPSILON, Family, ModelBundle
    from lora_trainer.models.tokenizers import PAD_ENDOFTEXT, clip_tokenizer

    vae.register_to_config(scaling_factor=scale)
    return ModelBundle(family=Family.SD1, prediction_type=EPSILON, unet=unet, vae=vae, text_encoders=[te],
                       tokenizers=[clip_tokenizer(PAD_ENDOFTEXT)], scaling_factor=scale, name="shapes",
                       source="pretraining")


def check_shapes(bundle, classifier, g: torch.Generator, *, per_shape: int, steps: int = 20) -> dict[str, Any]:
    """Sample `per_shape` pictures per prompted shape (random colours) and read them with the classifier."""
    from lora_trainer.demo.measure import generate_batch

    out: dict[str, Any] = {}
    for shape in SEEN_SHAPES:
        scenes = sample_scenes(per_shape, g, shapes=(shape,))
        images = generate_batch(bundle, scenes.captions(), seed=int(torch.randint(10**6, (), generator=g)),
                                steps=steps)
        out[shape] = classifier.fraction(images, shape)
    scenes = sample_scenes(per_shape, g, shapes=("star",))
    images = generate_batch(bundle, scenes.captions(shape_word="demostar"), seed=7, steps=steps)
    out["star_with_unknown_trigger"] = classifier.fraction(images, "star")
    out["mean_seen"] = sum(out[s] for s in SEEN_SHAPES) / len(SEEN_SHAPES)
    return out


def sample_grid(bundles: dict[str, Any], path: Path, *, steps: int = 20) -> None:
    from PIL import Image

    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import to_pil

    prompts = [f"{c} {s}, {b} background" for s, c, b in zip(
        SEEN_SHAPES, ("red", "yellow", "blue", "green", "white", "purple"),
        ("blue", "purple", "yellow", "pink", "black", "orange"))] + ["orange demostar, teal background", ""]
    rows = []
    for bundle in bundles.values():
        rows.append(to_pil(generate_batch(bundle, prompts, seed=3, steps=steps)))
    grid = Image.new("RGB", (SIZE * len(prompts), SIZE * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * SIZE, r * SIZE))
    grid.save(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage", choices=("all", "decoder", "denoisers"), default="all",
                   help="all: VAE then denoisers; decoder: fine-tune --init's decoder only; denoisers: "
                        "train the variants on --init's VAE latents (the last two can run side by side)")
    p.add_argument("--vae-seconds", type=float, default=45)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=SECONDS, or NAME=@T to stop at the time.time() T (default shapes-sd1=110, shapes-mini=70)")
    p.add_argument("--until", type=float, help="--stage decoder: stop at this time.time()")
    p.add_argument("--decoder-shapes", choices=("seen", "all"), default="seen",
                   help="--stage decoder: pictures of the seen shapes only, or of all seven (the star too)")
    p.add_argument("--init", help="folder of an earlier run: its VAE, and its denoisers to continue from")
    p.add_argument("--fresh", action="store_true", help="with --init: new denoisers (only the VAE is reused)")
    p.add_argument("--pool", type=int, default=200_000, help="encoded pictures the denoisers train on")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--log-name", default="pretrain.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="seconds-long CPU run (tests the script)")
    args = p.parse_args(argv)
    variants = dict(v.split("=") for v in args.variant) or {"shapes-sd1": "110", "shapes-mini": "70"}
    if args.smoke:
        global PSNR_PICTURES
        args.pool, args.batch, args.vae_batch, PSNR_PICTURES = 256, 4, 4, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(args.seed)
    log: dict[str, Any] = {"args": vars(args), "variants": {k: VARIANTS[k] for k in variants},
                           "vae_config": VAE_CONFIG, "torch": torch.__version__,
                           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    started = time.perf_counter()

    def write_log() -> None:
        log["total_seconds"] = round(time.perf_counter() - started, 1)
        tmp = out / (args.log_name + ".tmp")
        tmp.write_text(json.dumps(log, indent=1, default=str) + "\n")
        os.replace(tmp, out / args.log_name)

    init = Path(args.init) if args.init else None
    if args.stage != "all" and init is None:
        p.error("--stage decoder/denoisers needs --init (the VAE whose latents are kept)")
    if init is not None:
        vae, scale = load_vae(init / "vae.safetensors", device)
        log["init"] = {"from": str(init), "scaling_factor": scale}
    else:
        vae = train_vae(args.vae_seconds, device, g, batch=args.vae_batch, log=log)
        scale = None

    def save_vae(module) -> None:
        save_part(out / "vae.safetensors", module, {**VAE_CONFIG, "scaling_factor": log["scaling_factor"]}, "vae")

    if args.stage == "decoder":
        log["scaling_factor"] = scale
        until = args.until or time.time() + args.vae_seconds
        finetune_decoder(vae, until, device, g, batch=args.vae_batch, lr=args.decoder_lr, log=log, save=save_vae,
                         shapes=SHAPES if args.decoder_shapes == "all" else SEEN_SHAPES)
        write_log()
        return 0
    pool = encode_pool(vae, args.pool, device, g)
    if scale is not None:
        pool["scale"] = scale  # the same latent scale as the VAE's earlier users
    log["scaling_factor"] = pool["scale"]
    if args.stage == "all":
        save_vae(vae)
    write_log()
    for name, seconds in variants.items():
        def save(unet, te, name=name) -> None:
            save_part(out / f"{name}-unet.safetensors", unet, VARIANTS[name]["unet"], "unet")
            save_part(out / f"{name}-te.safetensors", te, VARIANTS[name]["text"], "text")

        # NAME=SECONDS from now, or NAME=@T: until the time.time() T (variants side by side with other stages)
        until = float(seconds[1:]) if seconds.startswith("@") else time.time() + float(seconds)
        train_denoiser(name, VARIANTS[name], pool, until, device, g, batch=args.batch, lr=args.lr, log=log,
                       init=None if (init is None or args.fresh) else init, save=save)
        write_log()
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
