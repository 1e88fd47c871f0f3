"""The demo's pretrained model and its synthetic world (shapes, colours, backgrounds).

`model/shapes-sd1.safetensors` is an SD1-architecture checkpoint (UNet, CLIP text encoder, VAE;
fp16, 23 MB) that we pretrained from scratch on pictures drawn by `world.py`: six shapes in twelve
colours on flat backgrounds. Its denoiser and text encoder never saw a star (`world.HELD_OUT`); its
VAE decoder, a generic codec, was fine-tuned on all seven shapes. `python -m lora_trainer demo`
teaches it the star with a LoRA. Recipe, command and measurements: docs/demo-model.md. Licence: CC0-1.0.
"""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
DEMO_MODEL = MODEL_DIR / "shapes-sd1.safetensors"
TRIGGER = "demostar"  # never in a pretraining caption: the base model has no meaning for it
