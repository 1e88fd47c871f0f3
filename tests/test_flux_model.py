"""The BFL-layout Flux transformer: same outputs as diffusers' FluxTransformer2DModel, key
conversion both ways, tiny checkpoints in every layout users have, fp8, checkpointing."""

from __future__ import annotations

import pytest
import torch
from flux_support import inputs, requires_flux_diffusers, run, run_diffusers

from lora_trainer.accel.swap import BlockSwapper
from lora_trainer.models import FLOW, Family
from lora_trainer.models.flux import FLUX_DEV, FLUX_SCHNELL, FluxTransformer, pack_latents, unpack_latents
from lora_trainer.models.flux import convert as cv
from lora_trainer.models.flux.fp8 import dequantize_linears
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle, quantize_fp8, write_tiny_flux_checkpoint

pytestmark = requires_flux_diffusers


@pytest.fixture(scope="module")
def tiny_dev():
    return build_tiny_flux_bundle("dev", seed=0)


def _diffusers_twin(transformer: FluxTransformer):
    from diffusers import FluxTransformer2DModel

    p = transformer.params
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=list(p.axes_dim))
    missing, unexpected = model.load_state_dict(cv.bfl_to_diffusers(transformer.state_dict(), p.hidden_size),
                                                strict=False)
    assert not missing and not unexpected
    return model.eval()


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_forward_equals_diffusers_flux(variant, tiny_dev):
    bundle = tiny_dev if variant == "dev" else build_tiny_flux_bundle("schnell", seed=3)
    x = inputs(bundle.unet.params, tokens=7, latent=8, batch=2)
    ours = run(bundle.unet, x)
    theirs = run_diffusers(_diffusers_twin(bundle.unet), x)
    assert ours.shape == (2, 16, 64)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_key_conversion_round_trip(tiny_dev):
    sd = tiny_dev.unet.state_dict()
    back = cv.diffusers_to_bfl(cv.bfl_to_diffusers(sd, tiny_dev.unet.params.hidden_size))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_full_size_conversion_matches_diffusers_single_file_converter():
    """diffusers' own BFL -> diffusers converter (full width only) agrees on every key and shape."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer(FLUX_DEV.replace(depth=2, depth_single_blocks=2))
    sd = model.state_dict()
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    ours = cv.bfl_to_diffusers(sd, 3072)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_full_size_parameter_names_and_count():
    with torch.device("meta"):
        dev, schnell = FluxTransformer(FLUX_DEV), FluxTransformer(FLUX_SCHNELL)
    assert sum(p.numel() for p in dev.parameters()) == 11_901_408_320  # FLUX.1-dev's 11.9 B
    assert sum(p.numel() for p in dev.parameters()) - sum(p.numel() for p in schnell.parameters()) == 3072 * 3072 + 3072 * 256 + 2 * 3072
    names = set(dev.state_dict())
    assert {"double_blocks.18.img_attn.qkv.weight", "single_blocks.37.linear1.weight", "guidance_in.in_layer.weight",
            "final_layer.adaLN_modulation.1.weight", "double_blocks.0.img_attn.norm.query_norm.scale"} <= names


def test_pack_unpack_round_trip():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), x)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dev):
    model = build_tiny_flux_bundle("dev", seed=0).unet.train()
    model.requires_grad_(True)
    x = inputs(model.params)

    def grads():
        model.zero_grad()
        model(**x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_checkpointing_computes_each_modulation_once_except_in_swapped_blocks():
    """Under checkpointing the blocks' modulations are worked out outside the checkpoint (backward does not
    compute them again); a block whose weights block swap brings in through its hooks keeps them inside its call
    (the real swapper, on the CPU, one block through one slot)."""
    model = build_tiny_flux_bundle("dev", seed=0).unet.train()
    model.requires_grad_(True)
    model.single_blocks[0].requires_grad_(False)  # frozen: what block swap moves
    model.enable_gradient_checkpointing()
    x = inputs(model.params)
    mods = [m for name, m in model.named_modules() if name.endswith(("mod.lin", "modulation.lin"))]
    assert len(mods) == 2 * len(model.double_blocks) + len(model.single_blocks)
    calls = {id(m): 0 for m in mods}
    for m in mods:
        m.register_forward_hook(lambda mod, args, out: calls.__setitem__(id(mod), calls[id(mod)] + 1))

    def step():
        calls.update(dict.fromkeys(calls, 0))
        model.zero_grad()
        model(**x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    once = step()
    assert set(calls.values()) == {1}
    swapper = BlockSwapper(model.single_blocks, [0], "cpu", slots=1)
    hooked = step()
    swapper.remove("cpu")
    assert not hasattr(model.single_blocks[0], "weights_arrive_in_call")
    assert calls[id(model.single_blocks[0].modulation.lin)] == 2  # forward and its recomputation
    assert sum(calls.values()) == len(mods) + 1
    model.disable_gradient_checkpointing()
    plain = step()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, once))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, hooked))


@pytest.mark.parametrize("layout", ["bfl", "prefixed", "diffusers", "all-in-one", "folder"])
def test_tiny_checkpoint_layouts_load_the_same_model(tmp_path, layout, tiny_dev):
    from lora_trainer.models.flux.loader import load_flux

    path = write_tiny_flux_checkpoint(tmp_path, "dev", seed=0, layout=layout)
    bundle = load_flux(path)
    assert bundle.family is Family.FLUX1 and bundle.prediction_type == FLOW and bundle.variant == "dev"
    assert (bundle.scaling_factor, bundle.shift_factor) == (0.3611, 0.1159)
    for ours, ref in ((bundle.unet, tiny_dev.unet), (bundle.vae, tiny_dev.vae),
                      (bundle.text_encoders[0], tiny_dev.text_encoders[0]),
                      (bundle.text_encoders[1], tiny_dev.text_encoders[1])):
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), type(ours).__name__
    if layout == "folder":
        assert bundle.component_sources["t5"] == str(path / "text_encoder_2")
    elif layout != "all-in-one":
        assert bundle.component_sources == {"clip_l": str(tmp_path / "clip_l.safetensors"),
                                            "t5": str(tmp_path / "t5xxl.safetensors"),
                                            "vae": str(tmp_path / "ae.safetensors")}
    torch.testing.assert_close(run(bundle.unet, inputs(bundle.unet.params)), run(tiny_dev.unet, inputs(bundle.unet.params)))


def test_schnell_is_detected(tmp_path):
    from lora_trainer.models.flux.loader import load_flux

    bundle = load_flux(write_tiny_flux_checkpoint(tmp_path, "schnell"))
    assert bundle.variant == "schnell" and not bundle.unet.params.guidance_embed
    assert bundle.tokenizers[1].model_max_length == 256


@pytest.mark.parametrize("fp8", ["fp8_e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_fp8_files(tmp_path, fp8, layout, tiny_dev):
    from lora_trainer.models.flux.loader import load_flux

    path = write_tiny_flux_checkpoint(tmp_path, "dev", seed=0, layout=layout, fp8=fp8)
    quantized = quantize_fp8(tiny_dev.unet.state_dict(), scaled=fp8 == "fp8_scaled")
    expected = FluxTransformer(tiny_dev.unet.params)
    expected.load_state_dict({k: v for k, v in quantized.items() if not k.endswith("scale_weight") and k != "scaled_fp8"},
                             strict=False, assign=True)
    for key in [k for k in quantized if k.endswith(".scale_weight")]:
        expected.get_submodule(key[:-13]).register_buffer("scale_weight", quantized[key])
    dequantize_linears(expected, torch.float32)

    stored = load_flux(path, dtype=None, device=None)
    assert stored.weight_formats["unet"] == fp8
    qkv = stored.unet.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert hasattr(qkv, "scale_weight") == (fp8 == "fp8_scaled")
    assert dequantize_linears(stored.unet, torch.float32) > 0
    cast = load_flux(path)  # dtype float32: dequantised while loading
    x = inputs(tiny_dev.unet.params)
    want = run(expected, x)
    torch.testing.assert_close(run(stored.unet, x), want)
    torch.testing.assert_close(run(cast.unet, x), want)
    assert cast.weight_formats["unet"] == "fp32"


def test_t5_tokenizer_matches_flux_tokenizer_2():
    from lora_trainer.models.flux.tokenizers import t5_tokenizer

    tok = t5_tokenizer()
    # ids of FLUX.1's tokenizer_2 (google/t5-v1_1-xxl) for this text
    assert tok("a photo of a cat, hello World!").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 6, 21820, 1150, 55, 1]
    padded = tok(["x"], padding="max_length", max_length=8, truncation=True).input_ids[0]
    assert padded == [3, 226, 1, 0, 0, 0, 0, 0] and len(tok) == 32100


def test_t5_tokenizer_sources_and_the_error_naming_them(tmp_path, monkeypatch):
    import gzip

    from lora_trainer.errors import UnsupportedModelError
    from lora_trainer.models.flux import tokenizers as ft

    packed = ft.bundled_t5_tokenizer_file().read_bytes()
    monkeypatch.setattr(ft, "bundled_t5_tokenizer_file", lambda: tmp_path / "gone" / "tokenizer.json.gz")
    monkeypatch.setattr(ft, "_hub_cache_dirs", lambda: [tmp_path / "hub" / "tokenizer_2"])
    ft._t5_tokenizer.cache_clear()
    try:
        with pytest.raises(UnsupportedModelError) as exc:
            ft.t5_tokenizer(host_roots=[tmp_path / "forge"])
        text = str(exc.value)
        for place in (tmp_path / "gone", tmp_path / "forge" / "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2",
                      tmp_path / "hub" / "tokenizer_2"):
            assert str(place) in text
        assert "\n" not in text
        # a host's copy (Forge keeps FLUX.1's tokenizer_2 as tokenizer.json)
        host = tmp_path / "forge" / "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2"
        host.mkdir(parents=True)
        (host / "tokenizer.json").write_bytes(gzip.decompress(packed))
        assert ft.t5_tokenizer(host_roots=[tmp_path / "forge"])("a cat").input_ids == [3, 9, 1712, 1]
        # a folder the user names
        mine = tmp_path / "mine"
        mine.mkdir()
        (mine / "tokenizer.json").write_bytes(gzip.decompress(packed))
        assert ft.t5_tokenizer(mine, max_length=77).model_max_length == 77
    finally:
        ft._t5_tokenizer.cache_clear()


def test_fp8_t5_file(tmp_path, tiny_dev):
    """t5xxl_fp8_e4m3fn: fp8 Linears stay fp8 as stored; an fp8 token embedding becomes bf16 (no fp8 path)."""
    from safetensors.torch import save_file

    from lora_trainer.models.flux.loader import load_flux
    from lora_trainer.models.flux.tiny import component_state_dicts

    model = write_tiny_flux_checkpoint(tmp_path, "dev", seed=0)
    t5 = {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v for k, v in component_state_dicts(tiny_dev)["t5"].items()}
    save_file(t5, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))
    (tmp_path / "t5xxl.safetensors").unlink()
    stored = load_flux(model, dtype=None, device=None)
    enc = stored.text_encoders[1]
    assert stored.weight_formats["te3"] == "fp8_e4m3fn" and stored.component_sources["t5"].endswith("fp8_e4m3fn.safetensors")
    assert enc.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert enc.shared.weight.dtype == torch.bfloat16
    cast = load_flux(model)  # float32: every fp8 tensor dequantised
    ref = tiny_dev.text_encoders[1].state_dict()
    for key, value in cast.text_encoders[1].state_dict().items():
        assert value.dtype == torch.float32
        if ref[key].dim() == 2:
            torch.testing.assert_close(value, ref[key].to(torch.float8_e4m3fn).float())
