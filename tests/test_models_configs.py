"""Bundled full-size configs and A1111 yaml -> diffusers configs, checked by parameter counts."""

from __future__ import annotations

import pytest

from lora_trainer.models import Family
from lora_trainer.models.ldm_config import ModelConfig, unet_config_from_ldm, unet_params_to_ldm
from lora_trainer.models.loader import meta_modules

# Published sizes: SD1.5 UNet 859.52M, SD2 865.91M, SDXL 2567.46M, VAE 83.65M, CLIP-L 123.06M,
# SD2's OpenCLIP-H (23 of 24 layers) 340.39M, SDXL's OpenCLIP-bigG with projection 694.66M.
COUNTS = {
    Family.SD1: {"unet": 859_520_964, "vae": 83_653_863, "te1": 123_060_480},
    Family.SD2: {"unet": 865_910_724, "vae": 83_653_863, "te1": 340_387_840},
    Family.SDXL: {"unet": 2_567_463_684, "vae": 83_653_863, "te1": 123_060_480, "te2": 694_659_840},
}

_VAE_DD = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
_LDM_COMMON = {"linear_start": 0.00085, "linear_end": 0.0120, "num_timesteps_cond": 1, "timesteps": 1000,
               "image_size": 64, "channels": 4, "conditioning_key": "crossattn", "scale_factor": 0.18215,
               "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                      "params": {"embed_dim": 4, "ddconfig": _VAE_DD}}}
# The unet/cond parts of the WebUI's configs/v1-inference.yaml, v2-inference-v.yaml and sd_xl_base.yaml.
V1 = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    **_LDM_COMMON,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True,
        "legacy": False}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}
V2V = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    **_LDM_COMMON, "parameterization": "v",
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
        "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                          "params": {"freeze": True, "layer": "penultimate"}}}}}
XL = {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
    "scale_factor": 0.13025, "disable_first_stage_autocast": True,
    "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
        "num_idx": 1000,
        "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
        "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
    "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
        "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
        "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
        "transformer_depth": [1, 2, 10], "context_dim": 2048, "spatial_transformer_attn_type": "softmax-xformers",
        "legacy": False}},
    "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 11}},
        {"is_trainable": False, "input_key": "txt",
         "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                    "layer": "penultimate", "always_return_pooled": True, "legacy": False}},
        *({"is_trainable": False, "input_key": k, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
           "params": {"outdim": 256}} for k in ("original_size_as_tuple", "crop_coords_top_left",
                                                 "target_size_as_tuple"))]}},
    "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                           "params": {"embed_dim": 4, "ddconfig": {"attn_type": "vanilla", **_VAE_DD}}}}}}


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path, monkeypatch):
    """openai/clip-vit-large-patch14 must come from the bundled config, not a cache on this machine."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _counts(config: ModelConfig) -> dict[str, int]:
    modules = meta_modules(config)
    assert all(p.is_meta for m in modules.values() for p in m.parameters())
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


@pytest.mark.parametrize("family", list(COUNTS))  # UNet families; Flux/Chroma: test_flux_*
def test_bundled_full_size_configs_build_on_meta_with_published_sizes(family):
    assert _counts(ModelConfig.bundled(family)) == COUNTS[family]


@pytest.mark.parametrize("family, data, prediction", [
    (Family.SD1, V1, "epsilon"), (Family.SD2, V2V, "v_prediction"), (Family.SDXL, XL, "epsilon")])
def test_webui_yaml_gives_the_same_model_as_the_bundled_config(family, data, prediction):
    config = ModelConfig.from_yaml(data, family)
    assert config.prediction_type == prediction
    assert _counts(config) == COUNTS[family]
    bundled = ModelConfig.bundled(family, prediction)
    keys = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
            "cross_attention_dim", "use_linear_projection", "projection_class_embeddings_input_dim",
            "addition_time_embed_dim")
    assert {k: config.unet.get(k) for k in keys} == {k: bundled.unet.get(k) for k in keys}
    assert config.scaling_factor == bundled.scaling_factor
    assert config.schedule == bundled.schedule
    assert [t.penultimate for t in config.text_encoders] == [t.penultimate for t in bundled.text_encoders]


@pytest.mark.parametrize("family", list(COUNTS))  # UNet families; Flux/Chroma: test_flux_*
def test_unet_config_survives_ldm_params_round_trip(family):
    unet = ModelConfig.bundled(family).unet
    back = unet_config_from_ldm(unet_params_to_ldm(unet, family), unet.get("addition_time_embed_dim"))
    for key in ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
                "use_linear_projection"):
        assert list(back[key]) == list(unet[key]) if isinstance(unet[key], list) else back[key] == unet[key]
