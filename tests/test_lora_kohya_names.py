"""Key names, counts and shapes equal what kohya sd-scripts' networks/lora.py writes for the
full-size SD1.5 and SDXL architectures (built on the meta device: no weights, no memory)."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.lora import LoraSpec, inject_lora
from lora_trainer.models.bundle import EPSILON, Family, ModelBundle
from lora_trainer.models.ldm_config import bundled_config

R, C = 8, 4  # rank, conv rank


def _meta_bundle(family: Family) -> ModelBundle:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_name = {Family.SD1: "sd15_unet", Family.SD2: "sd2_unet", Family.SDXL: "sdxl_unet"}[family]
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(bundled_config(unet_name))
        if family is Family.SD2:  # SD2 conditions on the penultimate layer: 23 layers, as kohya loads it
            tes = [CLIPTextModel(CLIPTextConfig(**{**bundled_config("open_clip_vit_h14"), "num_hidden_layers": 23}))]
        elif family is Family.SDXL:
            tes = [CLIPTextModel(CLIPTextConfig(**bundled_config("clip_vit_l14"))),
                   CLIPTextModelWithProjection(CLIPTextConfig(**bundled_config("open_clip_vit_bigg14")))]
        else:
            tes = [CLIPTextModel(CLIPTextConfig(**bundled_config("clip_vit_l14")))]
    return ModelBundle(family=family, prediction_type=EPSILON, unet=unet, vae=None, text_encoders=tes,
                       tokenizers=[])


@pytest.fixture(scope="module")
def sd15():
    return _meta_bundle(Family.SD1)


@pytest.fixture(scope="module")
def sdxl():
    return _meta_bundle(Family.SDXL)


def _shapes(bundle, spec):
    net = inject_lora(bundle, spec)
    try:
        sd = net.kohya_state_dict()
    finally:
        net.remove()
    modules = {k.split(".")[0] for k in sd}
    assert len(sd) == 3 * len(modules)  # alpha, lora_down.weight, lora_up.weight each
    for m in modules:
        assert sd[f"{m}.alpha"].dim() == 0 and sd[f"{m}.alpha"].dtype == torch.float16
    return {k[: -len(".lora_down.weight")]: (tuple(v.shape), tuple(sd[k.replace("lora_down", "lora_up")].shape))
            for k, v in sd.items() if k.endswith(".lora_down.weight")}


def _count(shapes, prefix):
    return sum(k.startswith(prefix) for k in shapes)


# (kohya module name, lora_down shape, lora_up shape), read off sd-scripts' LoRANetwork rules
SD15_EXPECTED = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (R, 768), (768, R)),
    ("lora_te_text_model_encoder_layers_11_self_attn_out_proj", (R, 768), (768, R)),
    ("lora_te_text_model_encoder_layers_5_mlp_fc1", (R, 768), (3072, R)),
    ("lora_te_text_model_encoder_layers_5_mlp_fc2", (R, 3072), (768, R)),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (R, 320), (320, R)),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", (R, 320, 1, 1), (320, R, 1, 1)),
    ("lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_k", (R, 768), (1280, R)),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v", (R, 768), (1280, R)),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj", (R, 1280), (10240, R)),
    ("lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2", (R, 5120), (1280, R)),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0", (R, 320), (320, R)),
    ("lora_unet_up_blocks_3_attentions_2_proj_out", (R, 320, 1, 1), (320, R, 1, 1)),
]
SD15_LOCON_EXPECTED = [
    ("lora_unet_down_blocks_0_resnets_0_conv1", (C, 320, 3, 3), (320, C, 1, 1)),
    ("lora_unet_down_blocks_0_resnets_0_time_emb_proj", (R, 1280), (320, R)),
    ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", (R, 320, 1, 1), (640, R, 1, 1)),
    ("lora_unet_down_blocks_2_downsamplers_0_conv", (C, 1280, 3, 3), (1280, C, 1, 1)),
    ("lora_unet_mid_block_resnets_1_conv2", (C, 1280, 3, 3), (1280, C, 1, 1)),
    ("lora_unet_up_blocks_0_upsamplers_0_conv", (C, 1280, 3, 3), (1280, C, 1, 1)),
    ("lora_unet_up_blocks_3_resnets_2_conv1", (C, 640, 3, 3), (320, C, 1, 1)),
]
SDXL_EXPECTED = [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (R, 768), (768, R)),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1", (R, 768), (3072, R)),
    ("lora_te1_text_model_encoder_layers_11_mlp_fc2", (R, 3072), (768, R)),
    ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", (R, 1280), (1280, R)),
    ("lora_te2_text_model_encoder_layers_31_self_attn_out_proj", (R, 1280), (1280, R)),
    ("lora_te2_text_model_encoder_layers_31_mlp_fc1", (R, 1280), (5120, R)),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", (R, 640), (640, R)),
    ("lora_unet_input_blocks_4_1_proj_in", (R, 640), (640, R)),
    ("lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_k", (R, 2048), (640, R)),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj", (R, 1280), (10240, R)),
    ("lora_unet_middle_block_1_transformer_blocks_9_ff_net_2", (R, 5120), (1280, R)),
    ("lora_unet_middle_block_1_proj_out", (R, 1280), (1280, R)),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0", (R, 1280), (1280, R)),
    ("lora_unet_output_blocks_2_1_transformer_blocks_9_attn2_to_v", (R, 2048), (1280, R)),
    ("lora_unet_output_blocks_5_1_proj_out", (R, 640), (640, R)),
]
SDXL_LOCON_EXPECTED = [
    ("lora_unet_input_blocks_1_0_in_layers_2", (C, 320, 3, 3), (320, C, 1, 1)),
    ("lora_unet_input_blocks_1_0_emb_layers_1", (R, 1280), (320, R)),
    ("lora_unet_input_blocks_1_0_out_layers_3", (C, 320, 3, 3), (320, C, 1, 1)),
    ("lora_unet_input_blocks_3_0_op", (C, 320, 3, 3), (320, C, 1, 1)),
    ("lora_unet_input_blocks_4_0_skip_connection", (R, 320, 1, 1), (640, R, 1, 1)),
    ("lora_unet_input_blocks_6_0_op", (C, 640, 3, 3), (640, C, 1, 1)),
    ("lora_unet_middle_block_2_out_layers_3", (C, 1280, 3, 3), (1280, C, 1, 1)),
    ("lora_unet_output_blocks_2_2_conv", (C, 1280, 3, 3), (1280, C, 1, 1)),
    ("lora_unet_output_blocks_5_2_conv", (C, 640, 3, 3), (640, C, 1, 1)),
    ("lora_unet_output_blocks_8_0_skip_connection", (R, 640, 1, 1), (320, R, 1, 1)),
]


def test_sd15_names_counts_shapes(sd15):
    shapes = _shapes(sd15, LoraSpec(rank=R, alpha=4))
    assert _count(shapes, "lora_te_") == 72  # 12 layers x (q, k, v, out, fc1, fc2)
    assert _count(shapes, "lora_unet_") == 192  # 16 transformers x (8 attn + 2 ff + proj_in/out)
    assert len(shapes) == 264
    for name, down, up in SD15_EXPECTED:
        assert shapes[name] == (down, up), name
    # 16 transformer blocks: down 0-2 x2, mid, up 1-3 x3
    assert {k for k in shapes if k.endswith("attn1_to_q")} == {
        *(f"lora_unet_down_blocks_{i}_attentions_{j}_transformer_blocks_0_attn1_to_q" for i in range(3) for j in range(2)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
        *(f"lora_unet_up_blocks_{i}_attentions_{j}_transformer_blocks_0_attn1_to_q" for i in (1, 2, 3) for j in range(3)),
    }


def test_sd15_locon_adds_resnet_and_sampler_modules(sd15):
    shapes = _shapes(sd15, LoraSpec(rank=R, alpha=4, conv_rank=C, conv_alpha=1, train_text_encoder=False))
    assert _count(shapes, "lora_te") == 0
    # 22 resnets x (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 down- + 3 upsamplers
    assert _count(shapes, "lora_unet_") == 192 + 86
    assert sum(len(d) == 4 and d[2:] == (3, 3) for d, _ in shapes.values()) == 22 * 2 + 6
    for name, down, up in SD15_LOCON_EXPECTED:
        assert shapes[name] == (down, up), name


def test_sdxl_names_counts_shapes(sdxl):
    shapes = _shapes(sdxl, LoraSpec(rank=R, alpha=4))
    assert _count(shapes, "lora_te1_") == 72  # CLIP-L, 12 layers
    assert _count(shapes, "lora_te2_") == 192  # OpenCLIP-bigG, 32 layers
    assert _count(shapes, "lora_te_") == 0
    assert _count(shapes, "lora_unet_") == 722  # 70 transformer blocks x 10 + 11 x (proj_in, proj_out)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block_" in k for k in shapes)
    for name, down, up in SDXL_EXPECTED:
        assert shapes[name] == (down, up), name


def test_sdxl_locon_adds_sgm_named_resnet_and_sampler_modules(sdxl):
    shapes = _shapes(sdxl, LoraSpec(rank=R, alpha=4, conv_rank=C, train_text_encoder=False))
    # 17 resnets x (in_layers_2, out_layers_3, emb_layers_1) + 11 skip_connections + 2 ops + 2 upsample convs
    assert _count(shapes, "lora_unet_") == 722 + 66
    assert sum(len(d) == 4 and d[2:] == (3, 3) for d, _ in shapes.values()) == 17 * 2 + 4
    for name, down, up in SDXL_LOCON_EXPECTED:
        assert shapes[name] == (down, up), name


def test_sd2_names_counts_shapes():
    shapes = _shapes(_meta_bundle(Family.SD2), LoraSpec(rank=R, alpha=4))
    assert _count(shapes, "lora_te_") == 23 * 6 and "lora_te_text_model_encoder_layers_22_mlp_fc2" in shapes
    assert _count(shapes, "lora_unet_") == 192
    assert shapes["lora_unet_down_blocks_0_attentions_0_proj_in"] == ((R, 320), (320, R))  # linear proj
    assert shapes["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"] == ((R, 1024), (1280, R))
    assert shapes["lora_te_text_model_encoder_layers_0_mlp_fc1"] == ((R, 1024), (4096, R))
