"""The Flux hand-off from Forge's memory (webui/forge_flux.py) against the Forge-shaped stand-ins of
tests/forge_flux_standins.py (Forge main's and Neo's Flux as the hand-off reads it, in every storage format; the GGUF
and nf4 cases skip where the `gguf` package or bitsandbytes is missing). The real Forge and Neo run in the opt-in
live suites (tests/webui).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import sys
import weakref
from types import SimpleNamespace

import pytest
import tensor_accounting
import torch
import torch.nn.functional as F
from bnb_support import HAS_BNB
from flux_support import inputs, requires_flux_diffusers
from forge_flux_standins import (
    EFFECT_TOLERANCE,
    FakeForgeLinear,
    Flux,
    backend_modules,
    forge_tensors,
    install_forge_modules,
    make_forge_flux,
)
from torch import nn

from lora_trainer import quant
from lora_trainer.errors import UnsupportedModelError
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
from lora_trainer.webui import forge_flux
from lora_trainer.webui.common import tensor_fingerprint

pytestmark = requires_flux_diffusers

HAS_GGUF = importlib.util.find_spec("gguf") is not None


@pytest.fixture
def forge_backend(monkeypatch):
    """Forge's dequantisers and memory manager as stand-ins in sys.modules; records load_models_gpu."""
    mods, calls = backend_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return SimpleNamespace(calls=calls, dynamic_args=mods["backend.args"].dynamic_args)


