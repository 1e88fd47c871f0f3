"""kohya LoRA files: metadata, hashes, atomic writes, and the family reader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from lora_trainer.lora import (
    LoraFileError,
    LoraSpec,
    TrainingFacts,
    build_metadata,
    list_loras,
    read_lora_info,
    save_kohya,
)
from lora_trainer.lora.metadata import architecture
from lora_trainer.models.bundle import EPSILON, V_PREDICTION, Family, base_model_version


def _model(family: Family, prediction: str = EPSILON, name: str = "base", model_hash: str | None = None):
    """build_metadata needs only these facts of a ModelBundle."""
    return SimpleNamespace(family=family, prediction_type=prediction, name=name, model_hash=model_hash,
                           base_model_version=base_model_version(family, prediction))


def _tensors(te_prefix: str = "lora_te", ctx: int = 768, big: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 150_000 if big else 16  # big: the file passes 1 MiB, so the legacy hash reads real bytes
    return {
        f"{te_prefix}_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0, dtype=torch.float16),
        f"{te_prefix}_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
            torch.randn(4, 768, generator=g).half(),
        f"{te_prefix}_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
            torch.randn(768, 4, generator=g).half(),
        "lora_unet_x_attn2_to_k.alpha": torch.tensor(2.0, dtype=torch.float16),
        "lora_unet_x_attn2_to_k.lora_down.weight": torch.randn(4, ctx, generator=g).half(),
        "lora_unet_x_attn2_to_k.lora_up.weight": torch.randn(n, 4, generator=g).half(),
    }


FACTS = TrainingFacts(
    output_name="my_style", training_started_at=1700000000.5, training_finished_at=1700003600.25,
    session_id=42, steps=300, epoch=3, num_epochs=3, max_train_steps=300, num_train_images=100,
    batch_size=2, learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, lr_scheduler="cosine",
    optimizer="torch.optim.adamw.AdamW(weight_decay=0.01)", mixed_precision="fp16", seed=1234,
    clip_skip=2, noise_offset=0.05, min_snr_gamma=5.0, resolution=(512, 512), keep_tokens=1,
    shuffle_caption=True, dataset_dirs={"10_mystyle": {"n_repeats": 10, "img_count": 10}},
    tag_frequency={"10_mystyle": {"mystyle": 10, "1girl": 7}}, training_comment="hello",
    trigger_phrase="mystyle", sd_model_hash="abcd1234",
)


def test_metadata_is_kohya_shaped_and_all_strings():
    md = build_metadata(_model(Family.SD1, model_hash="f" * 64), LoraSpec(rank=16, alpha=8), FACTS)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    expected = {
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_network_module": "networks.lora",
        "ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_output_name": "my_style",
        "ss_resolution": "(512, 512)", "ss_clip_skip": "2", "ss_sd_model_name": "base",
        "ss_num_train_images": "100", "ss_training_started_at": "1700000000.5",
        "ss_training_finished_at": "1700003600.25", "ss_learning_rate": "0.0001",
        "ss_text_encoder_lr": "5e-05", "ss_unet_lr": "0.0001", "ss_num_epochs": "3", "ss_steps": "300",
        "ss_epoch": "3", "ss_seed": "1234", "ss_mixed_precision": "fp16",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)", "ss_lr_scheduler": "cosine",
        "ss_noise_offset": "0.05", "ss_min_snr_gamma": "5.0", "ss_keep_tokens": "1",
        "ss_shuffle_caption": "True", "ss_session_id": "42", "ss_training_comment": "hello",
        "ss_new_sd_model_hash": "f" * 64, "ss_sd_model_hash": "abcd1234", "ss_v_parameterization": "False",
        "ss_network_dropout": "None",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "my_style",
        "modelspec.resolution": "512x512", "modelspec.trigger_phrase": "mystyle",
        "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "2",
    }
    assert {k: md.get(k) for k in expected} == expected
    assert json.loads(md["ss_tag_frequency"]) == {"10_mystyle": {"mystyle": 10, "1girl": 7}}
    assert json.loads(md["ss_dataset_dirs"]) == {"10_mystyle": {"n_repeats": 10, "img_count": 10}}
    assert "ss_network_args" not in md  # kohya writes it only when network args are given
    assert md["modelspec.date"].startswith("2023-11-1")  # ISO date of the finish time (local clock)
    assert md["modelspec.implementation_version"].startswith("lora-trainer/")


@pytest.mark.parametrize("family,prediction,version,arch,impl,reso", [
    (Family.SD1, EPSILON, "sd_v1", "stable-diffusion-v1/lora", "diffusers", "512x512"),
    (Family.SD2, EPSILON, "sd_v2", "stable-diffusion-v2-512/lora", "diffusers", "512x512"),
    (Family.SD2, V_PREDICTION, "sd_v2_v", "stable-diffusion-v2-768-v/lora", "diffusers", "768x768"),
    (Family.SDXL, EPSILON, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models", "1024x1024"),
])
def test_metadata_per_family(family, prediction, version, arch, impl, reso):
    md = build_metadata(_model(family, prediction), LoraSpec(rank=8, alpha=None, conv_rank=4, conv_alpha=1),
                        TrainingFacts(output_name="x"))
    assert md["ss_base_model_version"] == version
    assert md["ss_v2"] == str(family is Family.SD2)
    assert md["ss_v_parameterization"] == str(prediction == V_PREDICTION)
    assert md["modelspec.architecture"] == arch == architecture(family, prediction)
    assert md["modelspec.implementation"] == impl
    assert md["modelspec.resolution"] == reso  # the family's native size when none is given
    assert md["modelspec.prediction_type"] == ("v" if prediction == V_PREDICTION else "epsilon")
    assert md["ss_network_alpha"] == "8.0"  # alpha None = rank, as kohya
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1", "dropout": None}
    assert "modelspec.trigger_phrase" not in md and "modelspec.encoder_layer" not in md


def _independent_hashes(tensors, metadata):
    """Re-derive kohya's sshs_* hashes without our helpers: sha256 of the data section of the
    file holding only ss_* metadata, and 64 KiB at offset 1 MiB of that same file."""
    blob = st_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + n:]).hexdigest(), hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_save_adds_kohya_hashes_and_writes_tensors_as_given(tmp_path):
    tensors = _tensors(big=True)
    md = build_metadata(_model(Family.SD1), LoraSpec(rank=4, alpha=2), FACTS)
    path = save_kohya(tmp_path / "sub" / "style.safetensors", tensors, md)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert all(torch.equal(stored[k], tensors[k]) and stored[k].dtype == torch.float16 for k in tensors)
    assert {k: meta[k] for k in md} == md
    model_hash, legacy_hash = _independent_hashes(tensors, md)
    assert meta["sshs_model_hash"] == model_hash and meta["sshs_legacy_hash"] == legacy_hash
    # the data section of the file itself hashes the same (metadata edits do not change it)
    raw = Path(path).read_bytes()
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest() == model_hash
    assert legacy_hash != hashlib.sha256(b"").hexdigest()[:8]  # it really read bytes past 1 MiB
    assert os.listdir(tmp_path / "sub") == ["style.safetensors"]


def test_save_rejects_non_string_metadata(tmp_path):
    with pytest.raises(TypeError):
        save_kohya(tmp_path / "x.safetensors", _tensors(), {"ss_network_dim": 16})
    assert not os.listdir(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous version")
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(LoraFileError, match="Cannot write the LoRA file .*No space left.*choose a folder"):
        save_kohya(target, _tensors(), {})
    monkeypatch.setattr(os, "replace", real_replace)
    assert target.read_bytes() == b"previous version"  # old file intact
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # no temp file left behind

    # a folder that cannot be created (a file is in the way): clear error, nothing written
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(LoraFileError, match="Cannot write the LoRA file"):
        save_kohya(blocker / "lora.safetensors", _tensors(), {})
    assert sorted(os.listdir(tmp_path)) == ["blocker", "lora.safetensors"]


@pytest.mark.parametrize("family,prediction", [(Family.SD1, EPSILON), (Family.SD2, V_PREDICTION),
                                               (Family.SDXL, EPSILON)])
def test_reader_tells_family_from_metadata(tmp_path, family, prediction):
    md = build_metadata(_model(family, prediction), LoraSpec(rank=4, alpha=2), FACTS)
    path = save_kohya(tmp_path / "a.safetensors", _tensors(), md)
    info = read_lora_info(path)
    assert info.family is family and info.prediction_type == prediction
    assert info.base_model_version == md["ss_base_model_version"]
    assert (info.rank, info.alpha, info.conv_rank) == (4, 2.0, None)
    assert info.has_unet and info.has_text_encoder and info.num_modules == 2
    assert info.title == "my_style" and info.trigger_phrase == "mystyle"


@pytest.mark.parametrize("te_prefix,ctx,family", [("lora_te", 768, Family.SD1), ("lora_te", 1024, Family.SD2),
                                                  ("lora_te1", 2048, Family.SDXL)])
def test_reader_tells_family_from_keys_without_metadata(tmp_path, te_prefix, ctx, family):
    path = save_kohya(tmp_path / "a.safetensors", _tensors(te_prefix, ctx), {})
    info = read_lora_info(path)
    assert info.family is family and info.rank == 4 and info.alpha == 2.0


def test_reader_errors_are_user_errors(tmp_path):
    with pytest.raises(LoraFileError, match="does not exist"):
        read_lora_info(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(LoraFileError, match="cannot be read"):
        read_lora_info(bad)


def test_list_loras_reads_a_folder_and_skips_broken_files(tmp_path):
    save_kohya(tmp_path / "a.safetensors", _tensors(), build_metadata(_model(Family.SDXL), LoraSpec(4, 2), FACTS))
    save_kohya(tmp_path / "sub" / "b.safetensors", _tensors(ctx=1024), {})
    (tmp_path / "broken.safetensors").write_bytes(b"nope")
    infos = list_loras(tmp_path)
    assert [(Path(i.path).name, i.family) for i in infos] == [("a.safetensors", Family.SDXL),
                                                              ("b.safetensors", Family.SD2)]


def test_metadata_accepts_a_plain_dict_of_facts():
    md = build_metadata(_model(Family.SD1), LoraSpec(4, 2), {"output_name": "x", "trigger_phrase": "tok",
                                                             "training_finished_at": 1700000000.0})
    assert md["ss_output_name"] == "x" and md["modelspec.trigger_phrase"] == "tok"
    assert md["ss_training_finished_at"] == "1700000000.0"
    with pytest.raises(TypeError):
        build_metadata(_model(Family.SD1), LoraSpec(4, 2), {"no_such_fact": 1})


def test_metadata_names_and_hashes_the_checkpoint_file_like_kohya(tmp_path):
    ckpt = tmp_path / "my-model.safetensors"
    ckpt.write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    model = _model(Family.SD1, model_hash="a" * 64)
    model.source = str(ckpt)
    md = build_metadata(model, LoraSpec(4, 2), TrainingFacts())
    assert md["ss_sd_model_name"] == "my-model.safetensors"
    raw = ckpt.read_bytes()
    assert md["ss_sd_model_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert md["ss_new_sd_model_hash"] == "a" * 64
    model.source = "the WebUI's loaded model"
    md = build_metadata(model, LoraSpec(4, 2), TrainingFacts())
    assert md["ss_sd_model_name"] == "base" and "ss_sd_model_hash" not in md
