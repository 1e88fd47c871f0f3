"""How well can the demo model's autoencoder carry a star at all? The shape classifier on rendered
pictures and on the same pictures encoded and decoded by the model's VAE (no denoiser involved).

    python bench/demo_vae_ceiling.py [--model MODEL.safetensors] [--n 64] --json RESULT.json

Whatever a LoRA teaches the denoiser, every generated picture leaves through this decoder: the star
reading of VAE round trips of perfect stars is the ceiling a demo LoRA can reach on the classifier.
Per radius band (fraction of the side): share of stars read as "star" (argmax, P > 0.5, P > 0.9), and
the classifier's accuracy on seen shapes, rendered and round-tripped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from lora_trainer.demo import DEMO_MODEL
    from lora_trainer.demo.classifier import train_classifier
    from lora_trainer.demo.world import HELD_OUT, SEEN_SHAPES, render, sample_scenes
    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--n", type=int, default=64, help="pictures per radius band and kind")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    started = time.perf_counter()
    classifier = train_classifier(steps=300, batch=64)  # the classifier bench/demo_lora*.py use
    star = classifier.classes.index(HELD_OUT)
    vae = load_model(Path(args.model), dtype=torch.float32).vae

    @torch.no_grad()
    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        return (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def read(x: torch.Tensor, truth: list[str]) -> dict[str, float]:
        prob = classifier(x).softmax(1)
        named = [classifier.classes[i] for i in prob.argmax(1).tolist()]
        return {"star_argmax": round((prob.argmax(1) == star).float().mean().item(), 3),
                "star_p>0.5": round((prob[:, star] > 0.5).float().mean().item(), 3),
                "star_p>0.9": round((prob[:, star] > 0.9).float().mean().item(), 3),
                "accuracy": round(sum(a == b for a, b in zip(named, truth)) / len(truth), 3)}

    result: dict = {"command": "python bench/demo_vae_ceiling.py " + " ".join(argv or __import__("sys").argv[1:]),
                    "machine": f"{platform.machine()} CPU, torch {torch.__version__}", "bands": {}}
    for lo, hi in ((0.18, 0.24), (0.24, 0.30), (0.30, 0.38)):
        band = result["bands"][f"{lo}-{hi}"] = {}
        for label, shapes in (("star", (HELD_OUT,)), ("seen", SEEN_SHAPES)):
            scenes = sample_scenes(args.n, torch.Generator().manual_seed(3), shapes=shapes, radius=(lo, hi))
            pictures = render(scenes, 64)
            band[f"{label}_rendered"] = read(pictures, scenes.shapes())
            band[f"{label}_roundtrip"] = read(roundtrip(pictures), scenes.shapes())
        print(f"radius {lo}-{hi}:", json.dumps(band), flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
