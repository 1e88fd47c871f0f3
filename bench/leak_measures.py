"""Leakage measures of demo LoRA files, from the UNet's predictions alone (no generation): the report's own
(pure-noise probes, the caption with and without its trigger) and variants that probe with the captions of
the *other*, seen shapes, to compare against what the classifier reads (bench/leak_classify.py).

    OMP_NUM_THREADS=1 python bench/leak_measures.py MODEL LABEL=LORA [LABEL=LORA ...] [--k 32]

Per file (K probes; star side: the demo's 16 training captions, seed 1; other side: K `<colour> <seen shape>,
<colour> background` scenes, seed 31; the same noise per probe k on both sides):
- `pure`: the report's measure, 1 - sum|L(t) - L(p)|^2 / sum|L(t) - B(p)|^2 on pure noise at levels 1.0-0.93
  (t: caption with the trigger, p: without it; L: with the LoRA, B: the base model).
- `other_share`: sum <L(o) - B(o), L(t) - B(t)> / sum |L(t) - B(t)|^2 on pure noise (o: another shape's caption):
  the share of the LoRA's change with the trigger that also shows when another shape is asked for.
- `other_ratio`: sum |L(o) - B(o)|^2 / sum |L(t) - B(t)|^2, pure noise: how much it moves other prompts at all.
- `other_share_mid`, `other_ratio_mid`: the same at timestep 500 on the (noised) pictures of each side.
- `plain_ratio_mid`: sum |L(p) - B(p)|^2 / sum |L(t) - B(t)|^2 at timestep 500 on the star pictures (needs no
  other concept: what the product's own validation pairs could give).
- `gen_ratio_mid`: the same on the base model's own pictures of the trigger-less captions (generated once, 12
  steps, seeds 11..), captioned without the trigger: `other_ratio_mid` with nothing but the training captions.
Results: bench/results/demo_lora_cpu/candidate_lesson_and_leakage_2026-12-05.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS = (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93)


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.demo import TRIGGER
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, render, sample_scenes
    from lora_trainer.lora import applied_lora
    from lora_trainer.models.loader import load_model
    from lora_trainer.train.text import encode_captions
    from lora_trainer.train.validation import strip_trigger

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("loras", nargs="+")
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args(argv)
    bundle = load_model(args.model, dtype=torch.float32)
    unet, k = bundle.unet, args.k
    star = sample_scenes(16, torch.Generator().manual_seed(1), shapes=(HELD_OUT,))
    other = sample_scenes(k, torch.Generator().manual_seed(31), shapes=SEEN_SHAPES)
    c_t = [star.captions(shape_word=TRIGGER)[i % 16] for i in range(k)]
    c_p = [strip_trigger(c, [TRIGGER]) for c in c_t]
    c_o = other.captions()
    with torch.no_grad():
        def latents_of(pictures):
            return bundle.vae.encode(pictures * 2 - 1).latent_dist.mean * bundle.scaling_factor

        def latents(scenes, idx):
            return latents_of(render(scenes, 64)[idx])
        z_t, z_o = latents(star, [i % 16 for i in range(k)]), latents(other, list(range(k)))
        # the base model's own pictures of the trigger-less captions (what the engine could make itself)
        z_g = latents_of(generate_batch(bundle, c_p, seed=11, steps=12).cpu())
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(z_t.shape, generator=g)
    betas = torch.linspace(bundle.schedule.beta_start ** 0.5, bundle.schedule.beta_end ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t_pure = torch.tensor([round(LEVELS[i % len(LEVELS)] * 999) for i in range(k)])
    x_pure = (1 - abar[t_pure]).sqrt().view(-1, 1, 1, 1) * eps  # zero latents noised: the report's probes
    t_mid = torch.full((k,), 500)
    a = abar[500].sqrt()
    x_t_mid, x_o_mid = a * z_t + (1 - abar[500]).sqrt() * eps, a * z_o + (1 - abar[500]).sqrt() * eps
    x_g_mid = a * z_g + (1 - abar[500]).sqrt() * eps

    @torch.no_grad()
    def pred(captions, x, t):
        hidden, _ = encode_captions(bundle, captions)
        return unet(x, t, encoder_hidden_states=hidden).sample

    def all_preds():
        return {"t": pred(c_t, x_pure, t_pure), "p": pred(c_p, x_pure, t_pure), "o": pred(c_o, x_pure, t_pure),
                "t_mid": pred(c_t, x_t_mid, t_mid), "o_mid": pred(c_o, x_o_mid, t_mid),
                "p_mid": pred(c_p, x_t_mid, t_mid), "g_mid": pred(c_p, x_g_mid, t_mid)}

    unet.eval()
    base = all_preds()
    for item in args.loras:
        label, path = item.split("=", 1)
        with applied_lora(bundle, path):
            lo = all_preds()
        d_t = lo["t"] - base["t"]
        d_o = lo["o"] - base["o"]
        dm_t, dm_o = lo["t_mid"] - base["t_mid"], lo["o_mid"] - base["o_mid"]
        out = {"pure": 1 - float(((lo["t"] - lo["p"]) ** 2).sum() / ((lo["t"] - base["p"]) ** 2).sum()),
               "other_share": float((d_o * d_t).sum() / (d_t ** 2).sum()),
               "other_ratio": float((d_o ** 2).sum() / (d_t ** 2).sum()),
               "other_share_mid": float((dm_o * dm_t).sum() / (dm_t ** 2).sum()),
               "other_ratio_mid": float((dm_o ** 2).sum() / (dm_t ** 2).sum()),
               "plain_ratio_mid": float(((lo["p_mid"] - base["p_mid"]) ** 2).sum() / (dm_t ** 2).sum()),
               "gen_ratio_mid": float(((lo["g_mid"] - base["g_mid"]) ** 2).sum() / (dm_t ** 2).sum())}
        print(label, json.dumps({key: round(v, 3) for key, v in out.items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
