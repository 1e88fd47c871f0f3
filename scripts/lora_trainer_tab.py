"""Loaded by the WebUI (A1111 / Forge) at start-up: registers the "Train LoRA" tab, settings and API.

The extension folder is on sys.path only while the WebUI loads this file, so `register()` imports
everything we need now.
"""

from lora_trainer.webui import register

register()
