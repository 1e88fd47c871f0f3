"""Candidate leakage measures for the "did it learn?" report, read on finished demo LoRA runs (issue 13: today's
"other concepts" ratio at timestep 500 does not separate leaking from good runs on the shipped demo model,
bench/results/demo_lora_cpu/generated_leak_check_2026-12-06.md). Per run, noise draw and timestep, on the rendered
leak-check-like set (16 pictures of the seen shapes with their captions) against 16 probes of the run's own star
pictures, the same noise on both sides:
- `ratio`: the report's Σ|LoRA(o) - base(o)|² / Σ|LoRA(t) - base(t)|²;
- `hurt`: how much worse the LoRA denoises the other pictures, (MSE_LoRA(o) - MSE_base(o)) / MSE_base(o);
- `hurt_per_gain`: that, over how much better it denoises its own, (MSE_base(t) - MSE_LoRA(t)) / MSE_base(t);
- `moved`: the LoRA's change on the other pictures over the base model's error there, Σ|LoRA(o) - base(o)|² / Σ|base(o) - ε|².
At high timesteps the picture is mostly noise and the prediction decides its composition (which shape is drawn):
where a LoRA that draws its concept for other prompts should show. `--generated`: instead, whole generations
(12 Euler steps, CFG 5, 64 px) of the 16 other prompts and of 8 of the run's star captions, with and without the
LoRA from the same starting noise (seeds 500, 900, 1300): the mean squared change of the final latents.

    OMP_NUM_THREADS=1 python bench/leak_measures.py --sets /tmp/glc/sets.pt --noise 3 LABEL=RUN_DIR ...
    OMP_NUM_THREADS=2 python bench/leak_measures.py --sets /tmp/glc/sets.pt --generated LABEL=RUN_DIR ...

Results: bench/results/demo_lora_cpu/leak_measures_2026-12-06.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

TIMESTEPS = (250, 500, 750, 900, 980)


def measures(bundle, run: Path, other: tuple, draw: int) -> dict:
    import torch
    from generated_leak_check import star_side

    from lora_trainer.lora import applied_lora
    from lora_trainer.train.text import encode_captions

    betas = torch.linspace(bundle.schedule.beta_start ** 0.5, bundle.schedule.beta_end ** 0.5, 1000) ** 2
    abars = torch.cumprod(1 - betas, 0)
    sides = {"star": star_side(bundle, run), "other": other}
    shape = sides["star"][0].shape[1:]
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(104729 + 1000 * draw + n))
                         for n in range(16)])
    hidden = {k: encode_captions(bundle, v[1])[0] for k, v in sides.items()}

    @torch.no_grad()
    def predict(name: str, step: int):
        a = abars[step]
        x = a.sqrt() * sides[name][0] + (1 - a).sqrt() * noise
        return bundle.unet(x, torch.full((16,), step), encoder_hidden_states=hidden[name]).sample

    base = {(k, s): predict(k, s) for k in sides for s in TIMESTEPS}
    with applied_lora(bundle, run / "lora" / "demo-lora.safetensors"):
        lora = {(k, s): predict(k, s) for k in sides for s in TIMESTEPS}
    out = {}
    for s in TIMESTEPS:
        def sq(a):
            return float((a ** 2).sum())
        ch_o, ch_t = sq(lora["other", s] - base["other", s]), sq(lora["star", s] - base["star", s])
        eb_o, el_o = sq(base["other", s] - noise), sq(lora["other", s] - noise)
        eb_t, el_t = sq(base["star", s] - noise), sq(lora["star", s] - noise)
        hurt, gain = (el_o - eb_o) / eb_o, (eb_t - el_t) / eb_t
        out[str(s)] = {"ratio": round(ch_o / ch_t, 3), "hurt": round(hurt, 4), "gain": round(gain, 4),
                       "hurt_per_gain": round(hurt / gain, 3) if gain > 0 else None, "moved": round(ch_o / eb_o, 4)}
    return out


def generated_change(bundle, run: Path, other_prompts: list[str], seeds=(500, 900, 1300)) -> dict:
    import torch
    from generated_leak_check import generate_latents, star_side

    from lora_trainer.lora import applied_lora

    star_prompts = star_side(bundle, run)[1][:8]
    row = {}
    for seed in seeds:
        with torch.no_grad():
            bo = generate_latents(bundle, other_prompts, steps=12, seed=seed)
            bs = generate_latents(bundle, star_prompts, steps=12, seed=seed)
            with applied_lora(bundle, run / "lora" / "demo-lora.safetensors"):
                lo = generate_latents(bundle, other_prompts, steps=12, seed=seed)
                ls = generate_latents(bundle, star_prompts, steps=12, seed=seed)
        co, cs = float(((lo - bo) ** 2).mean()), float(((ls - bs) ** 2).mean())
        row[str(seed)] = {"other": round(co, 4), "star": round(cs, 4), "ratio": round(co / cs, 3)}
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    from lora_trainer.demo import DEMO_MODEL
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--sets", required=True, help="bench/generated_leak_check.py's cached sets (its `rendered`)")
    p.add_argument("--noise", type=int, default=3)
    p.add_argument("--generated", action="store_true", help="the change of whole generations instead")
    p.add_argument("--prompts", type=int, default=16, help="--generated: other prompts (scene seed 131)")
    p.add_argument("--seeds", default="500,900,1300", help="--generated: starting-noise seeds")
    args = p.parse_args(argv)
    bundle = load_model(args.model, dtype=torch.float32)
    bundle.unet.eval()
    other = torch.load(args.sets)["rendered"]
    for item in args.runs:
        label, run = item.split("=", 1)
        if args.generated:
            from lora_trainer.demo.world import SEEN_SHAPES, sample_scenes

            prompts = other[1] if args.prompts == 16 else sample_scenes(
                args.prompts, torch.Generator().manual_seed(131), shapes=SEEN_SHAPES).captions()
            seeds = tuple(map(int, args.seeds.split(",")))
            print(label, json.dumps(generated_change(bundle, Path(run), prompts, seeds)), flush=True)
            continue
        for k in range(args.noise):
            print(label, json.dumps({"draw": k, **measures(bundle, Path(run), other, k)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
