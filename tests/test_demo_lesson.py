"""The demo teaches (CPU, a few minutes): the README's `python -m lora_trainer demo` on the shipped demo model, then a
shape classifier trained on the synthetic world (`lora_trainer.demo.classifier`, the benchmarks' recipe) reads 64
"<colour> demostar, <colour> background" generations without and with the demo's LoRA (same prompts and seeds).
The base model never saw a star; the LoRA must make the classifier read one in at least 50 percentage points more
of them. Measured on training seeds 1-8 (docs/demo-model.md): the base model 3.1%, the LoRA 68.8-82.8% (seed 1, the
demo's default: 75.0%), so +66 to +80 points.

What the LoRA does to the other shapes' prompts is the report's to say (tests/test_report_demo_model.py): here the
demo prints it, measured on its leak-check set."""

from __future__ import annotations

import torch

from lora_trainer.cli import main
from lora_trainer.demo import DEMO_MODEL, TRIGGER
from lora_trainer.demo.classifier import train_classifier
from lora_trainer.demo.measure import generate_batch
from lora_trainer.demo.world import HELD_OUT, sample_scenes
from lora_trainer.lora import applied_lora
from lora_trainer.models.loader import load_model

N = 64  # generations per reading: one standard error of a share is at most 6 points


def test_the_demo_lora_draws_the_star_the_model_never_saw(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Did it learn?" in printed and "leak-check images" in printed, printed
    lora = out / "lora" / "demo-lora.safetensors"

    classifier = train_classifier(steps=300, batch=64)
    bundle = load_model(DEMO_MODEL, dtype=torch.float32)
    stars = sample_scenes(N, torch.Generator().manual_seed(7), shapes=(HELD_OUT,)).captions(shape_word=TRIGGER)

    def star_share() -> float:
        with torch.no_grad():
            return classifier.fraction(generate_batch(bundle, stars, seed=7, steps=12), HELD_OUT)

    base = star_share()
    with applied_lora(bundle, lora):
        learned = star_share()
    assert learned - base >= 0.5, (base, learned)
