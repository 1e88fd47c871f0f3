"""A Flux LoRA we export, loaded by diffusers' FluxPipeline.load_lora_weights (a real third-party
reader of kohya's Flux format), reproduces our transformer and CLIP-L outputs (fp32, 1e-4) with every
key used.

diffusers' kohya-Flux converter hard-codes FLUX.1's width for the single blocks' fused `linear1`
(3072 x 3 + 12288 rows), so the single-block case runs a full-width model with one single block and
no double block; the double-block case runs the tiny model. Together they cover every module kind of
kohya's default target set."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from flux_support import inputs, requires_flux_diffusers, run, run_diffusers

from lora_trainer.lora import LoraSpec, TrainingFacts, build_metadata, inject_lora, read_lora_info
from lora_trainer.lora.network import ADAPTER
from lora_trainer.models.flux import convert as cv
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle

pytestmark = requires_flux_diffusers

# diffusers modules per kohya module: fused projections are split
_SPLITS = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
# diffusers 0.36's Flux converter keeps only `lora_unet_`/`lora_te_` keys and so drops the CLIP-L part
# of every kohya lora_flux file (`lora_te1_`, as sd-scripts writes it) without a word; 0.31 and 0.42 load
# it. On 0.36 the transformer part is still checked in full; CLIP-L is checked on the other stacks.
_DROPS_TE1 = __import__("diffusers").__version__.startswith("0.36.")


def _twin(transformer):
    from diffusers import FluxTransformer2DModel

    p = transformer.params
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=list(p.axes_dim))
    model.load_state_dict(cv.bfl_to_diffusers(transformer.state_dict(), p.hidden_size))
    return model.eval()


def _lora_layers(module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer) and m.active_adapters)


def _train_a_little(network, seed: int = 5) -> None:
    """Stand-in for training: non-zero up weights (kohya starts them at zero), different per module."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in network.layers.values():
            up = layer.lora_B[ADAPTER].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.05)


def _check(bundle, tmp_path, caplog, *, with_clip: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    twin = _twin(bundle.unet)
    clip_twin = copy.deepcopy(bundle.text_encoders[0])
    network = inject_lora(bundle, LoraSpec(rank=4, alpha=2, train_text_encoder=with_clip), seed=1)
    _train_a_little(network)
    path = tmp_path / "flux_lora.safetensors"
    network.save_kohya(path, build_metadata(bundle, network.spec, TrainingFacts(output_name="flux_lora")),
                       dtype=torch.float32)
    assert read_lora_info(path).num_modules == len(network.targets)

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=bundle.vae, text_encoder=clip_twin,
                        tokenizer=bundle.tokenizers[0], text_encoder_2=bundle.text_encoders[1],
                        tokenizer_2=bundle.tokenizers[1], transformer=twin)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    complaints = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    if not with_clip or _DROPS_TE1:  # diffusers notes that it loads no CLIP part: true, nothing else skipped
        complaints = [c for c in complaints if not c.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not [c for c in complaints if any(w in c.lower() for w in ("unexpected", "unsupported", "missing",
                                                                       "not loaded", "incompatible"))], complaints

    unet_targets = [t for t in network.targets if t.component == "unet"]
    expected = sum(_SPLITS.get(t.kohya_name.split("_", 5)[-1] if "single" not in t.kohya_name else
                               t.kohya_name.rsplit("_", 1)[-1], 1) for t in unet_targets)
    assert _lora_layers(pipe.transformer) == expected
    te_targets = [t for t in network.targets if t.component == "te1"]
    assert _lora_layers(pipe.text_encoder) == (0 if _DROPS_TE1 else len(te_targets))

    x = inputs(bundle.unet.params, tokens=6, latent=8, batch=2)
    ours = run(bundle.unet, x)
    torch.testing.assert_close(run_diffusers(pipe.transformer, x), ours, atol=1e-4, rtol=1e-4)

    ids = bundle.tokenizers[0](["a photo of sks dog", "x"], padding="max_length", max_length=77,
                               return_tensors="pt").input_ids
    if _DROPS_TE1:
        network.set_multiplier(0.0)  # diffusers' CLIP-L is the base: compare it with ours switched off
    with torch.no_grad():
        a, b = bundle.text_encoders[0](ids), pipe.text_encoder(ids)
    network.set_multiplier(1.0)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-4, rtol=1e-4)
    network.set_multiplier(0.0)  # the LoRA really changes both outputs
    assert not torch.allclose(run(bundle.unet, x), ours, atol=1e-4)
    return network


@pytest.mark.parametrize("with_clip", [True, False], ids=["with-clip", "transformer-only"])
def test_double_blocks_and_clip_through_diffusers(tmp_path, caplog, with_clip):
    bundle = build_tiny_flux_bundle("dev", seed=0, depth=2, depth_single=0)
    network = _check(bundle, tmp_path, caplog, with_clip=with_clip)
    assert {t.kohya_name.split("_", 5)[-1] for t in network.targets if t.component == "unet"} == {
        "img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
        "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"}


@pytest.mark.slow  # a 3072-wide block: about 10 s and 1.5 GB on a 2-core CPU
def test_single_block_at_full_width_through_diffusers(tmp_path, caplog):
    bundle = build_tiny_flux_bundle("schnell", seed=2, depth=0, depth_single=1, hidden=3072, num_heads=24)
    network = _check(bundle, tmp_path, caplog, with_clip=True)
    assert [t.kohya_name for t in network.targets if t.component == "unet"] == [
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2",
        "lora_unet_single_blocks_0_modulation_lin"]
