"""ForgeHost and forge_model against Forge-shaped stand-ins (Forge's own code cannot run here).

The stand-ins reproduce what matters of Forge 2.x (`backend/`): weights are inference tensors
(created under `torch.inference_mode()`, as Forge's loader does) held in modules with Forge's
parameter names — LDM names for the UNet and VAE, transformers names for CLIP under
`clip_l|clip_h|clip_g.transformer` — plus `forge_objects(_original)` with patchers whose
`refresh_loras()` swaps merged-LoRA Parameters back like Forge's LoraLoader. The weights come
from the tiny diffusers models, so the aliased diffusers modules must compute exactly what
those compute.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import types
from types import SimpleNamespace

import pytest
import torch
from forge_flux_standins import forge_tensors

from lora_trainer.errors import UnsupportedModelError
from lora_trainer.models.bundle import EPSILON, V_PREDICTION, Family
from lora_trainer.models.ldm_convert import vae_to_ldm
from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.models.unet_keys import unet_state_dict_to_ldm
from lora_trainer.webui import forge, forge_model

# ---------------------------------------------------------------- Forge-shaped stand-ins
# huggingface_guess's UNet configs (what Forge stores as diffusion_model.config) for the tiny models.
GUESS_TINY = {
    Family.SD1: {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 2, 2],
                 "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                 "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 4, "num_head_channels": -1,
                 "use_linear_in_transformer": False, "adm_in_channels": None},
    Family.SDXL: {"in_channels": 4, "out_channels": 4, "model_channels": 32, "channel_mult": [1, 2, 2],
                  "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
                  "transformer_depth_middle": 2, "context_dim": 64, "num_heads": -1, "num_head_channels": 16,
                  "use_linear_in_transformer": True, "adm_in_channels": 32 + 6 * 8, "num_classes": "sequential"},
}


def _inference_module(named: dict[str, torch.Tensor], device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A module tree with exactly these parameter names, each an inference tensor (Forge-style)."""
    root = torch.nn.Module()
    with torch.inference_mode():
        for name, value in named.items():
            *path, leaf = name.split(".")
            m = root
            for part in path:
                if not hasattr(m, part):
                    m.add_module(part, torch.nn.Module())
                m = getattr(m, part)
            m.register_parameter(leaf, torch.nn.Parameter(value.detach().to(device, dtype).clone(),
                                                          requires_grad=False))
    return root


