"""diffusers <-> LDM/SGM UNet names, checked against diffusers' own single-file converter."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.models.bundle import Family
from lora_trainer.models.tiny import build_tiny_bundle, unet_config
from lora_trainer.models.unet_keys import (
    to_diffusers_module_name,
    to_ldm_module_name,
    unet_layout,
    unet_state_dict_to_diffusers,
    unet_state_dict_to_ldm,
)

SD15_LDM = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                "attention_resolutions": [4, 2, 1], "transformer_depth": 1, "context_dim": 768}
SDXL_SGM = {"model_channels": 320, "channel_mult": [1, 2, 4], "num_res_blocks": 2,
                "attention_resolutions": [4, 2], "transformer_depth": [1, 2, 10], "context_dim": 2048}

SD1_PAIRS = [
    ("down_blocks.1.attentions.0", "input_blocks.4.1"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0", "middle_block.1"),
    ("mid_block.resnets.1", "middle_block.2"),
    ("up_blocks.0.resnets.2", "output_blocks.2.0"),
    ("up_blocks.1.upsamplers.0", "output_blocks.5.2"),
    ("up_blocks.0.upsamplers.0", "output_blocks.2.1"),  # level without attention
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("conv_out", "out.2"),
    ("down_blocks.0.resnets.0.norm1", "input_blocks.1.0.in_layers.0"),
    ("down_blocks.0.resnets.0.conv1.weight", "input_blocks.1.0.in_layers.2.weight"),
    ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.norm2", "input_blocks.4.0.out_layers.0"),
    ("down_blocks.1.resnets.0.conv2", "input_blocks.4.0.out_layers.3"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
     "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0"),
]

SDXL_PAIRS = [
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
    ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
    ("up_blocks.0.attentions.2", "output_blocks.2.1"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2", "output_blocks.8.0"),
]


@pytest.mark.parametrize("diffusers_name, ldm_name", SD1_PAIRS)
@pytest.mark.parametrize("config", [unet_config(Family.SD1), SD15_LDM], ids=["diffusers", "ldm"])
def test_sd1_names(diffusers_name, ldm_name, config):
    assert to_ldm_module_name(diffusers_name, config) == ldm_name
    assert to_diffusers_module_name(ldm_name, config) == diffusers_name


@pytest.mark.parametrize("diffusers_name, ldm_name", SDXL_PAIRS)
@pytest.mark.parametrize("config", [unet_config(Family.SDXL), SDXL_SGM], ids=["diffusers", "sgm"])
def test_sdxl_names(diffusers_name, ldm_name, config):
    assert to_ldm_module_name(diffusers_name, config) == ldm_name
    assert to_diffusers_module_name(ldm_name, config) == diffusers_name


def test_ldm_and_diffusers_configs_give_the_same_layout():
    assert unet_layout(unet_config(Family.SD1)) == unet_layout(SD15_LDM)
    assert unet_layout(unet_config(Family.SDXL)) == unet_layout(SDXL_SGM)


def test_unknown_name_raises_key_error():
    with pytest.raises(KeyError):
        to_ldm_module_name("down_blocks.9.resnets.0", unet_config(Family.SD1))
    with pytest.raises(KeyError):
        to_diffusers_module_name("input_blocks.4.1", unet_config(Family.SDXL) | {"down_block_types": (
            "DownBlock2D",) * 3})  # no attention anywhere: input_blocks.4.1 does not exist


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_state_dict_conversion_matches_diffusers_converter(family):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = build_tiny_bundle(family).unet
    sd = unet.state_dict()
    ldm = unet_state_dict_to_ldm(sd, unet.config, prefix="model.diffusion_model.")
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    # Independent implementation: diffusers' own LDM -> diffusers converter.
    reference = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(reference) == set(sd)
    for key, value in reference.items():
        assert torch.equal(value, sd[key]), key
    back = unet_state_dict_to_diffusers(ldm, unet.config, prefix="model.diffusion_model.")
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)  # renaming never copies
