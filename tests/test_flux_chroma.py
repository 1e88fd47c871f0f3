"""Chroma (the second Flux-architecture family): our module equals diffusers' ChromaTransformer2DModel,
tiny files load, and its LoRAs are kohya's lora_flux names without the modulation Linears."""

from __future__ import annotations

import pytest
import torch
from flux_support import requires_flux_diffusers

from lora_trainer.errors import UnsupportedModelError
from lora_trainer.lora import (
    LoraSpec,
    TrainingFacts,
    build_metadata,
    inject_lora,
    load_kohya_file,
    read_lora_info,
)
from lora_trainer.models import FLOW, Family
from lora_trainer.models.flux import convert as cv
from lora_trainer.models.flux import image_ids, text_ids
from lora_trainer.models.flux.chroma import CHROMA, ChromaTransformer
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle, write_tiny_flux_checkpoint

pytestmark = requires_flux_diffusers


@pytest.fixture(scope="module")
def chroma():
    return build_tiny_flux_bundle("chroma", seed=0)


def _inputs(batch=2, tokens=7):
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, tokens, dtype=torch.long)
    mask[0, :3] = 1
    mask[1, :6] = 1
    return {"img": torch.randn(batch, 16, 64, generator=g), "img_ids": image_ids(batch, 8, 8),
            "txt": torch.randn(batch, tokens, 32, generator=g), "txt_ids": text_ids(batch, tokens),
            "timesteps": torch.rand(batch, generator=g), "txt_mask": mask}


def test_forward_equals_diffusers_chroma(chroma):
    diffusers = pytest.importorskip("diffusers")
    if not hasattr(diffusers, "ChromaTransformer2DModel"):
        pytest.skip(f"diffusers {diffusers.__version__} has no ChromaTransformer2DModel (0.35+)")
    p = chroma.unet.params
    twin = diffusers.ChromaTransformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=list(p.axes_dim), approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden_size, approximator_layers=p.approximator_depth).eval()
    twin.load_state_dict(cv.bfl_to_diffusers(chroma.unet.state_dict(), p.hidden_size))
    x = _inputs()
    # ChromaPipeline's mask: the caption's tokens plus one padding token, then every image token
    keep = torch.arange(7)[None] <= x["txt_mask"].sum(1)[:, None]
    mask = torch.cat([keep, torch.ones(2, 16, dtype=torch.bool)], 1)
    with torch.no_grad():
        ours = chroma.unet(**x)
        theirs = twin(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                      img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], attention_mask=mask, return_dict=False)[0]
        unmasked = chroma.unet(**{**x, "txt_mask": None})
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours, unmasked, atol=1e-3)  # the T5 mask matters


def test_full_size_shape():
    with torch.device("meta"):
        model = ChromaTransformer(CHROMA)
    assert sum(p.numel() for p in model.parameters()) == 8_899_983_424  # as kohya's Chroma (8.9 B)
    assert "distilled_guidance_layer.norms.4.scale" in model.state_dict()
    assert not any(".img_mod." in k or ".modulation." in k or "adaLN" in k for k in model.state_dict())


def test_tiny_files_load(tmp_path, chroma):
    from lora_trainer.models.loader import check_model_header, load_model

    path = write_tiny_flux_checkpoint(tmp_path, "chroma", seed=0)
    assert not (tmp_path / "clip_l.safetensors").exists()
    assert check_model_header(path) is Family.CHROMA
    bundle = load_model(path)
    assert (bundle.family, bundle.prediction_type, bundle.variant) == (Family.CHROMA, FLOW, "")
    assert isinstance(bundle.unet, ChromaTransformer) and len(bundle.text_encoders) == 1
    assert bundle.text_encoder_names() == ["te3"] and bundle.tokenizers[0].model_max_length == 512
    assert set(bundle.component_sources) == {"t5", "vae"}
    a, b = bundle.unet.state_dict(), chroma.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UnsupportedModelError, match="has no CLIP-L text encoder; leave --clip-l out"):
        load_model(path, clip_l=path)
    (tmp_path / "t5xxl.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match="Chroma needs its T5-XXL text encoder"):
        load_model(path)


def test_lora_names_and_metadata(tmp_path, chroma):
    net = inject_lora(chroma, LoraSpec(rank=4, alpha=4, train_t5=True), seed=0)
    try:
        names = [t.kohya_name for t in net.targets]
        path = net.save_kohya(tmp_path / "c.safetensors", build_metadata(chroma, net.spec, TrainingFacts()))
    finally:
        net.remove()
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert len(unet) == 2 * 8 + 2 * 2 and "lora_unet_double_blocks_0_img_attn_qkv" in unet
    assert not any("mod" in n for n in unet)
    assert sum(n.startswith("lora_te3_") for n in names) == 14 and not any(n.startswith("lora_te1_") for n in names)
    md = load_kohya_file(path)[1]
    assert md["ss_base_model_version"] == "chroma" and md["modelspec.architecture"] == "chroma/lora"
    assert md["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert read_lora_info(path).family is Family.CHROMA


def test_full_size_chroma_lora_count():
    """kohya's lora_flux on its Chroma: 19 x 8 + 38 x 2 = 228 transformer modules."""
    from lora_trainer.models.bundle import ModelBundle

    with torch.device("meta"):
        model = ChromaTransformer(CHROMA)
    bundle = ModelBundle(family=Family.CHROMA, prediction_type=FLOW, unet=model, vae=None, text_encoders=[],
                         tokenizers=[])
    net = inject_lora(bundle, LoraSpec(rank=16, alpha=16, train_text_encoder=False))
    try:
        assert len(net.targets) == 228
    finally:
        net.remove()


def test_flux_lora_loads_on_chroma(tmp_path, chroma):
    flux = build_tiny_flux_bundle("schnell", seed=4)
    net = inject_lora(flux, LoraSpec(rank=4, alpha=4, train_text_encoder=False))
    path = net.save_kohya(tmp_path / "f.safetensors", {})
    net.remove()
    cnet = inject_lora(chroma, LoraSpec(rank=4, alpha=4, train_text_encoder=False))
    try:
        report = cnet.load_file(path)
    finally:
        cnet.remove()
    assert len(report.loaded) == 20 and len(report.unexpected) == 6  # the modulation Linears Chroma lacks
