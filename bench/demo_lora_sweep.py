"""Train demo LoRAs with setting overrides and read N generations of each with the shape classifier.

    python bench/demo_lora_sweep.py --work DIR '{"NAME": {"conv_rank": 8, "learning_rate": 1e-2, ...}}' [--n 32]
        [--model CHECKPOINT]   # default: the shipped demo model

Each run: the demo's settings (`commands.demo.demo_config`) with the given TrainConfig fields
overridden (plus "images", default 16, and "epochs", default 15), trained on the demo model; then
`n` prompts "<colour> demostar, <colour> background" (scene seed 7, latent seeds 7.., 12 Euler steps,
CFG 5) with the LoRA, and once without it (cached in DIR). Printed per run: the share the classifier
names "star" (argmax), the share with P(star) > 0.9, and the mean P(star). The classifier (300 steps)
is cached in DIR too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from lora_trainer.commands.demo import demo_config
    from lora_trainer.dataset.prepare import prepare_dataset
    from lora_trainer.demo import DEMO_MODEL, TRIGGER
    from lora_trainer.demo.classifier import ShapeClassifier, train_classifier
    from lora_trainer.demo.dataset import write_concept_images
    from lora_trainer.demo.measure import generate_batch
    from lora_trainer.demo.world import HELD_OUT, sample_scenes
    from lora_trainer.lora import applied_lora
    from lora_trainer.models.loader import load_model
    from lora_trainer.train import run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", help="JSON object: run name -> TrainConfig overrides")
    p.add_argument("--work", required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--model", default=str(DEMO_MODEL), help="a demo-world checkpoint (default: the shipped one)")
    args = p.parse_args(argv)
    model = Path(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cached = work / "classifier.pt"
    if cached.exists():
        classifier = ShapeClassifier()
        classifier.load_state_dict(torch.load(cached))
        classifier.eval()
    else:
        classifier = train_classifier(steps=300, batch=64)
        torch.save(classifier.state_dict(), cached)
    bundle = load_model(model, dtype=torch.float32)
    prompts = sample_scenes(args.n, torch.Generator().manual_seed(7), shapes=(HELD_OUT,)).captions(
        shape_word=TRIGGER)
    star = classifier.classes.index(HELD_OUT)

    def measure(lora: Path | None = None) -> dict:
        with applied_lora(bundle, lora):
            images = generate_batch(bundle, prompts, seed=7, steps=12)
        with torch.no_grad():
            prob = classifier(images).softmax(1)
        return {"argmax": round((prob.argmax(1) == star).float().mean().item(), 3),
                "p>0.9": round((prob[:, star] > 0.9).float().mean().item(), 3),
                "mean_p": round(prob[:, star].mean().item(), 3),
                "pred": [classifier.classes[i] for i in prob.argmax(1).tolist()]}

    base = work / f"base-{args.n}.json"
    if not base.exists():
        base.write_text(json.dumps(measure()))
    print("base", json.loads(base.read_text()), flush=True)
    for name, overrides in json.loads(args.runs).items():
        images, epochs = overrides.pop("images", 16), overrides.pop("epochs", 15)
        folder = work / name
        write_concept_images(folder / "images", images, seed=1)
        dataset = prepare_dataset(folder / "images", folder / "dataset", TRIGGER, repeats=1, resolution=64)
        config = demo_config(str(model), dataset.out, folder / "lora", epochs=epochs, seed=1, device="cpu")
        for key, value in overrides.items():
            setattr(config, key, value)
        cpu, wall = time.process_time(), time.perf_counter()
        result = run_training(config, bundle=bundle, owns_bundle=False)
        train = {"steps": result.steps, "cpu_s": round(time.process_time() - cpu, 1),
                 "wall_s": round(time.perf_counter() - wall, 1), "last_loss": round(result.losses[-1], 4)}
        print(name, overrides, train, measure(result.lora_path), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
