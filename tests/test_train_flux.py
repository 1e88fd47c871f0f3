"""Flux.1 training on tiny real Flux-architecture models (our BFL transformer, transformers CLIP-L and T5,
diffusers AutoencoderKL, peft adapters) on the CPU: kohya's objective, learning, stop/resume, caches,
the sampler against diffusers' FluxPipeline, and the memory plan (fp8 base, block swap) against the
plain run."""



from __future__ import annotations

import threading

import pytest
import torch
from flux_support import check_lora_learns, flux_config, requires_flux_diffusers, two_bucket_data
from train_support import lora_tensors

from lora_trainer.errors import ConfigError
from lora_trainer.lora import load_kohya_file
from lora_trainer.models.flux import image_ids, pack_latents, text_ids, unpack_latents
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
from lora_trainer.train import flow, run_training
from lora_trainer.train.cache import cache_latents
from lora_trainer.train.data import epoch_batches
from lora_trainer.train.engine import prepare_dataset
from lora_trainer.train.family import family_for

pytestmark = requires_flux_diffusers


def _config(data, out, **kw):
    return flux_config(data, out, **{"sample_cfg_scale": 3.5, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_bucket_data(tmp_path_factory, "flux-data")


def _model_call(bundle, x0, noise, sigma, cond, guidance=1.0):
    b, _, h, w = x0.shape
    noisy = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():
        pred = bundle.unet(img=pack_latents(noisy), img_ids=image_ids(b, h, w), txt=cond["t5"],
                           txt_ids=text_ids(b, cond["t5"].shape[1]), timesteps=sigma.flatten(), y=cond["pooled"],
                           guidance=torch.full((b,), guidance))
    return unpack_latents(pred, h, w)


# ------------------------------------------------------------------ objective
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_first_step_loss_is_kohyas_flow_matching_loss(tmp_path, data, variant):
    bundle = build_tiny_flux_bundle(variant, seed=2)
    config = _config(data, tmp_path / "o", max_steps=1, epochs=0, learning_rate=1e-6)
    result = run_training(config, bundle=bundle)

    # Redo step 1 by hand with kohya's formulas: noise, then σ = shift(sigmoid(N(0,1))), x_σ = (1-σ)x0 + σε,
    # target ε - x0, raw prediction; the LoRA starts as the identity (up = 0).
    dataset, _ = prepare_dataset(config)
    latents = cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=config.seed,
                            shift_factor=bundle.shift_factor)
    k = epoch_batches(dataset, 1, config.seed, 0)[0][0]
    torch.manual_seed(config.seed)
    x0 = latents[k].latent[None]
    noise = torch.randn_like(x0)
    s = torch.sigmoid(torch.randn(1))
    sigma = (3.1582 * s / (1 + 2.1582 * s)).view(-1, 1, 1, 1)
    family = family_for(bundle, config)
    with torch.no_grad():
        cond = family.encode_text(bundle, [dataset.items[k].caption])
    pred = _model_call(bundle, x0, noise, sigma, cond)
    expected = torch.nn.functional.mse_loss(pred, noise - x0).item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    tensors, md = load_kohya_file(result.lora_path)
    assert md["ss_base_model_version"] == "flux1" and md["ss_timestep_sampling"] == "shift"
    assert md["ss_discrete_flow_shift"] == "3.1582" and md["ss_guidance_scale"] == "1.0"
    assert md["ss_model_prediction_type"] == "raw" and md["ss_model_type"] == "flux"
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in tensors)


def _eval_loss(bundle, latents, conds, seed=0, n=8) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for x0, cond in zip(latents, conds):
        for _ in range(n):
            noise = torch.randn(x0.shape, generator=g)[None]
            sigma = torch.rand(1, generator=g).view(-1, 1, 1, 1) * 0.8 + 0.1
            pred = _model_call(bundle, x0[None], noise, sigma, cond)
            total += torch.nn.functional.mse_loss(pred, noise - x0[None]).item()
    return total / (len(latents) * n)


def test_flux_lora_learns_the_data(tmp_path):
    def encode(bundle, config, dataset):
        family = family_for(bundle, config)
        with torch.no_grad():
            return [family.encode_text(bundle, [i.caption]) for i in dataset.items]

    check_lora_learns(tmp_path, "dev", _config, encode, _eval_loss)


