"""The Chroma hand-off from Forge Neo's memory (webui/forge_flux.py with a `Chroma` engine) against the Neo-shaped
stand-in of tests/forge_flux_standins.py (`make_forge_chroma`: Neo's `Chroma` engine, T5 only, its
IntegratedChromaTransformer2DModel with torch RMSNorms and its approximator sizes as attributes).

Mocked, because Neo cannot run here: Neo's `modules`/`backend` (sd_models, memory manager, dequantisers) and the
Neo transformer's forward (ours, over Neo-named modules). Real: the hand-off, our ChromaTransformer, transformers'
T5, diffusers' VAE, the training engine and the kohya export. The real Neo runs in
tests/webui/test_neo_flux_integration.py (the Chroma case).
"""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
from bnb_support import HAS_BNB
from flux_support import inputs, requires_flux_diffusers
from forge_flux_standins import backend_modules, forge_tensors, install_forge_modules, make_forge_chroma

from lora_trainer.errors import UnsupportedModelError
from lora_trainer.models import Family
from lora_trainer.models.flux.chroma import ChromaParams, ChromaTransformer
from lora_trainer.webui import forge_flux
from lora_trainer.webui.common import tensor_fingerprint

pytestmark = requires_flux_diffusers

HAS_GGUF = importlib.util.find_spec("gguf") is not None
FORMATS = ["fp32", "bf16", "fp8_scaled",
           pytest.param("gguf", marks=pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed")),
           pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes has no 4-bit kernels here"))]
FORMAT_NAMES = {"fp32": "fp32", "bf16": "bf16", "fp8_scaled": "fp8_scaled", "gguf": "gguf Q8_0", "nf4": "nf4"}


@pytest.fixture
def forge_backend(monkeypatch):
    mods, calls = backend_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return SimpleNamespace(calls=calls)


def _handoff(sd_model, stats=None):
    return forge_flux.bundle_from_forge_flux(sd_model, device=torch.device("cpu"), dtype=torch.float32, stats=stats)


def _chroma_inputs(params: ChromaParams) -> dict[str, torch.Tensor]:
    x = inputs(params)
    x["txt_mask"] = torch.tensor([[1, 1, 1, 0, 0]])  # a 3-token caption padded to 5, as the family feeds it
    return x


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_chroma_transformer_computes_over_neos_stored_weights(forge_backend, fmt):
    """Our ChromaTransformer over Neo's weights (any storage) gives what the same modules give in Neo's layout;
    nothing of the transformer, the T5 or the VAE is copied."""
    sd_model, ref = make_forge_chroma(fmt, t5_fmt="fp8")
    stats = forge_flux.HandoffStats()
    bundle = _handoff(sd_model, stats)
    assert bundle.family is Family.CHROMA and bundle.variant == "" and isinstance(bundle.unet, ChromaTransformer)
    assert bundle.unet.params == ref.unet.params
    assert len(bundle.text_encoders) == 1 and len(bundle.tokenizers) == 1  # T5 only
    x = _chroma_inputs(ref.unet.params)
    with torch.no_grad():
        want = forge_flux.transformer_of(sd_model)(**x)
        got = bundle.unet(**x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # the same modules, over a copy of the weights
    assert set(stats.formats) == {"transformer", "T5"} and stats.formats["T5"] == {"fp8 e4m3fn": 14}
    assert bundle.weight_formats == {"unet": FORMAT_NAMES[fmt], "te3": "fp8 e4m3fn", "vae": "fp32"}
    assert stats.copied == 0 and stats.text() == "zero copy"
    approx = bundle.unet.distilled_guidance_layer.norms[0].scale
    theirs = forge_flux.transformer_of(sd_model).distilled_guidance_layer.norms[0].weight
    assert approx.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()


def test_forge_mains_chroma_layout_hands_off_the_same_model(forge_backend):
    """lllyasviel's Forge main holds Chroma with BFL's RMSNorms and the approximator's sizes in its config
    (`guidance_hidden_dim`), not as attributes: the hand-off reads the same model from it, zero copy."""
    sd_model, ref = make_forge_chroma("bf16", layout="main")
    stats = forge_flux.HandoffStats()
    bundle = _handoff(sd_model, stats)
    assert bundle.family is Family.CHROMA and bundle.unet.params == ref.unet.params
    x = _chroma_inputs(ref.unet.params)
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(**x), forge_flux.transformer_of(sd_model)(**x), rtol=1e-4, atol=1e-5)
    assert stats.copied == 0 and stats.text() == "zero copy"


def test_a_chroma_without_t5_is_refused_with_one_sentence(forge_backend):
    sd_model, _ = make_forge_chroma()
    del sd_model.forge_objects_original.clip.cond_stage_model.t5xxl
    with pytest.raises(UnsupportedModelError, match=r"^The loaded Chroma model has no t5xxl text encoder; select the "
                       r"T5 file in the VAE / Text Encoder menu"):
        _handoff(sd_model)


@pytest.fixture(scope="module")
def chroma_data(tmp_path_factory):
    from train_support import make_dataset

    return make_dataset(tmp_path_factory.mktemp("forge-chroma-data"), n=2, repeats=1, sizes=[(64, 64), (64, 64)])


@pytest.mark.parametrize("fmt", ["fp8_scaled", FORMATS[3]])
def test_neo_host_trains_chroma_in_place_and_exports_a_chroma_lora(forge_backend, monkeypatch, tmp_path, chroma_data,
                                                                   fmt, capsys):
    """ForgeHost with Neo's loaded Chroma: Forge's memory manager asked for room, the real engine trains a few steps
    on Neo's own weights (no copy), the file is a kohya Chroma LoRA, and Neo's tensors are bit-identical after."""
    from train_support import tiny_config

    from lora_trainer.lora import load_kohya_file
    from lora_trainer.train import run_training
    from lora_trainer.webui import forge

    sd_model, _ = make_forge_chroma(fmt, t5_fmt="fp8")
    calls = forge_backend.calls
    install_forge_modules(monkeypatch, sd_model, calls)
    objects = forge_tensors(sd_model)
    before = tensor_fingerprint(objects)
    host = forge.ForgeHost(kind=SimpleNamespace(label="Forge Neo", summary=lambda: "Forge Neo"))
    config = tiny_config(chroma_data, tmp_path / "out", max_steps=3, learning_rate=5e-2, t5_max_token_length=32,
                         timestep_sampling="sigmoid")
    with host.gpu_lock():
        bundle = host.acquire_model(config)
        loads = [c for c in calls if isinstance(c, tuple)]
        assert loads == [([sd_model.forge_objects_original.unet], loads[0][1])] and loads[0][1] > 2**30
        assert bundle.family is Family.CHROMA and bundle.name == "chroma-tiny" and bundle.model_hash == "ce" * 32
        assert host.last_notes[0] == (f"Trains on the loaded Chroma model as Forge holds it (transformer "
                                      f"{FORMAT_NAMES[fmt]}, T5 fp8 e4m3fn); no second copy of the weights.")
        result = run_training(config, bundle=bundle)
        host.release_model(bundle)
    out = capsys.readouterr().out
    assert (f"LoRA Trainer: training on Forge's loaded Chroma model chroma-tiny (transformer {FORMAT_NAMES[fmt]}, "
            "T5 fp8 e4m3fn; the LoRA trains over the weights as stored, dequantised one layer at a time; zero copy)"
            in out)
    assert "LoRA Trainer: Forge's model is bit-identical after training" in out
    after = forge_tensors(sd_model)
    assert tensor_fingerprint(after, like=before) == before
    assert all(after[k] is objects[k] and after[k].is_inference() for k in objects)  # still Neo's own tensors

    tensors, md = load_kohya_file(result.lora_path)
    assert md["ss_base_model_version"] == "chroma" and md["modelspec.architecture"] == "chroma/lora"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in tensors)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in tensors)
    assert not any(k.startswith(("lora_te", "lora_unet_distilled_guidance_layer")) for k in tensors)
    assert not any("_mod_" in k or "modulation" in k for k in tensors)  # Chroma has no modulation Linears
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))
    assert host.model_info() == {
        "name": "chroma-tiny.safetensors", "family": "Chroma",
        "storage": f"transformer {FORMAT_NAMES[fmt]}, T5 fp8 e4m3fn",
        "note": f"stored as transformer {FORMAT_NAMES[fmt]}, T5 fp8 e4m3fn; trains on the loaded weights as stored "
                "(no second copy)"}
