"""LoRA Trainer: train LoRAs for Stable Diffusion inside AUTOMATIC1111/Forge or standalone.

The core (everything but `lora_trainer.webui`) never imports the host WebUI or Gradio.
"""

__version__ = "0.1.0"