FORMATS = ["fp32", "bf16", "fp8", "fp8_scaled", "fp32_scaled",
           pytest.param("gguf", marks=pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed")),
           pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes has no 4-bit kernels here"))]
FORMAT_NAMES = {"fp32": "fp32", "bf16": "bf16", "fp8": "fp8 e4m3fn", "fp8_scaled": "fp8_scaled",
                "fp32_scaled": "fp32 scaled", "gguf": "gguf Q8_0",
                "nf4": "nf4"}


def _handoff(sd_model, stats=None):
    return forge_flux.bundle_from_forge_flux(sd_model, device=torch.device("cpu"), dtype=torch.float32, stats=stats)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("fmt", FORMATS)
def test_transformer_computes_what_forge_computes(forge_backend, fmt):
    """Our transformer over Forge's stored weights gives Forge's own output, in every storage format."""
    sd_model, ref = make_forge_flux(fmt)
    stats = forge_flux.HandoffStats()
    bundle = _handoff(sd_model, stats)
    forge_t = forge_flux.transformer_of(sd_model)
    x = inputs(ref.unet.params)
    with torch.no_grad():
        want = forge_t(**x)
        got = bundle.unet(**x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert stats.formats["transformer"] == {FORMAT_NAMES[fmt]: sum(1 for m in forge_t.modules()
                                                                    if isinstance(m, FakeForgeLinear))}
    assert bundle.weight_formats["unet"] == FORMAT_NAMES[fmt]
    if fmt == "fp32":  # fp32 compute on the CPU: nothing copied at all
        torch.testing.assert_close(got, ref.unet(**x))


def test_no_weight_is_copied_and_forge_layers_are_read_live(forge_backend):
    sd_model, _ = make_forge_flux("fp8_scaled", t5_fmt="fp8")
    stats = forge_flux.HandoffStats()
    bundle = _handoff(sd_model, stats)
    forge_t = forge_flux.transformer_of(sd_model)
    layers = dict(quant.quant_layers(bundle.unet))
    assert len(layers) == sum(isinstance(m, FakeForgeLinear) for m in forge_t.modules())
    for name, layer in layers.items():
        theirs = forge_t.get_submodule(name)
        assert layer.frozen.current() is theirs.weight and layer.frozen.storage()[1] is theirs.scale_weight
        assert not layer.movable
    theirs = {p.untyped_storage().data_ptr() for p in forge_t.parameters()}
    assert all(p.untyped_storage().data_ptr() in theirs for p in bundle.unet.parameters())  # biases, norms: aliases
    assert stats.copied == 0 and stats.shared_fraction() == 1.0 and stats.text() == "zero copy"
    assert stats.formats["T5"] == {"fp8 e4m3fn": 14}


def test_training_a_lora_leaves_forge_bit_identical(forge_backend):
    from peft import LoraConfig, inject_adapter_in_model

    sd_model, ref = make_forge_flux("fp8_scaled")
    before = tensor_fingerprint(forge_tensors(sd_model))
    bundle = _handoff(sd_model)
    model = bundle.unet
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=r".*_blocks\..*(qkv|proj|mlp\.0|mlp\.2|lin|linear1|linear2)"),
                            model)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    opt = torch.optim.AdamW(lora, lr=1e-2)
    x = inputs(ref.unet.params, latent=4)
    target = torch.randn_like(ref.unet(**x))
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.mse_loss(model(**x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert tensor_fingerprint(forge_tensors(sd_model), like=before) == before


def test_forge_moving_a_layer_is_followed(forge_backend):
    """Forge's memory manager replaces Parameters when it moves a model; we read the current one and keep
    nothing of the old alive."""
    sd_model, ref = make_forge_flux("fp8")
    bundle = _handoff(sd_model)
    x = inputs(ref.unet.params)
    with torch.no_grad():
        first = bundle.unet(**x)
    layer = forge_flux.transformer_of(sd_model).double_blocks[0].img_attn.qkv
    old = weakref.ref(layer.weight)
    with torch.inference_mode():
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)  # "moved"
    gc.collect()
    assert old() is None
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(**x), first)


def test_text_encoders_and_vae_compute_what_forge_holds(forge_backend):
    sd_model, ref = make_forge_flux("fp32", t5_fmt="fp8")
    bundle = _handoff(sd_model)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(bundle.text_encoders[0](ids).pooler_output, ref.text_encoders[0](ids).pooler_output)
        t5_ref = copy.deepcopy(ref.text_encoders[1])
        for name, m in t5_ref.named_modules():  # the same T5 with Forge's fp8 weights dequantised
            if type(m) is nn.Linear:
                m.weight.copy_(m.weight.to(torch.float8_e4m3fn).float())
        torch.testing.assert_close(bundle.text_encoders[1](ids).last_hidden_state, t5_ref(ids).last_hidden_state)
        img = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(bundle.vae.encode(img).latent_dist.mean, ref.vae.encode(img).latent_dist.mean)
    assert bundle.family.value == "flux1" and bundle.variant == "dev" and bundle.prediction_type == "flow"
    assert bundle.scaling_factor == pytest.approx(0.3611) and bundle.shift_factor == pytest.approx(0.1159)
    assert bundle.name == "flux-tiny" and bundle.source == "forge:/models/flux-tiny.safetensors"
    assert bundle.weight_formats == {"unet": "fp32", "te1": "fp32", "te3": "fp8 e4m3fn", "vae": "fp32"}


def test_text_encoder_tables_stay_forges_and_their_lookups_are_cast(forge_backend):
    """On a GPU Forge holds CLIP-L's and T5's token embeddings in fp16 while training computes in bf16: the tables
    (T5-XXL's: 251 MiB) stay Forge's tensors and only the rows looked up are cast, which gives the outputs of
    text encoders converted to bf16 as a whole."""
    ref = build_tiny_flux_bundle("dev", seed=0)
    for te in ref.text_encoders:
        te.half()
    want = [copy.deepcopy(te).to(torch.bfloat16) for te in ref.text_encoders]  # a cast copy of everything
    sd_model, _ = make_forge_flux("fp32", ref=ref, keep_ref=False)
    stats = forge_flux.HandoffStats()
    alive = tensor_accounting.live_storages()
    bundle = forge_flux.bundle_from_forge_flux(sd_model, device=torch.device("cpu"), dtype=torch.bfloat16,
                                               stats=stats)
    new = tensor_accounting.new_storages(alive, tensor_accounting.live_storages())
    del alive
    # every tensor it allocates is a copy it declares, besides 1-value anchors and CLIP's position ids (measured)
    assert stats.copied <= sum(nbytes for nbytes, _ in new.values()) <= stats.copied + 4096
    clip, t5 = bundle.text_encoders
    forge_clip = sd_model.forge_objects_original.clip.cond_stage_model.clip_l.transformer
    forge_t5 = sd_model.forge_objects_original.clip.cond_stage_model.t5xxl.transformer
    tables = []  # (ours, Forge's): every embedding table, by name (Forge's T5 names its token table `shared` only)
    for ours_root, theirs_root in ((clip, forge_clip), (t5, forge_t5)):
        theirs = dict(theirs_root.named_modules())
        tables += [(m, theirs[n.replace("encoder.embed_tokens", "shared")]) for n, m in ours_root.named_modules()
                   if isinstance(m, nn.Embedding)]
    assert len(tables) >= 4  # CLIP's tokens and positions, T5's tokens (twice) and relative positions
    for ours, theirs in tables:
        assert ours.weight.dtype == torch.float16
        assert ours.weight.untyped_storage().data_ptr() == theirs.weight.untyped_storage().data_ptr()
    table_bytes = sum(theirs.weight.numel() * 2 for _, theirs in tables)
    assert stats.copied < table_bytes / 4, (stats.copied, table_bytes)  # norms and biases only
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(clip(ids).last_hidden_state, want[0](ids).last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(t5(ids).last_hidden_state, want[1](ids).last_hidden_state, rtol=0, atol=0)


def test_new_bytes_measure_sees_tensors_inside_our_weight_wrappers():
    """The measure above counts tensors held only by quant's wrappers (QuantLinear, PlainWeight, HostWeight),
    each storage once, and none of those alive before."""
    assert tensor_accounting.self_check()


def test_schnell_is_recognised(forge_backend):
    sd_model, _ = make_forge_flux("fp32", variant="schnell")
    assert forge_flux.check_family(sd_model)[1] == "schnell"


def test_storage_report_names_every_part(forge_backend):
    sd_model, _ = make_forge_flux("fp8", t5_fmt="fp8")
    assert forge_flux.storage_report(sd_model).describe() == (
        "transformer: fp32 (48 weights), fp8 e4m3fn (36 weights); CLIP-L: fp32; T5: fp8 e4m3fn (14 weights), "
        "fp32 (7 weights); VAE: fp32")  # 36 Linears (the tiny model's 2+2 blocks); biases, norms, embeddings


@pytest.mark.parametrize(("fmt", "online", "advice"), [
    ("fp8", False, True), ("fp8_scaled", False, True), ("fp32_scaled", False, True),  # merged into fp8 / scaled
    ("fp8", True, False), ("fp8_scaled", True, False),  # "(fp16 LoRA)": applied on the fly, exact
    ("fp32", False, False), ("bf16", False, False),
    *(pytest.param("nf4", online, not online, marks=pytest.mark.skipif(not HAS_BNB, reason="no bitsandbytes 4-bit"))
      for online in (False, True))])
def test_the_run_says_how_to_use_the_lora_where_forges_merge_would_lose_it(forge_backend, fmt, online, advice):
    """Forge merges LoRAs into fp8 weights by rounding the sum to fp8 (a change of a few percent of a weight mostly
    rounds away), into scaled weights without their scale_weight, and into nf4 by quantising the sum again;
    "(fp16 LoRA)" applies them on the fly."""
    forge_backend.dynamic_args["online_lora"] = online
    sd_model, _ = make_forge_flux(fmt)
    stats = forge_flux.HandoffStats()
    _handoff(sd_model, stats)
    text = forge_flux.lora_use_advice(stats)
    assert (text is not None) == advice
    if advice:
        assert text.startswith(f"Forge applies LoRAs to this model by merging them into its {FORMAT_NAMES[fmt]} weights")
        assert "'Automatic (fp16 LoRA)'" in text and text.count(". ") == 0  # one sentence: cause; remedy


def test_make_room_asks_forges_memory_manager(forge_backend):
    sd_model, _ = make_forge_flux("fp32")
    forge_flux.make_room(sd_model, 3 * 2**30)
    assert forge_backend.calls == [([sd_model.forge_objects_original.unet], 3 * 2**30)]
    need = forge_flux.training_memory(SimpleNamespace(resolution=1024, batch_size=1, gradient_checkpointing=True,
                                                      network_dim=16), forge_flux.flux_params(
                                                          forge_flux.transformer_of(sd_model)))
    assert 1.5 * 2**30 < need < 3 * 2**30


def test_what_cannot_be_trained_is_refused_with_one_sentence(forge_backend):
    sd_model, _ = make_forge_flux("fp32")

    class Flux2(Flux):
        pass

    with pytest.raises(UnsupportedModelError, match=r"The loaded model \(Flux2\) is not FLUX.1, Chroma, SD1"):
        forge_flux.check_family(Flux2(**vars(sd_model)))
    forge_backend.dynamic_args["kontext"] = True
    with pytest.raises(UnsupportedModelError, match="Kontext"):
        forge_flux.check_family(sd_model)
    forge_backend.dynamic_args["kontext"] = False
    layer = forge_flux.transformer_of(sd_model).single_blocks[0].linear1
    layer.__class__ = type("SVDQW4A4Linear", (FakeForgeLinear,), {})
    with pytest.raises(UnsupportedModelError, match="Nunchaku SVDQ"):
        _handoff(sd_model)
    sd_model2, _ = make_forge_flux("fp32")
    forge_flux.transformer_of(sd_model2).config["yak_mlp"] = True
    with pytest.raises(UnsupportedModelError, match="FLUX.2"):
        _handoff(sd_model2)
    del sd_model2.forge_objects_original.clip.cond_stage_model.t5xxl
    with pytest.raises(UnsupportedModelError, match="t5xxl text encoder"):
        forge_flux.text_encoders_of(sd_model2)
    # Forge main builds FLUX.1 at its fixed depth and loads a file with fewer blocks leniently: Linears without weights
    sd_model3, _ = make_forge_flux("fp32")
    forge_flux.transformer_of(sd_model3).double_blocks[1].img_mod.lin.weight = None
    with pytest.raises(UnsupportedModelError, match=r"transformer layer double_blocks\.1\.img_mod\.lin has no weight, so "
                       r"Forge loaded the model incompletely .*; load a complete FLUX\.1"):
        _handoff(sd_model3)


# ---------------------------------------------------------------- ForgeHost with stand-in `modules`
@pytest.fixture
def fake_forge_flux(monkeypatch, forge_backend):
    """Forge's `modules` with a loaded Flux model (mocked: no Forge here), plus the backend stand-ins."""
    sd_model, ref = make_forge_flux("fp8_scaled", t5_fmt="fp8")
    install_forge_modules(monkeypatch, sd_model, forge_backend.calls)
    return SimpleNamespace(sd_model=sd_model, ref=ref, calls=forge_backend.calls)


def test_forge_host_trains_flux_in_place_and_checks_it_after(fake_forge_flux, capsys):
    from lora_trainer.webui import forge

    host = forge.ForgeHost(kind=SimpleNamespace(label="Forge", summary=lambda: "Forge"))
    sd_model = fake_forge_flux.sd_model
    before = tensor_fingerprint(forge_tensors(sd_model))
    config = SimpleNamespace(model="", resolution=512, batch_size=1, gradient_checkpointing=True, network_dim=4,
                             mixed_precision="bf16")
    with host.gpu_lock():
        bundle = host.acquire_model(config)
        loads = [c for c in fake_forge_flux.calls if isinstance(c, tuple)]
        assert fake_forge_flux.calls[0] == "reload" and loads == [([sd_model.forge_objects_original.unet], loads[0][1])]
        assert loads[0][1] > 2**30  # room for the run asked of Forge's memory manager
        assert sd_model.forge_objects_original.unet.refreshed == 1  # merged LoRAs taken out first
        assert bundle.family.value == "flux1" and bundle.name == "flux-tiny" and bundle.model_hash == "cd" * 32
        assert host.last_notes == [("Trains on the loaded Flux model as Forge holds it (transformer fp8_scaled, CLIP-L "
                                   "fp32, T5 fp8 e4m3fn); no second copy of the weights."), host.last_notes[1]]
        # no "online_lora" in Forge's dynamic_args: Forge merges LoRAs, so the run says how to use this one
        assert host.last_notes[1].startswith("Forge applies LoRAs to this model by merging them into its fp8_scaled")
        with torch.no_grad():
            x = inputs(fake_forge_flux.ref.unet.params)
            torch.testing.assert_close(bundle.unet(**x), forge_flux.transformer_of(sd_model)(**x))
        host.release_model(bundle)
    out = capsys.readouterr().out
    assert ("LoRA Trainer: training on Forge's loaded Flux model flux-tiny (dev; transformer fp8_scaled, CLIP-L fp32, "
            "T5 fp8 e4m3fn; the LoRA trains over the weights as stored, dequantised one layer at a time; zero copy)"
            in out)
    assert "LoRA Trainer: Forge's model is bit-identical after training" in out
    assert sd_model.current_lora_hash == "[]" and "end" in fake_forge_flux.calls
    assert tensor_fingerprint(forge_tensors(sd_model), like=before) == before
    assert host.model_info() == {
        "name": "flux-tiny.safetensors", "family": "Flux",
        "storage": "transformer fp8_scaled, CLIP-L fp32, T5 fp8 e4m3fn",
        "note": "stored as transformer fp8_scaled, CLIP-L fp32, T5 fp8 e4m3fn; trains on the loaded weights as stored "
                "(no second copy)"}


def test_neo_rms_norms_named_weight_are_found(forge_backend):
    """Neo builds Flux's q/k norms as torch.nn.RMSNorm, whose parameter is `weight` (BFL: `scale`)."""
    sd_model, ref = make_forge_flux("bf16")
    forge_t = forge_flux.transformer_of(sd_model)
    for module in forge_t.modules():
        if "scale" in module._parameters:
            module._parameters["weight"] = module._parameters.pop("scale")
    want = _handoff(make_forge_flux("bf16")[0]).unet(**inputs(ref.unet.params))
    bundle = _handoff(sd_model)
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(**inputs(ref.unet.params)), want.detach(), rtol=0, atol=0)
    norm = bundle.unet.double_blocks[0].img_attn.norm.query_norm.scale
    assert norm.untyped_storage().data_ptr() == \
        forge_t.double_blocks[0].img_attn.norm.query_norm.weight.untyped_storage().data_ptr()


# ---------------------------------------------------------------- the real engine on Forge's weights
ENGINE_FORMATS = ["fp8_scaled",
                  pytest.param("gguf", marks=pytest.mark.skipif(not HAS_GGUF, reason="the gguf package is not installed")),
                  pytest.param("nf4", marks=pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes has no 4-bit kernels"))]


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    from train_support import make_dataset

    return make_dataset(tmp_path_factory.mktemp("forge-flux-data"), n=2, repeats=1, sizes=[(64, 64), (64, 64)])


@pytest.mark.parametrize("fmt", ENGINE_FORMATS)
def test_the_real_engine_trains_flux_on_forges_stored_weights(forge_backend, tmp_path, flux_data, fmt):
    """run_training on the hand-off (no copy of Forge's fp8/GGUF/nf4 weights): a kohya Flux LoRA whose effect
    on the quantised base matches its effect on the unquantised model, and Forge's weights bit-identical."""
    from train_support import tiny_config

    from lora_trainer.lora import LoraSpec, inject_lora, load_kohya_file
    from lora_trainer.train import run_training

    sd_model, ref = make_forge_flux(fmt)
    before = tensor_fingerprint(forge_tensors(sd_model))
    objects = forge_tensors(sd_model)
    bundle = _handoff(sd_model)
    config = tiny_config(flux_data, tmp_path / "out", max_steps=2, train_text_encoder=True, learning_rate=5e-2,
                         resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                         t5_max_token_length=32)
    result = run_training(config, bundle=bundle)
    tensors, md = load_kohya_file(result.lora_path)
    assert md["ss_base_model_version"] == "flux1"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in tensors)
    assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in tensors)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in tensors)
    after = forge_tensors(sd_model)
    assert tensor_fingerprint(after, like=before) == before
    assert all(after[k] is objects[k] and after[k].is_inference() for k in objects)  # still Forge's own tensors

    # The file applied to the quantised base (as Forge runs it) and to the unquantised model: same effect.
    x = inputs(ref.unet.params)
    effects = []
    for model_bundle in (_handoff(sd_model), ref):
        network = inject_lora(model_bundle, LoraSpec.from_kohya_state_dict(tensors))
        assert network.load_kohya_state_dict(tensors).complete
        with torch.no_grad():
            network.set_multiplier(0.0)
            plain = model_bundle.unet(**x)
            network.set_multiplier(1.0)
            effects.append(model_bundle.unet(**x) - plain)
        network.remove()
    rel = float((effects[0] - effects[1]).norm() / effects[1].norm())
    assert effects[1].abs().max() > 1e-4 and rel < EFFECT_TOLERANCE[fmt], rel