# ------------------------------------------------------------------ memory plan: same numbers
def test_block_swap_fp8_and_checkpointing_keep_the_arithmetic(tmp_path, data, monkeypatch):
    """Block swap and checkpointing change nothing (exact); fp8 base weights stay close to the full-precision
    run (per-row fp8 rounding of the frozen weights only)."""
    common = {"epochs": 1, "gradient_checkpointing": True}
    plain = run_training(_config(data, tmp_path / "a", **common), bundle=build_tiny_flux_bundle("dev", seed=6),
                         owns_bundle=True)
    swapped = run_training(_config(data, tmp_path / "b", blocks_to_swap=3, **common),
                           bundle=build_tiny_flux_bundle("dev", seed=6), owns_bundle=True)
    assert swapped.losses == plain.losses
    a, b = lora_tensors(plain.lora_path), lora_tensors(swapped.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    offloaded = run_training(_config(data, tmp_path / "e", blocks_to_swap=5, cpu_offload_checkpointing=True, **common),
                             bundle=build_tiny_flux_bundle("dev", seed=6), owns_bundle=True)
    assert offloaded.losses == plain.losses
    c = lora_tensors(offloaded.lora_path)
    assert all(torch.equal(a[k], c[k]) for k in a)
    fp8 = run_training(_config(data, tmp_path / "c", fp8_base=True, **common),
                       bundle=build_tiny_flux_bundle("dev", seed=6), owns_bundle=True)
    fp8_swap = run_training(_config(data, tmp_path / "d", fp8_base=True, blocks_to_swap=3, **common),
                            bundle=build_tiny_flux_bundle("dev", seed=6), owns_bundle=True)
    assert fp8_swap.losses == fp8.losses
    torch.testing.assert_close(torch.tensor(fp8.losses), torch.tensor(plain.losses), rtol=5e-2, atol=1e-3)
    assert fp8.losses != plain.losses  # the fp8 weights were really used
    # accel's default keeps the weights a checkpoint's recomputation dequantised for the block's backward; without
    # it they are dequantised again: the same numbers
    from lora_trainer.quant import linear as quant_linear

    kept = []
    keeps = quant_linear._keeps_weight
    monkeypatch.setattr(quant_linear, "_keeps_weight", lambda compute8: kept.append(keeps(compute8)) or kept[-1])
    config = _config(data, tmp_path / "f", fp8_base=True, **common)
    config.keep_recomputed_weights = False  # an accel switch (AccelOptions.from_config), not a TrainConfig field
    fp8_again = run_training(config, bundle=build_tiny_flux_bundle("dev", seed=6), owns_bundle=True)
    assert not any(kept) and fp8_again.losses == fp8.losses
    d, e = lora_tensors(fp8.lora_path), lora_tensors(fp8_again.lora_path)
    assert all(torch.equal(d[k], e[k]) for k in d)
    kept.clear()
    run_training(_config(data, tmp_path / "g", fp8_base=True, epochs=1, gradient_checkpointing=True),
                 bundle=build_tiny_flux_bundle("dev", seed=6), owns_bundle=True)
    assert any(kept)


def test_memory_plan_places_blocks_in_fp8_and_swaps_them(tmp_path, data):
    from lora_trainer.accel.swap import BlockSwapper
    from lora_trainer.quant import QuantLinear
    from lora_trainer.train.placement import Placement

    bundle = build_tiny_flux_bundle("dev", seed=6)
    config = _config(data, tmp_path / "o", fp8_base=True, blocks_to_swap=2)
    family = family_for(bundle, config)
    plan = family.placement(bundle, Placement(bundle, "cpu", torch.float32), torch.device("cpu"), config, True)
    plan.text_encoders()
    plan.denoiser()
    model = bundle.unet
    assert plan.quantizes_base and [type(s) for s in plan.swappers] == [BlockSwapper, BlockSwapper]
    assert [s.order for s in plan.swappers] == [[1], [0, 1]]  # kohya's 2: one double, two single blocks
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == sum(1 for b in (*model.double_blocks, *model.single_blocks) for _ in
                             (m for m in b.modules() if isinstance(m, torch.nn.Linear)))
    assert all(m.frozen.data.dtype == torch.float8_e4m3fn for m in quant)
    assert type(model.img_in) is torch.nn.Linear  # outside the blocks: full precision
    t5_quant = [m for m in bundle.text_encoders[1].modules() if isinstance(m, QuantLinear)]
    assert t5_quant  # T5 in fp8 with fp8_base, as kohya advises for small cards
    plan.close()


# ------------------------------------------------------------------ stop / resume, caches
def test_stop_then_resume_equals_uninterrupted_run(tmp_path, data):
    common = {"epochs": 2, "save_every_n_epochs": 1, "blocks_to_swap": 2, "gradient_checkpointing": True,
              "flip_aug": True}
    full = run_training(_config(data, tmp_path / "a", **common), bundle=build_tiny_flux_bundle("dev", seed=7),
                        owns_bundle=True)
    assert full.steps == 8
    out = tmp_path / "b"
    stop = threading.Event()
    first = run_training(_config(data, out, **common), bundle=build_tiny_flux_bundle("dev", seed=7), owns_bundle=True,
                         on_event=lambda e: stop.set() if e.kind == "step" and e.step == 3 else None, stop=stop)
    assert first.stopped and first.steps == 3
    resumed = run_training(_config(data, out, resume=str(first.state_dir), **common),
                           bundle=build_tiny_flux_bundle("dev", seed=7), owns_bundle=True)
    assert resumed.losses == full.losses
    a, b = lora_tensors(full.lora_path), lora_tensors(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_outputs_cached_on_disk_skip_the_encoders(tmp_path, data):
    calls = []
    cache = tmp_path / "cache"

    def run(out):
        bundle = build_tiny_flux_bundle("dev", seed=8)
        handles = [te.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
                   for te in bundle.text_encoders]
        try:
            # validation off: a leak-check set's captions would be cached too (test_train_flux_t5 counts the cache)
            return run_training(_config(data, out, max_steps=2, epochs=0, cache_latents_to_disk=True,
                                        latent_cache_dir=str(cache), validate_every_n_epochs=0), bundle=bundle)
        finally:
            for h in handles:
                h.remove()

    first = run(tmp_path / "a")
    assert sorted(set(calls)) == ["CLIPTextModel", "T5EncoderModel"]
    assert len(list((cache / "text").glob("*.safetensors"))) == 2  # one file per caption
    calls.clear()
    second = run(tmp_path / "b")
    assert calls == [] and second.losses == first.losses
    # a changed caption is encoded again (only that one)
    (data / "img" / "2_shape" / "00.txt").write_text("shape, circle, colour 0, edited", encoding="utf-8")
    try:
        run(tmp_path / "c")
        assert calls.count("T5EncoderModel") == 1
    finally:
        (data / "img" / "2_shape" / "00.txt").write_text("shape, circle, colour 0", encoding="utf-8")


def test_shuffled_captions_and_clip_training_encode_per_step(tmp_path, data):
    bundle = build_tiny_flux_bundle("dev", seed=9)
    result = run_training(_config(data, tmp_path / "o", max_steps=2, epochs=0, shuffle_caption=True,
                                  train_text_encoder=True, gradient_checkpointing=True), bundle=bundle)
    tensors, _ = load_kohya_file(result.lora_path)
    assert any(k.startswith("lora_te1_") for k in tensors) and not any(k.startswith("lora_te3_") for k in tensors)
    assert all(torch.isfinite(torch.tensor(result.losses)))


# ------------------------------------------------------------------ sampler
def test_sampler_equals_diffusers_flux_pipeline():
    """Our Euler loop on the BFL transformer gives FluxPipeline's latents (its own scheduler, shift for the
    resolution, the transformer converted to diffusers' layout)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from lora_trainer.models.flux import convert as cv
    from lora_trainer.train.flux_sampling import denoise

    bundle = build_tiny_flux_bundle("dev", seed=10)
    p = bundle.unet.params
    twin = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=list(p.axes_dim))
    twin.load_state_dict(cv.bfl_to_diffusers(bundle.unet.state_dict(), p.hidden_size))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                        tokenizer=bundle.tokenizers[0], text_encoder_2=bundle.text_encoders[1],
                        tokenizer_2=bundle.tokenizers[1], transformer=twin.eval())
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    family = family_for(bundle)
    ours = denoise(bundle, family, "a red circle", noise, steps=4, guidance=3.5)
    theirs = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                  latents=pack_latents(noise), output_type="latent", max_sequence_length=512).images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_samples_during_training(tmp_path, data):
    events = []
    result = run_training(_config(data, tmp_path / "o", epochs=1, sample_prompts=["a circle", "a square"],
                                  sample_every_n_epochs=1, sample_steps=3), bundle=build_tiny_flux_bundle("schnell"),
                          on_event=events.append)
    assert [p.name for p in result.samples] == ["tiny_e000001_00.png", "tiny_e000001_01.png"]
    from PIL import Image

    assert Image.open(result.samples[0]).size == (64, 64)
    steps = [(e.phase_done, e.phase_total) for e in events if e.kind == "phase" and e.phase == "sample"]
    assert steps[-1] == (6, 6)


# ------------------------------------------------------------------ settings
@pytest.mark.parametrize("setting, match", [({"min_snr_gamma": 5.0}, "min_snr_gamma.*SD models"),
                                            ({"noise_offset": 0.05}, "noise_offset"),
                                            ({"clip_skip": 2}, "clip_skip does not apply to Flux"),
                                            ({"resolution": 72, "enable_bucket": False}, "divisible by 16"),
                                            ({"bucket_reso_steps": 8, "min_bucket_reso": 32}, "bucket_reso_steps")])
def test_sd_only_settings_are_refused_for_flux(tmp_path, data, setting, match):
    with pytest.raises(ConfigError, match=match):
        run_training(_config(data, tmp_path / "o", max_steps=1, epochs=0, **setting),
                     bundle=build_tiny_flux_bundle("dev"))


def test_flow_objective_draws_in_kohyas_order():
    from types import SimpleNamespace

    from lora_trainer.train.family_flux import FlowObjective, kohya_swap_split

    cfg = SimpleNamespace(timestep_sampling="sigmoid", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                          weighting_scheme="cosmap", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                          model_prediction_type="sigma_scaled")
    latents = torch.zeros(2, 16, 8, 8)
    torch.manual_seed(0)
    out = FlowObjective(cfg, torch.device("cpu")).draw(latents)
    torch.manual_seed(0)
    noise = torch.randn_like(latents)
    sig = torch.sigmoid(torch.randn(2))
    assert torch.equal(out["noise"], noise) and torch.equal(out["sigmas"], sig)
    torch.testing.assert_close(out["weights"], flow.loss_weighting("cosmap", sig))
    assert kohya_swap_split(16) == (8, 16) and kohya_swap_split(28) == (14, 28) and kohya_swap_split(38) == (19, 38)
