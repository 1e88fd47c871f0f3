"""Key names, counts, shapes and order equal what kohya sd-scripts' networks/lora_flux.py creates for
full-size FLUX.1 with CLIP-L and T5-XXL (built on the meta device: no weights, no memory).

Checked once against kohya's own LoRANetwork (sd-scripts 48d368fa, `lora_flux.create_network` on
its meta `flux_models.Flux` with transformers 4.46): identical names, shapes and order, 376 modules
without T5 and 544 with `train_t5xxl=True` (not run here: sd-scripts is not vendored)."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.lora import LoraSpec, inject_lora
from lora_trainer.models.bundle import FLOW, Family, ModelBundle
from lora_trainer.models.flux import FLUX_DEV, FluxTransformer
from lora_trainer.models.ldm_config import bundled_config

DOUBLE = ("img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
          "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")
SINGLE = ("linear1", "linear2", "modulation_lin")
CLIP = ("self_attn_k_proj", "self_attn_v_proj", "self_attn_q_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")
T5 = ("layer_0_SelfAttention_q", "layer_0_SelfAttention_k", "layer_0_SelfAttention_v", "layer_0_SelfAttention_o",
      "layer_1_DenseReluDense_wi_0", "layer_1_DenseReluDense_wi_1", "layer_1_DenseReluDense_wo")


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


def _expected(t5: bool, clip: bool = True) -> list[str]:
    names = [f"lora_te1_text_model_encoder_layers_{i}_{n}" for i in range(12) for n in CLIP] if clip else []
    names += [f"lora_te3_encoder_block_{i}_{n}" for i in range(24) for n in T5] if t5 else []
    names += [f"lora_unet_double_blocks_{i}_{n}" for i in range(19) for n in DOUBLE]
    names += [f"lora_unet_single_blocks_{i}_{n}" for i in range(38) for n in SINGLE]
    return names


@pytest.mark.parametrize("t5", [False, True], ids=["default", "train_t5xxl"])
def test_kohya_lora_flux_default_targets(flux_meta, t5):
    net = inject_lora(flux_meta, LoraSpec(rank=16, alpha=8, train_t5=t5))
    try:
        assert [t.kohya_name for t in net.targets] == _expected(t5)  # kohya's order too
        sd = net.kohya_state_dict()
    finally:
        net.remove()
    assert len(sd) == 3 * (304 + 72 + (168 if t5 else 0))
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"] == (16, 3072)
    assert shapes["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] == (9216, 16)
    assert shapes["lora_unet_double_blocks_18_txt_mod_lin.lora_up.weight"] == (18432, 16)
    assert shapes["lora_unet_single_blocks_37_linear1.lora_up.weight"] == (21504, 16)
    assert shapes["lora_unet_single_blocks_0_linear2.lora_down.weight"] == (16, 15360)
    assert shapes["lora_unet_single_blocks_0_modulation_lin.lora_up.weight"] == (9216, 16)
    assert shapes["lora_te1_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"] == (3072, 16)
    if t5:
        assert shapes["lora_te3_encoder_block_23_layer_1_DenseReluDense_wo.lora_down.weight"] == (16, 10240)
    assert all(v.dtype == torch.float16 for v in sd.values())
    assert sd["lora_unet_single_blocks_0_linear1.alpha"].dim() == 0


def test_transformer_only(flux_meta):
    net = inject_lora(flux_meta, LoraSpec(rank=4, alpha=4, train_text_encoder=False))
    try:
        assert [t.kohya_name for t in net.targets] == _expected(t5=False, clip=False)
    finally:
        net.remove()
