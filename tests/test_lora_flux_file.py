"""Flux LoRA files as kohya sd-scripts writes them: ss_*/modelspec.* metadata, sshs_* hashes, the
family read back from metadata or keys, reloading for further training, and the WebUI sidecar json."""

from __future__ import annotations

import json

import pytest
import torch
from flux_support import requires_flux_diffusers

from lora_trainer.errors import ConfigError
from lora_trainer.lora import (
    LoraFileError,
    LoraSpec,
    TrainingFacts,
    build_metadata,
    inject_lora,
    load_kohya_file,
    precalculate_safetensors_hashes,
    read_lora_info,
)
from lora_trainer.models import FLOW, Family
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
from lora_trainer.models.tiny import build_tiny_bundle

pytestmark = requires_flux_diffusers  # the tiny Flux VAE needs diffusers >= 0.30


@pytest.fixture(scope="module")
def dev():
    return build_tiny_flux_bundle("dev", seed=0, depth=1, depth_single=1)


def _save(bundle, tmp_path, spec, name="flux_lora"):
    net = inject_lora(bundle, spec, seed=0)
    try:
        path = net.save_kohya(tmp_path / f"{name}.safetensors",
                              build_metadata(bundle, spec, TrainingFacts(output_name=name, trigger_phrase="sks")))
    finally:
        net.remove()
    return path


def test_kohya_flux_metadata(tmp_path, dev):
    path = _save(dev, tmp_path, LoraSpec(rank=4, alpha=2))
    tensors, md = load_kohya_file(path)
    assert md["ss_network_module"] == "networks.lora_flux"
    assert md["ss_base_model_version"] == "flux1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert md["modelspec.resolution"] == "1024x1024" and md["ss_resolution"] == "(1024, 1024)"
    assert "modelspec.prediction_type" not in md and "ss_v_parameterization" not in md  # as kohya for Flux
    assert "ss_network_args" not in md and md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2.0"
    assert md["modelspec.trigger_phrase"] == "sks" and md["modelspec.sai_model_spec"] == "1.0.1"
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == precalculate_safetensors_hashes(tensors, md)
    assert all(v.dtype == torch.float16 for v in tensors.values())
    assert sorted(k for k in tensors if k.startswith("lora_unet_double_blocks_0_img_attn_qkv")) == [
        "lora_unet_double_blocks_0_img_attn_qkv.alpha", "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]


def test_schnell_and_t5_metadata(tmp_path):
    schnell = build_tiny_flux_bundle("schnell", seed=1, depth=1, depth_single=1)
    path = _save(schnell, tmp_path, LoraSpec(rank=4, alpha=4, train_t5=True))
    tensors, md = load_kohya_file(path)
    assert md["modelspec.architecture"] == "flux-1-schnell/lora"
    assert json.loads(md["ss_network_args"]) == {"train_t5xxl": "True"}
    assert any(k.startswith("lora_te3_encoder_block_0_layer_0_SelfAttention_q.") for k in tensors)


def test_family_read_back(tmp_path, dev):
    path = _save(dev, tmp_path, LoraSpec(rank=4, alpha=2))
    info = read_lora_info(path)
    assert (info.family, info.prediction_type, info.base_model_version) == (Family.FLUX1, FLOW, "flux1")
    assert (info.rank, info.alpha, info.has_unet, info.has_text_encoder) == (4, 2.0, True, True)
    # without any metadata (other trainers strip it) the key names tell
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_kohya_file(path)[0], str(bare))
    assert read_lora_info(bare).family is Family.FLUX1


def test_reload_for_further_training(tmp_path, dev):
    path = _save(dev, tmp_path, LoraSpec(rank=4, alpha=2, train_t5=True))
    tensors = load_kohya_file(path)[0]
    spec = LoraSpec.from_kohya_state_dict(tensors)
    assert (spec.rank, spec.alpha, spec.train_unet, spec.train_text_encoder, spec.train_t5) == (4, 2.0, True, True, True)
    net = inject_lora(dev, spec)
    try:
        report = net.load_file(path, strict=True)
        assert report.complete and len(report.loaded) == len(net.targets)
    finally:
        net.remove()


def test_family_mismatch_is_refused(tmp_path, dev):
    path = _save(dev, tmp_path, LoraSpec(rank=4, alpha=2, train_text_encoder=False))
    sd1 = build_tiny_bundle("sd1")
    net = inject_lora(sd1, LoraSpec(rank=4, alpha=4))
    try:
        with pytest.raises(LoraFileError, match="The LoRA is for Flux but the model is SD1"):
            net.load_file(path)
    finally:
        net.remove()


def test_t5_alone_is_a_valid_spec_and_nothing_is_not():
    LoraSpec(rank=4, alpha=4, train_unet=False, train_text_encoder=False, train_t5=True).validate()
    with pytest.raises(ConfigError):
        LoraSpec(rank=4, alpha=4, train_unet=False, train_text_encoder=False).validate()


def test_sidecar_json_names_flux(tmp_path, dev):
    from lora_trainer.train import write_user_metadata

    lora = _save(dev, tmp_path, LoraSpec(rank=4, alpha=2))
    side = write_user_metadata(lora, activation_text="sks", sd_version=dev.family.label)
    assert json.loads(side.read_text(encoding="utf-8"))["sd version"] == "Flux"