@pytest.mark.parametrize(("gib", "preset"), [(23.0, "flux-24gb"), (15.0, "flux-16gb"), (11.2, "flux-12gb"),
                                             (7.5, "flux-8gb"), (6.0, None)])
def test_the_preset_that_fits_the_free_vram(gib, preset):
    found = forge_flux.fitting_preset(int(gib * 2**30))
    assert (found.key if found else None) == preset


def test_the_tab_says_which_preset_fits_with_forges_flux_counted_in(forge_backend, monkeypatch):
    """No GPU here: the VRAM budget (free + what Forge's Flux holds on the GPU) is given; on the CPU none."""
    sd_model, _ = make_forge_flux("fp8")
    assert forge_flux.gpu_budget(forge_flux.parts_of(sd_model).values()) is None  # no CUDA: no preset line
    assert "preset" not in forge_flux.model_info(sd_model)
    monkeypatch.setattr(forge_flux, "gpu_budget", lambda parts: int(11.2 * 2**30))
    info = forge_flux.model_info(sd_model)
    assert info["preset"] == "flux-12gb"
    assert info["note"].endswith("; 11.2 GiB of VRAM free with Forge's Flux counted in: preset Flux.1 — 12 GB fits")
    monkeypatch.setattr(forge_flux, "gpu_budget", lambda parts: 5 * 2**30)
    info = forge_flux.model_info(sd_model)
    assert info["preset"] is None and "less than the smallest Flux preset (8 GB) needs" in info["note"]
