"""An automatic leak-check set for the "did it learn?" report's "other concepts" leakage (train/validation.py),
measured on demo LoRA files: the base model (LoRA off) draws a few pictures from prompts of *other* concepts,
and those pictures, captioned with their prompts, stand in for a leak-check folder.

Per LoRA file (a finished bench/reg_leak_demo.py run folder: its training pictures and captions, its LoRA), the
report's formula Σ|LoRA(o) - base(o)|² / Σ|LoRA(t) - base(t)|² at DDPM timestep 500, t = 16 probes over 8 of the
run's star pictures with their captions (each picture twice, with different noise), o = 16 other pictures with
their captions, the n-th probe of each side with the same noise. Other sides:
- `rendered`: 16 rendered pictures of the seen shapes (scene seed 131) with their captions: the same kind of set
  as the demo's leak-check folder (the report's "leak_check"), the reference.
- `gen16`: the base model's own generations of those 16 prompts (12 Euler steps, CFG 5, 64 px, image seeds 500..),
  their latents as the sampler leaves them.
- `gen16_png`: the same prompts drawn, decoded, stored as 8-bit pictures and encoded again by the VAE (what a
  set kept as PNGs would give; generate_batch's starting noise, so not the same pictures as `gen16`).
- `gen8`: the first 8 of them at 8 steps, each twice (with different noise): a cheaper set.
- `generic16`: the base model's generations of 16 everyday prompts (people, animals, landscapes, food...) that
  the demo model was never taught: what a model without prompts of its own would get.

    OMP_NUM_THREADS=1 python bench/generated_leak_check.py LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--model MODEL] \
        [--sets SETS.pt] [--noise K]

`--sets FILE` keeps the other sides' latents between calls; `--noise K` reads each file with K noise draws (draw k:
noise seeds 104729 + 1000 k + n). Results: bench/results/demo_lora_cpu/generated_leak_check_2026-12-06.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENERIC = ["a portrait photo of a woman smiling", "an old man reading a newspaper", "a dog running on a beach",
           "a cat sleeping on a sofa", "a mountain lake at sunrise", "a city street at night with lights",
           "a bowl of fruit on a wooden table", "a plate of pasta with tomato sauce", "a red sports car",
           "a wooden chair in an empty room", "a lighthouse on a rocky coast", "a horse in a green field",
           "a watercolor painting of a forest", "a pencil sketch of a house", "a bird on a branch",
           "a cup of coffee on a desk"]


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.demo import DEMO_MODEL
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import SEEN_SHAPES, render, sample_scenes
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--sets", default="", help="cache file for the other sides' latents")
    p.add_argument("--noise", type=int, default=1, help="noise draws per file (draw k: seeds 104729 + 1000 k + n)")
    args = p.parse_args(argv)
    bundle = load_model(args.model, dtype=torch.float32)
    bundle.unet.eval()
    cache = Path(args.sets) if args.sets else None
    if cache is not None and cache.exists():
        sets = torch.load(cache)
    else:
        scenes = sample_scenes(16, torch.Generator().manual_seed(131), shapes=SEEN_SHAPES)
        prompts = scenes.captions()
        with torch.no_grad():
            sets = {"rendered": (encode(bundle, render(scenes, 64)), prompts),
                    "gen16": (generate_latents(bundle, prompts, steps=12), prompts),
                    "gen16_png": (encode(bundle, png(generate_batch(bundle, prompts, seed=500, steps=12))), prompts),
                    "gen8": (generate_latents(bundle, prompts[:8], steps=8).repeat(2, 1, 1, 1), prompts[:8] * 2),
                    "generic16": (generate_latents(bundle, GENERIC, steps=12), GENERIC)}
        if cache is not None:
            torch.save(sets, cache)
    for item in args.runs:
        label, run = item.split("=", 1)
        for k in range(args.noise):
            print(label, json.dumps({**measure(bundle, Path(run), sets, draw=k), "draw": k}), flush=True)
    return 0


def encode(bundle, pictures):
    """Pictures in [0, 1] -> the scaled latents training caches."""
    return bundle.vae.encode(pictures * 2 - 1).latent_dist.mean * bundle.scaling_factor


def png(pictures):
    """Pictures as a PNG file holds them (8 bits a channel): what a leak-check folder gives the VAE."""
    return (pictures * 255).round() / 255


def generate_latents(bundle, prompts: list[str], *, steps: int, seed: int = 500):
    """The base model's pictures of `prompts`, as latents (64 px, CFG 5, image i from seed + i)."""
    import torch

    from lora_trainer.train.sampling import build_pipeline
    from lora_trainer.train.text import encode_captions

    pipe = build_pipeline(bundle)
    pipe.set_progress_bar_config(disable=True)
    hidden, _ = encode_captions(bundle, prompts)
    negative, _ = encode_captions(bundle, [""] * len(prompts))
    side = 64 // 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    start = torch.stack([torch.randn(4, side, side, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(prompts))])
    return pipe(prompt_embeds=hidden, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=5.0,
                width=64, height=64, latents=start, output_type="latent").images.float()


def star_side(bundle, run: Path):
    """8 of the run's training pictures spread over them (as the report picks), each twice, with captions."""
    import numpy as np
    import torch
    from PIL import Image

    pictures = sorted((run / "images").glob("*.png"))
    chosen = [pictures[int(k * len(pictures) / 8)] for k in range(8)] * 2
    array = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in chosen])
    with torch.no_grad():
        latents = encode(bundle, torch.from_numpy(array).permute(0, 3, 1, 2))
    return latents, [f.with_suffix(".txt").read_text().strip() for f in chosen]


def measure(bundle, run: Path, sets: dict, draw: int = 0) -> dict:
    import torch

    from lora_trainer.lora import applied_lora
    from lora_trainer.train.text import encode_captions

    betas = torch.linspace(bundle.schedule.beta_start ** 0.5, bundle.schedule.beta_end ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)[500]
    sides = {"star": star_side(bundle, run), **sets}
    shape = sides["star"][0].shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(104729 + 1000 * draw + n))
                         for n in range(16)])
    t = torch.full((16,), 500)

    @torch.no_grad()
    def predict(latents, captions):
        hidden, _ = encode_captions(bundle, captions)
        return bundle.unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, t, encoder_hidden_states=hidden).sample

    base = {name: predict(*side) for name, side in sides.items()}
    with applied_lora(bundle, run / "lora" / "demo-lora.safetensors"):
        lora = {name: predict(*side) for name, side in sides.items()}
    change = {name: float(((lora[name] - base[name]) ** 2).sum()) for name in sides}
    return {name: round(change[name] / change["star"], 3) for name in sets}


if __name__ == "__main__":
    raise SystemExit(main())
