"""Flux files users pass by mistake get one sentence saying what they are (library and CLI exit 2);
the parts of a Flux model are found beside it or named by the user."""



from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from flux_support import requires_flux_diffusers
from safetensors.torch import save_file
from train_support import make_dataset

from lora_trainer.errors import UnsupportedModelError
from lora_trainer.models import Family
from lora_trainer.models.flux import FluxTransformer
from lora_trainer.models.flux.tiny import tiny_params, write_tiny_flux_checkpoint
from lora_trainer.models.loader import check_model_header, load_model


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """models/unet/tiny-flux-dev.safetensors with clip_l, t5xxl and ae beside it (ComfyUI's flat layout)."""
    folder = tmp_path_factory.mktemp("flux")
    write_tiny_flux_checkpoint(folder, "dev", seed=0)
    return folder


def _transformer_sd(**changes) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return FluxTransformer(tiny_params().replace(**changes)).state_dict()


def _one_sentence(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.endswith(".") and text.count("; ") >= 1, text
    return text


def _refusal(path, **kwargs) -> str:
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(path, **kwargs)
    return _one_sentence(exc)


@requires_flux_diffusers
@pytest.mark.parametrize("part, words", [("t5xxl", ("T5-XXL text encoder", "--t5")),
                                         ("clip_l", ("CLIP-L text encoder", "--clip-l")),
                                         ("ae", ("Flux VAE", "--vae"))])
def test_a_part_passed_as_the_model(flux_dir, part, words):
    text = _refusal(flux_dir / f"{part}.safetensors")
    assert all(w in text for w in words) and "not a Flux model" in text


@requires_flux_diffusers
def test_flux_like_files_we_cannot_train(tmp_path):
    cases = {
        "lora.safetensors": ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64),
                              "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(192, 4)},
                             "a LoRA for Flux, not a model"),
        "flux2.safetensors": ({"double_stream_modulation_img.lin.weight": torch.zeros(2, 2),
                               "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, "a FLUX.2 model"),
        "chroma-part.safetensors": ({"distilled_guidance_layer.in_proj.weight": torch.zeros(2, 2),
                                     "double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)},
                                    "looks like a Flux transformer but lacks weights"),
        "fill.safetensors": (_transformer_sd(in_channels=384), "FLUX.1 Fill"),
        "canny.safetensors": (_transformer_sd(in_channels=128), "Canny or Depth"),
        "flux1-kontext-dev.safetensors": (_transformer_sd(), "FLUX.1 Kontext"),
        "nf4.safetensors": ({**_transformer_sd(), "double_blocks.0.img_attn.qkv.weight.absmax": torch.zeros(4)},
                            "NF4/int8"),
    }
    for name, (tensors, words) in cases.items():
        save_file(tensors, str(tmp_path / name))
        text = _refusal(tmp_path / name)
        assert words in text and name in text, text


@requires_flux_diffusers
def test_truncated_flux_file(tmp_path, flux_dir):
    bad = tmp_path / "flux1-dev.safetensors"
    data = (flux_dir / "tiny-flux-dev.safetensors").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    assert "is truncated" in _refusal(bad)


@requires_flux_diffusers
def test_missing_text_encoders_name_where_we_looked(tmp_path):
    model = write_tiny_flux_checkpoint(tmp_path / "models" / "unet", "dev", parts=False)
    (tmp_path / "models" / "VAE").mkdir()
    shutil.copy(write_tiny_flux_checkpoint(tmp_path / "other", "dev").parent / "ae.safetensors",
                tmp_path / "models" / "VAE" / "ae.safetensors")
    text = _refusal(model)
    assert "CLIP-L text encoder and T5-XXL text encoder" in text and "--clip-l and --t5" in text
    assert str(tmp_path / "models" / "unet") in text and str(tmp_path / "models" / "VAE") in text
    with pytest.raises(UnsupportedModelError, match="--clip-l and --t5"):
        check_model_header(model)  # the engine's check before any heavy work says the same


@requires_flux_diffusers
def test_parts_found_in_webui_folders(tmp_path, flux_dir):
    """Forge keeps text encoders in models/text_encoder and the VAE in models/VAE."""
    models = tmp_path / "models"
    for sub, name in (("Stable-diffusion/Flux", "tiny-flux-dev.safetensors"), ("text_encoder", "clip_l.safetensors"),
                      ("text_encoder", "t5xxl.safetensors"), ("VAE", "ae.safetensors")):
        (models / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(flux_dir / name, models / sub / name)
    (models / "text_encoder" / "t5xxl_fp8_e4m3fn.safetensors").write_bytes(b"not chosen: full precision first")
    bundle = load_model(models / "Stable-diffusion" / "Flux" / "tiny-flux-dev.safetensors")
    assert bundle.family is Family.FLUX1
    assert bundle.component_sources == {"clip_l": str(models / "text_encoder" / "clip_l.safetensors"),
                                        "t5": str(models / "text_encoder" / "t5xxl.safetensors"),
                                        "vae": str(models / "VAE" / "ae.safetensors")}


@requires_flux_diffusers
def test_wrong_file_for_a_part(tmp_path, flux_dir, tiny_sd1_vae):
    model = flux_dir / "tiny-flux-dev.safetensors"
    text = _refusal(model, clip_l=flux_dir / "t5xxl.safetensors")
    assert "given as a CLIP-L text encoder (--clip-l), is a T5-XXL text encoder" in text
    text = _refusal(model, vae=tiny_sd1_vae)
    assert "4 latent channels" in text
    text = _refusal(model, t5=tmp_path / "nope.safetensors")
    assert "does not exist" in text


@pytest.fixture
def tiny_sd1_vae(tmp_path) -> Path:
    from lora_trainer.models.tiny import build_tiny_bundle

    path = tmp_path / "sd_vae.safetensors"
    save_file({k: v.contiguous() for k, v in build_tiny_bundle("sd1").vae.state_dict().items()}, str(path))
    return path


def test_sd_model_with_flux_options(tmp_path):
    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path, "sd1")
    assert "--clip-l cannot be used" in _refusal(ckpt, clip_l=ckpt)


@pytest.mark.skipif(requires_flux_diffusers.args[0] is False, reason="only where diffusers is older than 0.30")
def test_old_diffusers_refuses_flux_in_one_sentence(tmp_path):
    save_file(_transformer_sd(), str(tmp_path / "flux1-dev.safetensors"))
    text = _refusal(tmp_path / "flux1-dev.safetensors")
    assert "Flux needs diffusers 0.30 or newer" in text


@requires_flux_diffusers
@pytest.mark.parametrize("case, words", [("t5-as-model", "T5-XXL text encoder"), ("truncated", "is truncated"),
                                         ("no-text-encoders", "--clip-l and --t5"),
                                         ("wrong-part", "is a T5-XXL text encoder; pass the right file with --clip-l")])
def test_cli_exit_2_one_line(tmp_path, flux_dir, capsys, case, words):
    from lora_trainer.cli import main

    data = make_dataset(tmp_path / "data", n=1)
    model, extra = flux_dir / "tiny-flux-dev.safetensors", []
    if case == "t5-as-model":
        model = flux_dir / "t5xxl.safetensors"
    elif case == "truncated":
        model = tmp_path / "flux1-dev.safetensors"
        data_bytes = (flux_dir / "tiny-flux-dev.safetensors").read_bytes()
        model.write_bytes(data_bytes[: len(data_bytes) - 100])
    elif case == "no-text-encoders":
        model = write_tiny_flux_checkpoint(tmp_path / "alone", "dev", parts=False)
        extra = ["--vae", str(flux_dir / "ae.safetensors")]
    else:
        extra = ["--clip-l", str(flux_dir / "t5xxl.safetensors")]
    rc = main(["train", "--model", str(model), "--data", str(data), "--name", "x", "--out", str(tmp_path / "o"),
               "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and words in err, err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
