""""Did it learn?" on the shipped demo model (CPU, about two minutes): the verdict's thresholds against
real runs of the demo's own LoRA on its sixteen star pictures (bench/results/learn_thresholds_demo_cpu.md).

- 4 steps at a hundredth of the demo's learning rate: "not learned", told to train longer.
- the demo's settings, 2 epochs (8 steps): "learned" (neither "not learned" nor "leaks").
- ten times the demo's learning rate: the loss ends above the base model's, "not learned", told to
  lower the learning rate (not to raise it).
What the LoRAs draw is not checked here: the demo model's VAE caps the classifier's reading
(bench/results/demo_lora_cpu/vae_ceiling.md).
"""

from __future__ import annotations

import pytest
import torch

from lora_trainer.commands.demo import demo_config
from lora_trainer.dataset.prepare import prepare_dataset
from lora_trainer.demo import DEMO_MODEL, TRIGGER
from lora_trainer.demo.dataset import write_concept_images
from lora_trainer.models.loader import load_model
from lora_trainer.train import run_training


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo-report")
    write_concept_images(work / "images", 16, seed=1)
    dataset = prepare_dataset(work / "images", work / "dataset", TRIGGER, repeats=1, resolution=64)
    return work, dataset.out, load_model(DEMO_MODEL, dtype=torch.float32)


def _run(demo_data, name: str, *, epochs: int, lr: float) -> dict:
    work, data, bundle = demo_data
    config = demo_config(str(DEMO_MODEL), data, work / name, epochs=epochs, seed=1, device="cpu")
    config.learning_rate, config.text_encoder_lr = lr, lr / 2
    return run_training(config, bundle=bundle, owns_bundle=False).report


def test_under_trained_run_is_not_learned(demo_data):
    report = _run(demo_data, "under", epochs=1, lr=3e-5)
    assert report["verdict"] == "not_learned", report["message"]
    assert "train longer or raise the learning rate" in report["message"]


def test_demo_settings_learn_without_leaking(demo_data):
    report = _run(demo_data, "good", epochs=2, lr=3e-3)
    assert report["verdict"] == "learned", report["message"]
    assert report["best_epoch"] == 2 and report["best_path"]


def test_diverged_run_is_told_to_lower_the_learning_rate(demo_data):
    report = _run(demo_data, "diverged", epochs=1, lr=3e-2)
    assert report["epochs"][-1]["improvement"] < 0
    assert report["verdict"] == "not_learned" and "lower the learning rate" in report["message"]