def _inference_clip(hf_model: torch.nn.Module, add_projection: bool, device: str = "cpu") -> torch.nn.Module:
    """Forge's IntegratedCLIP: a transformers CLIPTextModel (+ text_projection) at `.transformer`."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(hf_model.config)
    if add_projection:  # Forge adds it to every CLIP; SDXL's clip_g gets real weights
        te.text_projection = torch.nn.Linear(hf_model.config.hidden_size, hf_model.config.projection_dim, bias=False)
    ours = hf_model.state_dict()
    if not hasattr(te, "text_model"):
        ours = {k.removeprefix("text_model."): v for k, v in ours.items()}
    te.load_state_dict(ours, strict=False)
    te.to(next(hf_model.parameters()).dtype)  # Forge keeps CLIP in fp16, even on the CPU
    with torch.inference_mode():  # Forge's loader runs under inference mode
        for name, p in list(te.named_parameters()):
            parent, _, leaf = name.rpartition(".")
            owner = te.get_submodule(parent) if parent else te
            setattr(owner, leaf, torch.nn.Parameter(p.detach().to(device).clone(), requires_grad=False))
    wrapper = torch.nn.Module()
    wrapper.transformer = te
    return wrapper


class FakePatcher:
    """Stands in for backend.patcher.base.ModelPatcher + LoraLoader (merged LoRAs swap Parameters)."""

    def __init__(self, model: torch.nn.Module, lora_patches: dict | None = None) -> None:
        self.model = model
        self.lora_patches = lora_patches or {}
        model.__dict__.setdefault("_backup", {})
        self.refreshed = 0

    def merge_fake_lora(self, key: str) -> None:
        parent, _, leaf = key.rpartition(".")
        owner = self.model.get_submodule(parent)
        old = getattr(owner, leaf)
        self.model._backup.setdefault(key, old)
        with torch.inference_mode():
            setattr(owner, leaf, torch.nn.Parameter(old + 1.0, requires_grad=False))

    def refresh_loras(self) -> None:
        self.refreshed += 1
        if self.lora_patches:
            return
        for key, p in self.model._backup.items():
            parent, _, leaf = key.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, p)
        self.model._backup.clear()


class FakeForgeObjects(SimpleNamespace):
    def shallow_copy(self):
        return FakeForgeObjects(unet=self.unet, clip=self.clip, vae=self.vae, clipvision=None)


def make_forge_model(family: Family = Family.SD1, prediction_type: str = EPSILON, seed: int = 0,
                     clip_dtype: torch.dtype = torch.float32, *, ref=None, guess: dict | None = None,
                     device: str = "cpu", unet_dtype: torch.dtype = torch.float32,
                     vae_dtype: torch.dtype = torch.float32):
    """(Forge-shaped sd_model, the bundle its weights came from: tiny unless `ref` is given)."""
    if ref is None:
        ref = build_tiny_bundle(family, prediction_type, seed=seed, conv_projection=family is Family.SD1)
    unet = _inference_module(unet_state_dict_to_ldm(ref.unet.state_dict(), ref.unet.config), device, unet_dtype)
    unet.config = dict(guess or GUESS_TINY[family])
    cfg = ref.vae.config
    vae = _inference_module(vae_to_ldm(ref.vae.state_dict(), len(cfg.block_out_channels), cfg.layers_per_block,
                                       prefix=""), device, vae_dtype)
    vae.config = dict(cfg)
    vae.scaling_factor = 0.13025 if family is Family.SDXL else 0.18215
    keys = {Family.SD1: ["clip_l"], Family.SD2: ["clip_h"], Family.SDXL: ["clip_l", "clip_g"]}[family]
    joint = torch.nn.Module()  # Forge's JointTextEncoder is a plain Module with named children
    for k, te in zip(keys, ref.text_encoders):
        joint.add_module(k, _inference_clip(te.to(clip_dtype), add_projection=True, device=device))  # fp16 CLIP
        te.float()
    predictor = torch.nn.Module()
    with torch.inference_mode():
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        predictor.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())
    predictor.prediction_type = prediction_type
    kmodel = torch.nn.Module()
    kmodel.diffusion_model = unet
    kmodel.predictor = predictor
    kmodel.storage_dtype = unet_dtype
    clip_patcher = FakePatcher(joint)
    original = FakeForgeObjects(unet=FakePatcher(kmodel), clip=SimpleNamespace(patcher=clip_patcher,
                                cond_stage_model=joint), vae=SimpleNamespace(first_stage_model=vae), clipvision=None)
    sd_model = SimpleNamespace(
        forge_objects=original.shallow_copy(), forge_objects_original=original,
        forge_objects_after_applying_lora=original.shallow_copy(), current_lora_hash="[['x.safetensors', 1, 1]]",
        is_sd1=family is Family.SD1, is_sd2=family is Family.SD2, is_sdxl=family is Family.SDXL,
        filename="/models/tiny.safetensors",
        sd_checkpoint_info=SimpleNamespace(filename="/models/tiny.safetensors", model_name="tiny", sha256="ab" * 32))
    return sd_model, ref


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _storage_ptrs(module: torch.nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


# ---------------------------------------------------------------- tests
def test_alias_of_inference_tensor_is_trainable_and_shares_storage():
    with torch.inference_mode():
        w = torch.randn(6, 4)
    assert w.is_inference()
    lin = torch.nn.Linear(4, 6)
    with pytest.raises(RuntimeError):  # what happens when training on Forge's tensors directly
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        lin(torch.randn(2, 4, requires_grad=True)).sum().backward()
    a = forge_model.alias(w)
    assert not a.is_inference() and a.data_ptr() == w.data_ptr()
    lin.weight = torch.nn.Parameter(a, requires_grad=False)
    x = torch.randn(2, 4, requires_grad=True)
    lin(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL])
def test_bundle_aliases_forge_weights_and_computes_the_same(family):
    sd_model, ref = make_forge_model(family)
    bundle = forge_model.bundle_from_forge(sd_model, device=torch.device("cpu"), name="tiny")
    assert bundle.family is family and bundle.prediction_type == EPSILON
    assert bundle.schedule.beta_start == 0.00085 and bundle.schedule.beta_end == 0.012
    assert bundle.scaling_factor == sd_model.forge_objects_original.vae.first_stage_model.scaling_factor
    # zero copy: every parameter of ours lives in one of Forge's storages
    forge_ptrs = {t.untyped_storage().data_ptr() for t in forge_tensors(sd_model).values()}
    for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
        assert _storage_ptrs(module) <= forge_ptrs
        assert not any(p.is_inference() for p in module.parameters())
    assert forge_model.shared_fraction(bundle, sd_model) == 1.0
    # same numbers as the diffusers/transformers models the weights came from
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = bundle.tokenizers[0](["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for ours, theirs in zip(bundle.text_encoders, ref.text_encoders):
            torch.testing.assert_close(ours(ids)[0], theirs(ids)[0], rtol=0, atol=0)
        ctx = torch.randn(1, 77, bundle.unet.config.cross_attention_dim, generator=g)
        kw = {}
        if family is Family.SDXL:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.zeros(1, 6)}
        torch.testing.assert_close(bundle.unet(latents, 10, ctx, **kw).sample, ref.unet(latents, 10, ctx, **kw).sample,
                                   rtol=0, atol=0)
        torch.testing.assert_close(bundle.vae.decode(latents).sample, ref.vae.decode(latents).sample, rtol=0, atol=0)


def test_training_on_the_aliases_leaves_forge_weights_bit_identical():
    from peft import LoraConfig, get_peft_model

    sd_model, _ = make_forge_model(Family.SD1)
    before = forge_tensors(sd_model)
    before_digest = digest(before)
    bundle = forge_model.bundle_from_forge(sd_model, device=torch.device("cpu"))
    unet = get_peft_model(bundle.unet, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    te = get_peft_model(bundle.text_encoders[0], LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    params = [p for p in (*unet.parameters(), *te.parameters()) if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = bundle.noise_scheduler()
    ids = bundle.tokenizers[0](["a photo of sks"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in params]
    losses = []
    for _ in range(3):
        with torch.no_grad():
            latents = bundle.vae.encode(torch.rand(1, 3, 32, 32, generator=g) * 2 - 1).latent_dist.sample(g)
            latents = latents * bundle.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (1,), generator=g)
        pred = unet(scheduler.add_noise(latents, noise, t), t, te(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(start, params))  # the LoRA did train
    after = forge_tensors(sd_model)
    assert digest(after) == before_digest
    for k, v in after.items():  # the very same tensors, still Forge's inference tensors
        assert v is before[k] and v.is_inference()


def test_half_precision_clip_on_the_cpu_is_read_in_place_and_widened_per_layer():
    """Forge keeps CLIP in fp16 even with --always-cpu / --cpu; CPU training computes in fp32. Each Linear
    reads Forge's fp16 tensor and widens it for one product at a time; the rest is a small fp32 copy."""
    from lora_trainer import quant

    sd_model, ref = make_forge_model(Family.SD1, clip_dtype=torch.float16)  # ref holds the fp16 values in fp32
    before = digest(forge_tensors(sd_model))
    bundle = forge_model.bundle_from_forge(sd_model, device=torch.device("cpu"))
    te = bundle.text_encoders[0]
    assert {p.dtype for p in te.parameters()} == {torch.float32}  # embeddings, norms, biases: fp32 copies
    layers = dict(quant.quant_layers(te))
    assert len(layers) == sum(1 for m in ref.text_encoders[0].modules() if type(m) is torch.nn.Linear)
    assert {layer.compute_dtype for layer in layers.values()} == {torch.float32}
    forge_ptrs = {t.untyped_storage().data_ptr() for t in forge_tensors(sd_model).values()}
    stored = quant.stored_tensors(te)
    assert {t.dtype for t in stored.values()} == {torch.float16}
    assert {t.untyped_storage().data_ptr() for t in stored.values()} <= forge_ptrs  # Forge's own fp16 tensors
    ids = bundle.tokenizers[0](["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # widening per layer computes what an fp32 copy of the fp16 weights computes
        torch.testing.assert_close(te(ids)[0], ref.text_encoders[0](ids)[0], rtol=0, atol=0)
    assert _storage_ptrs(bundle.unet) <= forge_ptrs  # the fp32 UNet is still shared
    assert 0.5 < forge_model.shared_fraction(bundle, sd_model) < 1.0  # embeddings (most of a tiny CLIP), norms, biases copied
    assert forge_model.widened_per_layer(bundle) == "text encoders fp16"
    assert digest(forge_tensors(sd_model)) == before


def _round_unet(ref, dtype: torch.dtype) -> None:
    """Round the reference UNet's weights to `dtype` (kept in fp32): what a half-precision copy holds."""
    with torch.no_grad():
        for p in ref.unet.parameters():
            p.copy_(p.to(dtype).float())


@pytest.mark.parametrize("unet_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_on_the_cpu_trains_as_an_fp32_copy_would(tmp_path, unet_dtype):
    """Neo's --bf16-unet / --fp16-unet on the CPU: the UNet's Linears are read from Neo's half tensors one
    layer at a time (no fp32 copy of them), and the run learns what it learns on an fp32 copy of them."""
    from safetensors.torch import load_file
    from train_support import make_dataset, tiny_config

    from lora_trainer import quant
    from lora_trainer.train import run_training

    ref = build_tiny_bundle(Family.SDXL, EPSILON, seed=3)
    _round_unet(ref, unet_dtype)
    half, _ = make_forge_model(Family.SDXL, clip_dtype=torch.float16, ref=ref, unet_dtype=unet_dtype)
    ref = build_tiny_bundle(Family.SDXL, EPSILON, seed=3)
    _round_unet(ref, unet_dtype)
    full, _ = make_forge_model(Family.SDXL, clip_dtype=torch.float16, ref=ref)  # the same values in fp32
    before = forge_tensors(half)
    before_digest = digest(before)
    bundle = forge_model.bundle_from_forge(half, device=torch.device("cpu"), name="tiny")
    forge_ptrs = {t.untyped_storage().data_ptr() for t in before.values()}
    stored = quant.stored_tensors(bundle.unet)
    linears = sum(1 for m in ref.unet.modules() if type(m) is torch.nn.Linear)
    assert len(dict(quant.quant_layers(bundle.unet))) == linears and not any(
        type(m) is torch.nn.Linear for m in bundle.unet.modules())
    assert {t.dtype for t in stored.values()} == {unet_dtype}
    assert {t.untyped_storage().data_ptr() for t in stored.values()} <= forge_ptrs
    assert next(bundle.unet.parameters()).dtype == torch.float32  # the engine trains in fp32 on the CPU
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[unet_dtype]
    assert forge_model.widened_per_layer(bundle) == f"UNet {name}, text encoders fp16"
    with torch.no_grad():  # the same numbers as the fp32 copy (the old way) gives
        copy = forge_model.bundle_from_forge(full, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
        cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.zeros(1, 6)}
        torch.testing.assert_close(bundle.unet(x, 10, ctx, added_cond_kwargs=cond).sample,
                                   copy.unet(x, 10, ctx, added_cond_kwargs=cond).sample, rtol=0, atol=0)
    del copy

    data = make_dataset(tmp_path / "data", n=2, repeats=1)
    loras = []
    for i, (sd_model, given) in enumerate(((half, bundle), (full, None))):
        given = given or forge_model.bundle_from_forge(sd_model, device=torch.device("cpu"), name="tiny")
        # eps 1: AdamW's step follows the gradient's size instead of its sign (comparable across runs whose
        # backward products differ in the last bits, as grad @ W and autograd's may)
        config = tiny_config(data, tmp_path / f"out{i}", max_steps=2, train_text_encoder=True, learning_rate=1e-1,
                             gradient_checkpointing=True, optimizer="AdamW", optimizer_args={"eps": 1.0})
        result = run_training(config, bundle=given)
        loras.append((result.losses, load_file(str(result.lora_path))))
    (loss_half, lora_half), (loss_full, lora_full) = loras
    assert loss_half == pytest.approx(loss_full, rel=1e-5)
    assert lora_half.keys() == lora_full.keys() and any(k.startswith("lora_unet_") for k in lora_half)
    ups = [v for k, v in lora_half.items() if k.endswith("lora_up.weight")]  # zero before training
    assert sum(1 for v in ups if v.abs().max() > 1e-5) > 0.8 * len(ups)  # it learned (up to ~5e-3)
    for k in lora_half:
        torch.testing.assert_close(lora_half[k], lora_full[k], rtol=1e-4, atol=1e-6)
    after = forge_tensors(half)
    assert digest(after) == before_digest  # Neo's half weights: bit-identical, the same tensors
    assert all(after[k] is before[k] and after[k].is_inference() for k in before)


def test_the_real_engine_trains_on_forge_weights_and_leaves_them_bit_identical(tmp_path):
    from train_support import make_dataset, tiny_config

    from lora_trainer.train import run_training

    sd_model, _ = make_forge_model(Family.SD1, clip_dtype=torch.float16)
    before = forge_tensors(sd_model)
    before_digest = digest(before)
    bundle = forge_model.bundle_from_forge(sd_model, device=torch.device("cpu"), name="tiny")
    data = make_dataset(tmp_path / "data", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", max_steps=2, train_text_encoder=True, learning_rate=1e-2)
    result = run_training(config, bundle=bundle)
    from safetensors import safe_open

    with safe_open(str(result.lora_path), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sd_v1"
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    after = forge_tensors(sd_model)
    assert digest(after) == before_digest
    assert all(after[k] is before[k] and after[k].is_inference() for k in before)
    forge_ptrs = {t.untyped_storage().data_ptr() for t in after.values()}
    assert _storage_ptrs(bundle.unet) <= forge_ptrs  # handed back as it came: still Forge's memory


def test_merged_lora_weights_are_restored_before_aliasing():
    sd_model, ref = make_forge_model(Family.SD1)
    fo = sd_model.forge_objects_original
    clean = dict(fo.unet.model.diffusion_model.named_parameters())["input_blocks.1.1.proj_in.weight"]
    fo.unet.merge_fake_lora("diffusion_model.input_blocks.1.1.proj_in.weight")
    fo.clip.patcher.merge_fake_lora("clip_l.transformer." + next(
        k for k, _ in fo.clip.cond_stage_model.clip_l.transformer.named_parameters() if k.endswith("q_proj.weight")))
    forge_model.restore_clean_weights(sd_model)
    assert fo.unet.refreshed == 1 and fo.clip.patcher.refreshed == 1
    bundle = forge_model.bundle_from_forge(sd_model)
    ours = bundle.unet.down_blocks[0].attentions[0].proj_in.weight
    assert ours.data_ptr() == clean.data_ptr()
    torch.testing.assert_close(ours, ref.unet.down_blocks[0].attentions[0].proj_in.weight, rtol=0, atol=0)


def test_reset_lora_state_makes_forge_rebuild_its_loras():
    sd_model, _ = make_forge_model(Family.SD1)
    sd_model.forge_objects = "patched"
    forge_model.reset_lora_state(sd_model)
    assert sd_model.current_lora_hash == "[]"
    assert sd_model.forge_objects.unet is sd_model.forge_objects_original.unet
    assert sd_model.forge_objects_after_applying_lora.clip is sd_model.forge_objects_original.clip


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "gguf"])
def test_low_bit_storage_is_refused_with_a_clear_message(dtype):
    sd_model, _ = make_forge_model(Family.SD1)
    out = sd_model.forge_objects_original.unet.model.diffusion_model.get_submodule("out.2")
    with torch.inference_mode():
        if dtype == "gguf":
            p = torch.nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
            p.gguf_cls = object
        else:
            if not hasattr(torch, dtype):
                pytest.skip("no fp8 in this torch")
            p = torch.nn.Parameter(out.weight.to(getattr(torch, dtype)), requires_grad=False)
    out.weight = p
    with pytest.raises(forge_model.LowBitModelError, match="low bits.*Automatic"):
        forge_model.bundle_from_forge(sd_model)


def test_schedule_and_prediction_type_come_from_the_predictor():
    sd_model, _ = make_forge_model(Family.SD1, V_PREDICTION)
    schedule, prediction = forge_model.schedule_of(sd_model.forge_objects_original.unet.model.predictor)
    assert prediction == V_PREDICTION and schedule.num_train_timesteps == 1000
    assert (schedule.beta_start, schedule.beta_end, schedule.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    sd_model.forge_objects_original.unet.model.predictor.prediction_type = "edm"
    with pytest.raises(UnsupportedModelError, match="predicts 'edm'"):
        forge_model.schedule_of(sd_model.forge_objects_original.unet.model.predictor)


def test_unsupported_families_are_refused():
    sd_model, _ = make_forge_model(Family.SD1)
    sd_model.is_sd1 = False
    with pytest.raises(UnsupportedModelError, match="not SD1, SD2 or SDXL"):
        forge_model.bundle_from_forge(sd_model)


# huggingface_guess's configs for the real families, as `huggingface_guess.guess()` (84826248) returns
# them for full-size SD1.5 / SD2 / SDXL UNets (checked against it; Forge stores them as unet.config).
_SD = {"model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "in_channels": 4, "out_channels": 4}
GUESS_REAL = {
    "sd15": (Family.SD1, {**_SD, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                          "transformer_depth_middle": 1, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
                          "use_linear_in_transformer": False, "adm_in_channels": None}),
    "sd2": (Family.SD2, {**_SD, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                         "transformer_depth_middle": 1, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64,
                         "use_linear_in_transformer": True, "adm_in_channels": None}),
    "sdxl": (Family.SDXL, {**_SD, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                           "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                           "context_dim": 2048, "num_heads": -1, "num_head_channels": 64,
                           "use_linear_in_transformer": True, "adm_in_channels": 2816}),
}
DIFFUSERS_REAL = {  # the fields of the published diffusers unet/config.json that decide the weights
    "sd15": {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "use_linear_projection": False,
             "layers_per_block": 2, "transformer_layers_per_block": 1},
    "sd2": {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024, "use_linear_projection": True, "transformer_layers_per_block": 1},
    "sdxl": {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
             "use_linear_projection": True},
}


@pytest.mark.parametrize("kind", sorted(GUESS_REAL))
def test_unet_config_matches_the_published_diffusers_configs(kind):
    family, guess = GUESS_REAL[kind]
    cfg = forge_model.diffusers_unet_config(guess, family)
    for key, value in DIFFUSERS_REAL[kind].items():
        assert cfg[key] == value, key


# ---------------------------------------------------------------- ForgeHost with stand-in `modules`
@pytest.fixture
def fake_forge(monkeypatch):
    """Just enough of Forge's `modules`/`backend` packages for ForgeHost's calls (mocked: no Forge here)."""
    sd_model, _ = make_forge_model(Family.SD1)
    calls = []

    def forge_model_reload():
        calls.append("reload")
        return sd_model, False

    state = SimpleNamespace(interrupted=False, stopping_generation=False, textinfo=None, job=None,
                            begin=lambda job: (calls.append(f"begin:{job}"), setattr(state, "interrupted", False)),
                            end=lambda: calls.append("end"))
    mods = {
        "modules_forge": types.ModuleType("modules_forge"),
        "modules": types.ModuleType("modules"),
        "modules.sd_models": SimpleNamespace(forge_model_reload=forge_model_reload),
        "modules.shared": SimpleNamespace(state=state, sd_model=sd_model, opts=SimpleNamespace(),
                                          cmd_opts=SimpleNamespace(lora_dir="/webui/models/Lora")),
        "modules.call_queue": SimpleNamespace(queue_lock=threading.Lock()),
        "modules.paths_internal": SimpleNamespace(data_path="/webui", models_path="/webui/models"),
        "backend": types.ModuleType("backend"),
        "backend.memory_management": SimpleNamespace(
            get_torch_device=lambda: torch.device("cpu"), soft_empty_cache=lambda: calls.append("empty_cache"),
            unload_all_models=lambda: calls.append("unload")),
    }
    mods["modules_forge"].__spec__ = mods["backend"].__spec__ = SimpleNamespace(name="x")
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    for pkg, sub in (("modules", "sd_models"), ("modules", "shared"), ("modules", "call_queue"),
                     ("modules", "paths_internal"), ("backend", "memory_management")):
        monkeypatch.setattr(mods[pkg], sub, mods[f"{pkg}.{sub}"], raising=False)
    monkeypatch.setattr(forge, "_importable", lambda name: name.split(".")[0] in ("modules_forge", "backend"))
    return SimpleNamespace(sd_model=sd_model, calls=calls, state=state)


def test_forge_host_trains_on_the_loaded_model_and_resets_after(fake_forge):
    host = forge.ForgeHost()
    assert forge.is_forge() and host.name == "forge"
    sd_model = fake_forge.sd_model
    fo = sd_model.forge_objects_original
    before = digest(forge_tensors(sd_model))
    with host.gpu_lock():
        bundle = host.acquire_model(SimpleNamespace(model=""))
        assert fake_forge.calls[:2] == ["reload", "begin:Training a LoRA"]
        assert fo.unet.refreshed == 1 and fo.clip.patcher.refreshed == 1
        assert bundle.name == "tiny" and bundle.model_hash == "ab" * 32
        assert bundle.source == "forge:/models/tiny.safetensors"
        host.report(SimpleNamespace(step=2, total_steps=4, loss=0.5))
        assert fake_forge.state.sampling_step == 2 and "2/4" in fake_forge.state.textinfo
        assert not host.interrupted()
        fake_forge.state.interrupted = True
        assert host.interrupted()
        host.release_model(bundle)
    assert bundle.unet is None and bundle.text_encoders == []
    assert "end" in fake_forge.calls and sd_model.current_lora_hash == "[]"
    assert digest(forge_tensors(sd_model)) == before
    assert not host.interrupted()  # only our run listens to the Interrupt button
    assert str(host.lora_dir()) == "/webui/models/Lora"
    assert host.tagger_cache_dir().as_posix().endswith("models/lora_trainer/tagger")


def test_forge_host_loads_another_checkpoint_from_disk(fake_forge, fake_loader, tmp_path):
    """A model path other than the loaded checkpoint is loaded from the file (Forge's models unloaded)."""
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x")
    host = forge.ForgeHost()
    bundle = host.acquire_model(SimpleNamespace(model=str(other)))
    assert fake_loader and fake_loader[0][0] == other and "unload" in fake_forge.calls
    host.release_model(bundle)
    assert sd_model_untouched(fake_forge.sd_model)


@pytest.fixture
def fake_loader(monkeypatch):
    """models.loader.load_model replaced by a tiny model (the real loader is tested in test_models_loader)."""
    loaded = []
    module = types.ModuleType("lora_trainer.models.loader")
    module.load_model = lambda path, **kw: loaded.append((path, kw)) or build_tiny_bundle(Family.SD1)
    module.check_model_header = lambda path, **kw: None  # what it says of a .ckpt: only loading can tell
    monkeypatch.setitem(sys.modules, "lora_trainer.models.loader", module)
    return loaded


def test_low_bit_weights_train_from_the_checkpoint_file(fake_forge, fake_loader, tmp_path, capsys):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    sd_model = fake_forge.sd_model
    sd_model.filename = str(ckpt)
    out = sd_model.forge_objects_original.unet.model.diffusion_model.get_submodule("out.2")
    with torch.inference_mode():
        out.weight = torch.nn.Parameter(out.weight.to(torch.float8_e4m3fn), requires_grad=False)
    host = forge.ForgeHost()
    bundle = host.acquire_model(SimpleNamespace(model=""))
    assert fake_loader[0][0] == ckpt and "unload" in fake_forge.calls
    assert "low bits" in capsys.readouterr().out and "loading model.safetensors from disk" in host.last_notes[0]
    host.release_model(bundle)
    assert sd_model.current_lora_hash != "[]"  # Forge's own model was not touched


def test_on_the_cpu_the_file_fallback_reads_half_linears_from_the_mapped_file(fake_forge, fake_loader, tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    host = forge.ForgeHost()
    host._load_file(str(ckpt), reason="test")
    assert fake_loader[0][1]["dtype"] is None and fake_loader[0][1]["device"] is None  # as stored, memory-mapped


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_widen_half_linears_computes_what_an_fp32_load_computes(tmp_path, dtype):
    """The CPU fallback: a half-precision file loaded as stored, its Linears widened per layer, the rest fp32."""
    from safetensors.torch import load_file, save_file

    from lora_trainer import quant
    from lora_trainer.models.loader import load_model
    from lora_trainer.models.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path, "sdxl", seed=2)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}, str(path))
    full = load_model(path, dtype=torch.float32, device="cpu")
    bundle = forge_model.widen_half_linears(load_model(path, dtype=None, device=None))
    for ours, theirs in ((bundle.unet, full.unet), (bundle.vae, full.vae),
                         *zip(bundle.text_encoders, full.text_encoders)):
        assert {p.dtype for p in ours.parameters()} == {torch.float32} and not any(
            p.requires_grad for p in ours.parameters())
        n_linear = sum(1 for m in theirs.modules() if type(m) is torch.nn.Linear)
        assert n_linear and len(dict(quant.quant_layers(ours))) == n_linear
        assert {t.dtype for t in quant.stored_tensors(ours).values()} == {dtype}
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.zeros(1, 6)}
    ids = bundle.tokenizers[0](["a photo"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(bundle.unet(x, 10, ctx, added_cond_kwargs=cond).sample,
                                   full.unet(x, 10, ctx, added_cond_kwargs=cond).sample, rtol=0, atol=0)
        torch.testing.assert_close(bundle.vae.decode(x).sample, full.vae.decode(x).sample, rtol=0, atol=0)
        for ours, theirs in zip(bundle.text_encoders, full.text_encoders):
            torch.testing.assert_close(ours(ids)[0], theirs(ids)[0], rtol=0, atol=0)


def test_older_forge_backends_train_from_the_selected_file(fake_forge, fake_loader, monkeypatch, tmp_path):
    """reForge / Forge Classic: `modules_forge` but no `backend/` -> the checkpoint file."""
    ckpt = tmp_path / "classic.safetensors"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(forge, "_importable", lambda name: name == "modules_forge")
    fake_forge.sd_model.sd_checkpoint_info.filename = str(ckpt)
    host = forge.ForgeHost()
    assert forge.is_forge() and not forge.has_forge_backend()
    bundle = host.acquire_model(SimpleNamespace(model=""))
    assert fake_loader[0][0] == ckpt and "reload" not in fake_forge.calls
    host.release_model(bundle)


def sd_model_untouched(sd_model) -> bool:
    return sd_model.forge_objects_original.unet.refreshed == 0


def test_install_on_forge_adds_at_most_onnxruntime(monkeypatch):
    monkeypatch.setattr(forge, "_importable", lambda name: name != "onnxruntime")
    assert forge.forge_install_requirements() == ["onnxruntime"]
    monkeypatch.setattr(forge, "_importable", lambda name: True)
    assert forge.forge_install_requirements() == []


def test_not_forge_here():
    assert not forge.is_forge()
