"""Files we cannot train on: each gets one clear UnsupportedModelError sentence, no traceback text."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from lora_trainer.errors import LoraTrainerError, UnsupportedModelError
from lora_trainer.models.loader import load_model
from lora_trainer.models.tiny import write_tiny_checkpoint

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I64": 8}


def fake_safetensors(path, tensors: dict[str, tuple[str, tuple[int, ...]]], metadata=None):
    """A valid safetensors file from names, dtypes and shapes alone (zeros), even for dtypes this
    torch build cannot hold (fp8); it is what quantised and foreign checkpoints look like."""
    header, offset = {}, 0
    for key, (dtype, shape) in tensors.items():
        n = _BYTES[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


SD1_MIN = {  # enough keys for detection: UNet, VAE, CLIP-L
    "model.diffusion_model.input_blocks.0.0.weight": ("F16", (8, 4, 3, 3)),
    "first_stage_model.encoder.conv_in.weight": ("F16", (8, 3, 3, 3)),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": ("F16", (8,)),
}


def _message(path) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        load_model(path)
    msg = str(info.value)
    assert isinstance(info.value, LoraTrainerError)
    assert "Traceback" not in msg and "\n" not in msg
    assert msg.rstrip().endswith(".")
    return msg


FOREIGN = {
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": ("F16", (4, 32)),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": ("F16", (32, 4)),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ("F16", ())}, "LoRA/LyCORIS network"),
    "loha": ({"lora_unet_input_blocks_1_1_proj_in.hada_w1_a": ("F16", (32, 4))}, "LoRA/LyCORIS network"),
    "peft-lora": ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": ("F16", (4, 32))},
                  "LoRA/LyCORIS network"),
    "embedding": ({"emb_params": ("F32", (2, 768))}, "textual-inversion embedding"),
    "sdxl-embedding": ({"clip_l": ("F32", (2, 768)), "clip_g": ("F32", (2, 1280))}, "textual-inversion embedding"),
    "vae": ({"encoder.conv_in.weight": ("F16", (128, 3, 3, 3)), "decoder.conv_out.weight": ("F16", (3, 128, 3, 3))},
            "VAE alone"),
    "sd3": ({"model.diffusion_model.x_embedder.proj.weight": ("F16", (1536, 16, 2, 2)),
             "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": ("F16", (4608, 1536))},
            "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.qkv.weight": ("BF16", (9216, 3072)),
              "img_in.weight": ("BF16", (3072, 64))}, "Flux"),
    "flux-ldm-prefix": ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": ("BF16", (9216, 3072))},
                        "Flux"),
    "refiner": ({"model.diffusion_model.input_blocks.0.0.weight": ("F16", (384, 4, 3, 3)),
                 "conditioner.embedders.0.model.ln_final.weight": ("F16", (1280,)),
                 "first_stage_model.encoder.conv_in.weight": ("F16", (128, 3, 3, 3))}, "SDXL refiner"),
    "inpainting": ({**SD1_MIN, "model.diffusion_model.input_blocks.0.0.weight": ("F16", (8, 9, 3, 3))},
                   "inpainting model"),
    "pix2pix": ({**SD1_MIN, "model.diffusion_model.input_blocks.0.0.weight": ("F16", (8, 8, 3, 3))},
                "instruct-pix2pix model"),
    "fp8": ({**SD1_MIN, "model.diffusion_model.input_blocks.1.1.proj_in.weight": ("F8_E4M3", (8, 8))},
            "quantised"),
    "nf4": ({**SD1_MIN, "model.diffusion_model.input_blocks.1.1.proj_in.weight": ("U8", (32, 1)),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight.absmax": ("F32", (1,)),
             "model.diffusion_model.input_blocks.1.1.proj_in.weight.quant_map": ("F32", (16,))}, "quantised"),
    "controlnet": ({"control_model.input_hint_block.0.weight": ("F16", (16, 3, 3, 3))}, "ControlNet"),
    "unet-only": ({"model.diffusion_model.input_blocks.0.0.weight": ("F16", (8, 4, 3, 3))}, "no text encoder"),
    "no-vae": ({k: v for k, v in SD1_MIN.items() if not k.startswith("first_stage")}, "no VAE"),
    "diffusers-unet": ({"down_blocks.0.resnets.0.conv1.weight": ("F16", (8, 8, 3, 3))},
                       "single diffusers-format component"),
    "unrelated": ({"fc.weight": ("F32", (2, 2))}, "not a Stable Diffusion checkpoint"),
    "empty": ({}, "empty file"),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_files_are_named(tmp_path, kind):
    tensors, expected = FOREIGN[kind]
    path = fake_safetensors(tmp_path / f"{kind}.safetensors", tensors)
    msg = _message(path)
    assert expected in msg and path.name in msg


def test_missing_file(tmp_path):
    assert "does not exist" in _message(tmp_path / "nope.safetensors")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    return (write_tiny_checkpoint(folder, "sd1", fmt="safetensors"),
            write_tiny_checkpoint(folder, "sd1", fmt="ckpt"))


@pytest.mark.parametrize("index", [0, 1], ids=["safetensors", "ckpt"])
def test_truncated_checkpoint(tmp_path, tiny_files, index):
    src = tiny_files[index]
    path = tmp_path / src.name
    path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    assert "truncated" in _message(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_not_a_model_file(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my prompts, not a model\n" * 10)
    assert "not a readable" in _message(path)


def test_other_extension(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert "not a checkpoint file" in _message(path)


def test_gguf(tmp_path):
    path = tmp_path / "flux-q4.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    assert "GGUF" in _message(path)


class NotWeights:  # stands for the pytorch_lightning callbacks some old .ckpt files pickle
    pass


def test_ckpt_with_python_objects_is_not_unpickled(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": NotWeights()}, path)
    assert "Python objects" in _message(path)


def test_embedding_pt_file(tmp_path):
    path = tmp_path / "style.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "style"}, path)
    assert "textual-inversion embedding" in _message(path)


def test_tiny_checkpoint_without_its_yaml_says_what_to_do(tmp_path, tiny_files):
    path = tmp_path / "tiny-sd1.safetensors"
    path.write_bytes(tiny_files[0].read_bytes())  # no .yaml beside it: the SD1.5 config does not fit
    msg = _message(path)
    assert "expects" in msg and ".yaml" in msg


def test_yaml_for_another_family_is_refused(tmp_path, tiny_files):
    sdxl = write_tiny_checkpoint(tmp_path, "sdxl")
    path = tmp_path / "mixed.safetensors"
    path.write_bytes(tiny_files[0].read_bytes())
    (tmp_path / "mixed.yaml").write_text(sdxl.with_suffix(".yaml").read_text())
    assert "config" in _message(path)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "stuff").mkdir()
    assert "not a diffusers model" in _message(tmp_path / "stuff")
    flux = tmp_path / "flux-dev"
    (flux / "transformer").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "FluxTransformer2DModel"]}))
    msg = _message(flux)  # a FluxPipeline folder without weights (or diffusers < 0.30: Flux refused)
    assert "Flux" in msg and ("no .safetensors weights in transformer/" in msg or "diffusers 0.30" in msg)
