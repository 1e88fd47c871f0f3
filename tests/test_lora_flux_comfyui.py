"""Opt-in: ComfyUI's own LoRA key map (`comfy/lora.py` of a ComfyUI checkout) maps and applies every
key of our Flux LoRA files.

Run with `LORA_TRAINER_COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/test_lora_flux_comfyui.py`
in a venv that can `import comfy.lora` (ComfyUI's requirements installed); skipped without the path.
ComfyUI is never vendored. What stands in for ComfyUI's model objects: `model_lora_keys_unet` and
`model_lora_keys_clip` read only `state_dict()` keys (plus `model_config.unet_config`), so plain
objects hold our modules' parameter names under ComfyUI's prefixes (`diffusion_model.` for the Flux
transformer, `clip_l.transformer.` and `t5xxl.transformer.` for the text encoders, which ComfyUI
names like transformers; ComfyUI loads BFL Flux files under `diffusion_model.` without renaming).

Tested with the key-map and patch functions of ComfyUI's `comfy/lora.py` at commit 41444b52 (its
`comfy.utils`, `comfy.model_management` and `comfy.model_base` replaced by stand-ins for the calls
those functions make: the full checkout was not available on the test machine).
"""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest
import torch

from lora_trainer.lora import LoraSpec, inject_lora
from lora_trainer.lora.network import ADAPTER
from lora_trainer.models.bundle import FLOW, Family, ModelBundle
from lora_trainer.models.flux import FLUX_DEV, FluxTransformer
from lora_trainer.models.ldm_config import bundled_config
from lora_trainer.models.ldm_convert import canonical_text_keys

COMFYUI = os.environ.get("LORA_TRAINER_COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set LORA_TRAINER_COMFYUI_PATH to a ComfyUI checkout")


@pytest.fixture(scope="module")
def comfy_lora():
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    import comfy.lora

    return comfy.lora


class _Stands:
    """Holds a state dict the way ComfyUI's BaseModel / CLIP objects expose it to the key maps."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state
        self.model_config = SimpleNamespace(unet_config={"image_model": "flux"})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def _comfy_views(bundle: ModelBundle) -> tuple[_Stands, _Stands]:
    unet = {f"diffusion_model.{k}": v for k, v in bundle.unet.state_dict().items()}
    clip = {f"clip_l.transformer.{k}": v for k, v in canonical_text_keys(bundle.text_encoders[0].state_dict()).items()}
    clip.update({f"t5xxl.transformer.{k}": v for k, v in bundle.text_encoders[1].state_dict().items()})
    return _Stands(unet), _Stands(clip)


def _patches(comfy_lora, bundle, lora_sd, caplog):
    model, clip = _comfy_views(bundle)
    key_map = comfy_lora.model_lora_keys_unet(model, {})
    key_map = comfy_lora.model_lora_keys_clip(clip, key_map)
    try:  # newer ComfyUI converts other trainers' formats first (kohya's names pass unchanged)
        import comfy.lora_convert

        lora_sd = comfy.lora_convert.convert_lora(dict(lora_sd))
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING):
        patches = comfy_lora.load_lora(lora_sd, key_map)
    assert not [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    return patches, {**model.state_dict(), **clip.state_dict()}


@pytest.fixture(scope="module")
def flux_meta() -> ModelBundle:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_cfg = {k: v for k, v in bundled_config("clip_vit_l14").items() if k not in ("architectures", "model_type")}
    with init_empty_weights():
        transformer = FluxTransformer(FLUX_DEV)
        clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
        t5 = T5EncoderModel(T5Config(**{k: v for k, v in bundled_config("t5_xxl").items() if k != "architectures"}))
    return ModelBundle(family=Family.FLUX1, prediction_type=FLOW, unet=transformer, vae=None,
                       text_encoders=[clip, t5], tokenizers=[], variant="dev")


def test_full_size_file_maps_every_key(comfy_lora, flux_meta, caplog):
    net = inject_lora(flux_meta, LoraSpec(rank=16, alpha=8, train_t5=True))
    try:
        lora_sd = net.kohya_state_dict()
    finally:
        net.remove()
    # ComfyUI reads each alpha with .item(): give the meta file real alpha scalars
    lora_sd = {k: torch.tensor(8.0, dtype=torch.float16) if k.endswith(".alpha") else v for k, v in lora_sd.items()}
    patches, state = _patches(comfy_lora, flux_meta, lora_sd, caplog)
    assert len(patches) == len(lora_sd) // 3 == 544
    assert all(key in state for key in patches)
    assert patches.keys() >= {"diffusion_model.double_blocks.0.img_attn.qkv.weight",
                              "diffusion_model.single_blocks.37.linear1.weight",
                              "clip_l.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                              "t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo.weight"}


def test_comfy_applies_the_same_weight_change(comfy_lora, caplog):
    """ComfyUI's own patch math (calculate_weight) gives each weight the change our adapters make."""
    from flux_support import diffusers_has_flux

    if not diffusers_has_flux():
        pytest.skip("the tiny Flux bundle needs diffusers >= 0.30")
    if not hasattr(comfy_lora, "calculate_weight"):
        pytest.skip("this ComfyUI has no comfy.lora.calculate_weight")
    from lora_trainer.models.flux.tiny import build_tiny_flux_bundle

    bundle = build_tiny_flux_bundle("dev", seed=0)
    net = inject_lora(bundle, LoraSpec(rank=4, alpha=2, train_t5=True), seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in net.layers.values():
            up = layer.lora_B[ADAPTER].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.05)
    try:
        lora_sd = net.kohya_state_dict(dtype=torch.float32)
        expected = {}
        for t in net.targets:
            layer = net.layers[t.kohya_name]
            delta = layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight * layer.scaling[ADAPTER]
            expected[t.kohya_name] = delta.detach()
    finally:
        net.remove()
    patches, state = _patches(comfy_lora, bundle, lora_sd, caplog)
    assert len(patches) == len(expected)
    by_target = {}
    for t in net.targets:
        prefix = {"unet": "diffusion_model.", "te1": "clip_l.transformer.", "te3": "t5xxl.transformer."}[t.component]
        path = t.module_name if t.component != "te1" or t.module_name.startswith("text_model.") \
            else f"text_model.{t.module_name}"
        by_target[f"{prefix}{path}.weight"] = expected[t.kohya_name]
    for key, patch in patches.items():
        weight = torch.zeros_like(state[key], dtype=torch.float32)
        changed = comfy_lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key)
        torch.testing.assert_close(changed, by_target[key], atol=1e-6, rtol=1e-5)
