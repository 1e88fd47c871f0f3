"""Leakage on the demo model: train LoRAs (good / over-trained / others) for bench/leak_probes.py.

OMP_NUM_THREADS=1 python bench/leak_runs.py good over long hot slow unetonly   # files under /tmp/leak/work
Settings: the demo's (commands.demo.demo_config, 16 star pictures, seed 1) with the overrides in RUNS.
"""
# ruff: noqa
import sys, time, json
from pathlib import Path
import torch
from lora_trainer.commands.demo import demo_config
from lora_trainer.dataset.prepare import prepare_dataset
from lora_trainer.demo import DEMO_MODEL, TRIGGER
from lora_trainer.demo.dataset import write_concept_images
from lora_trainer.models.loader import load_model
from lora_trainer.train import run_training

work = Path("/tmp/leak/work")
if not (work / "dataset").exists():
    write_concept_images(work / "images", 16, seed=1)
    prepare_dataset(work / "images", work / "dataset", TRIGGER, repeats=1, resolution=64)
data = work / "dataset"
bundle = load_model(DEMO_MODEL, dtype=torch.float32)
RUNS = {
  "good": dict(epochs=15, save_every_n_epochs=5),
  "long": dict(epochs=60, save_every_n_epochs=30),
  "hot": dict(epochs=15, save_every_n_epochs=5, rank=32, alpha=32.0, learning_rate=1e-2, text_encoder_lr=5e-3),
  "slow": dict(epochs=15, learning_rate=3e-4, text_encoder_lr=1.5e-4),
  "unetonly": dict(epochs=60, save_every_n_epochs=30, rank=32, alpha=32.0, train_text_encoder=False),
  "over": dict(epochs=60, save_every_n_epochs=15, rank=32, alpha=32.0, learning_rate=3e-3, text_encoder_lr=3e-3),
}
for name in sys.argv[1:]:
    s = dict(RUNS[name]); ep = s.pop("epochs")
    config = demo_config(str(DEMO_MODEL), data, work / name, epochs=ep, seed=1, device="cpu")
    for k, v in s.items(): setattr(config, k, v)
    config.validate_every_n_epochs = 0
    t = time.time()
    r = run_training(config, bundle=bundle, owns_bundle=False)
    print(name, r.steps, "steps", round(time.time()-t), "s", r.losses[0], r.losses[-1], [str(p) for p in r.saved], r.lora_path, flush=True)
