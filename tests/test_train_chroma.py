"""Chroma training on tiny real Chroma-architecture models (our BFL-layout ChromaTransformer, transformers T5,
diffusers AutoencoderKL, peft adapters) on the CPU: kohya's `--model_type chroma` objective (T5 attention mask,
guidance 0), learning, stop/resume, the CLI with separate T5 and VAE files, the exported LoRA read back by
diffusers' ChromaPipeline.load_lora_weights (where diffusers has Chroma) and our sampler against ChromaPipeline."""

from __future__ import annotations

import logging
import threading
import warnings

import pytest
import torch
from flux_support import check_lora_learns, flux_config, requires_flux_diffusers, two_bucket_data
from train_support import lora_tensors

from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.lora import LoraSpec, find_targets, inject_lora, load_kohya_file, read_lora_info
from lora_trainer.lora.network import ADAPTER
from lora_trainer.models import Family
from lora_trainer.models.flux import image_ids, pack_latents, text_ids, unpack_latents
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle, write_tiny_flux_checkpoint
from lora_trainer.train import run_training
from lora_trainer.train.cache import cache_latents
from lora_trainer.train.data import epoch_batches
from lora_trainer.train.engine import prepare_dataset
from lora_trainer.train.family import family_for

pytestmark = requires_flux_diffusers


def _diffusers_chroma():
    import diffusers

    if not hasattr(diffusers, "ChromaPipeline"):
        pytest.skip(f"diffusers {diffusers.__version__} has no ChromaPipeline (0.35+)")
    return diffusers


def _config(data, out, **kw):
    return flux_config(data, out, **{"timestep_sampling": "sigmoid", **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return two_bucket_data(tmp_path_factory, "chroma-data")


def _twin(transformer):
    from lora_trainer.models.flux import convert as cv

    diffusers = _diffusers_chroma()
    p = transformer.params
    model = diffusers.ChromaTransformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=list(p.axes_dim), approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden_size, approximator_layers=p.approximator_depth)
    model.load_state_dict(cv.bfl_to_diffusers(transformer.state_dict(), p.hidden_size))
    return model.eval()


def _encode(bundle, captions, length=32):
    """kohya's FluxTextEncodingStrategy with apply_t5_attn_mask: the tokenizer's mask goes into T5."""
    tok = bundle.tokenizers[0](captions, max_length=length, padding="max_length", truncation=True,
                               return_tensors="pt")
    with torch.no_grad():
        hidden = bundle.text_encoders[0](tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    return hidden, tok.attention_mask


def _model_call(bundle, x0, noise, sigma, hidden, mask):
    b, _, h, w = x0.shape
    noisy = (1 - sigma) * x0 + sigma * noise
    with torch.no_grad():  # guidance 0 into the approximator (kohya: required for Chroma)
        pred = bundle.unet(img=pack_latents(noisy), img_ids=image_ids(b, h, w), txt=hidden,
                           txt_ids=text_ids(b, hidden.shape[1]), timesteps=sigma.flatten(),
                           guidance=torch.zeros(b), txt_mask=mask)
    return unpack_latents(pred, h, w)


# ------------------------------------------------------------------ objective, metadata
def test_first_step_loss_is_kohyas_chroma_loss(tmp_path, data):
    bundle = build_tiny_flux_bundle("chroma", seed=2)
    config = _config(data, tmp_path / "o", max_steps=1, epochs=0, learning_rate=1e-6)
    result = run_training(config, bundle=bundle)

    # Step 1 by hand: noise, σ = sigmoid(N(0,1)), x_σ = (1-σ)x0 + σε, target ε - x0, masked T5, guidance 0
    dataset, _ = prepare_dataset(config)
    latents = cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=config.seed,
                            shift_factor=bundle.shift_factor)
    k = epoch_batches(dataset, 1, config.seed, 0)[0][0]
    torch.manual_seed(config.seed)
    x0 = latents[k].latent[None]
    noise = torch.randn_like(x0)
    sigma = torch.sigmoid(torch.randn(1)).view(-1, 1, 1, 1)
    hidden, mask = _encode(bundle, [dataset.items[k].caption])
    expected = torch.nn.functional.mse_loss(_model_call(bundle, x0, noise, sigma, hidden, mask), noise - x0).item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)
    # without the T5 mask it would be another number: the mask is really applied
    _, unmasked = _encode(bundle, [dataset.items[k].caption])
    unmasked = torch.ones_like(unmasked)
    other = torch.nn.functional.mse_loss(_model_call(bundle, x0, noise, sigma, hidden, unmasked), noise - x0).item()
    assert other != pytest.approx(expected, rel=1e-5)

    tensors, md = load_kohya_file(result.lora_path)
    assert md["ss_base_model_version"] == "chroma" and md["modelspec.architecture"] == "chroma/lora"
    assert md["ss_model_type"] == "chroma" and md["ss_apply_t5_attn_mask"] == "True"
    assert md["ss_guidance_scale"] == "0.0" and md["ss_timestep_sampling"] == "sigmoid"
    assert md["ss_network_module"] == "networks.lora_flux"
    assert read_lora_info(result.lora_path).family is Family.CHROMA
    assert {k.split(".")[0] for k in tensors} == {t.kohya_name for t in find_targets(bundle, text_encoder=False)}


def _eval_loss(bundle, latents, conds, seed=0, n=8) -> float:
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for x0, (hidden, mask) in zip(latents, conds):
        for _ in range(n):
            noise = torch.randn(x0.shape, generator=g)[None]
            sigma = torch.rand(1, generator=g).view(-1, 1, 1, 1) * 0.8 + 0.1
            pred = _model_call(bundle, x0[None], noise, sigma, hidden, mask)
            total += torch.nn.functional.mse_loss(pred, noise - x0[None]).item()
    return total / (len(latents) * n)


def test_chroma_lora_learns_the_data(tmp_path):
    def encode(bundle, config, dataset):
        return [_encode(bundle, [i.caption]) for i in dataset.items]

    check_lora_learns(tmp_path, "chroma", _config, encode, _eval_loss)


def test_stop_then_resume_equals_uninterrupted_run(tmp_path, data):
    common = {"epochs": 2, "save_every_n_epochs": 1, "blocks_to_swap": 2, "gradient_checkpointing": True,
              "flip_aug": True}
    full = run_training(_config(data, tmp_path / "a", **common), bundle=build_tiny_flux_bundle("chroma", seed=7),
                        owns_bundle=True)
    assert full.steps == 8
    out = tmp_path / "b"
    stop = threading.Event()
    first = run_training(_config(data, out, **common), bundle=build_tiny_flux_bundle("chroma", seed=7),
                         owns_bundle=True, stop=stop,
                         on_event=lambda e: stop.set() if e.kind == "step" and e.step == 3 else None)
    assert first.stopped and first.steps == 3
    resumed = run_training(_config(data, out, resume=str(first.state_dir), **common),
                           bundle=build_tiny_flux_bundle("chroma", seed=7), owns_bundle=True)
    assert resumed.losses == full.losses
    a, b = lora_tensors(full.lora_path), lora_tensors(resumed.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_clip_training_is_refused_for_chroma(tmp_path, data):
    with pytest.raises(ConfigError, match="Chroma has no CLIP-L"):
        run_training(_config(data, tmp_path / "o", max_steps=1, epochs=0, train_text_encoder=True),
                     bundle=build_tiny_flux_bundle("chroma"))


# ------------------------------------------------------------------ CLI, files on disk
def test_cli_trains_chroma_from_files(tmp_path, data, capsys):
    model = write_tiny_flux_checkpoint(tmp_path / "models" / "unet", "chroma", seed=3)
    parts = tmp_path / "parts"
    parts.mkdir()
    for name in ("t5xxl.safetensors", "ae.safetensors"):  # given with --t5/--vae, not found beside the model
        (model.parent / name).rename(parts / name)
    out = tmp_path / "o"
    rc = main(["train", "--model", str(model), "--t5", str(parts / "t5xxl.safetensors"), "--vae",
               str(parts / "ae.safetensors"), "--data", str(data), "--out", str(out), "--name", "chr",
               "--max-steps", "2", "--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128",
               "--bucket-reso-steps", "32", "--rank", "4", "--device", "cpu", "--t5-max-token-length", "32",
               "--timestep-sampling", "sigmoid"])
    assert rc == 0, capsys.readouterr()
    tensors, md = load_kohya_file(out / "chr.safetensors")
    assert md["ss_base_model_version"] == "chroma" and md["ss_model_type"] == "chroma"
    assert md["ss_sd_model_name"] == model.name
    # our own key check: every key is one of kohya's lora_flux names for Chroma, and all of them are there
    fresh = build_tiny_flux_bundle("chroma", seed=3)
    names = {t.kohya_name for t in find_targets(fresh, text_encoder=False)}
    assert {k.split(".")[0] for k in tensors} == names
    network = inject_lora(fresh, LoraSpec.from_kohya_state_dict(tensors))
    report = network.load_kohya_state_dict(tensors, strict=True)
    assert not report.unexpected and not report.missing and len(report.loaded) == len(names)
    network.remove()


# ------------------------------------------------------------------ diffusers as the reader
def _train_a_little(network, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in network.layers.values():
            up = layer.lora_B[ADAPTER].weight
            up.copy_(torch.randn(up.shape, generator=g) * 0.05)


def _lora_layers(module) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in module.modules() if isinstance(m, BaseTunerLayer) and m.active_adapters)


def _check_diffusers_load(bundle, tmp_path, caplog, splits):
    from lora_trainer.lora import TrainingFacts, build_metadata

    diffusers = _diffusers_chroma()
    twin = _twin(bundle.unet)
    network = inject_lora(bundle, LoraSpec(rank=4, alpha=2, train_text_encoder=False), seed=1)
    _train_a_little(network)
    path = tmp_path / "chroma_lora.safetensors"
    network.save_kohya(path, build_metadata(bundle, network.spec, TrainingFacts(output_name="chroma_lora")),
                       dtype=torch.float32)
    pipe = diffusers.ChromaPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=bundle.vae,
                                    text_encoder=bundle.text_encoders[0], tokenizer=bundle.tokenizers[0],
                                    transformer=twin)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="ours")
    complaints = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    complaints = [c for c in complaints if not c.startswith("No LoRA keys associated to T5EncoderModel")]
    assert not [c for c in complaints if any(w in c.lower() for w in ("unexpected", "unsupported", "missing",
                                                                       "not loaded", "incompatible"))], complaints
    assert _lora_layers(pipe.transformer) == sum(splits.get(t.kohya_name.rsplit("_", 2)[-2] + "_" +
                                                            t.kohya_name.rsplit("_", 1)[-1], 1)
                                                 for t in network.targets)
    g = torch.Generator().manual_seed(1)
    p = bundle.unet.params
    mask = torch.zeros(2, 6, dtype=torch.long)
    mask[0, :2], mask[1, :5] = 1, 1
    x = {"img": torch.randn(2, 16, p.in_channels, generator=g), "img_ids": image_ids(2, 8, 8),
         "txt": torch.randn(2, 6, p.context_in_dim, generator=g), "txt_ids": text_ids(2, 6),
         "timesteps": torch.rand(2, generator=g), "txt_mask": mask}
    keep = torch.arange(6)[None] <= mask.sum(1)[:, None]  # ChromaPipeline's mask: caption + one padding token
    with torch.no_grad():
        ours = bundle.unet(**x)
        theirs = pipe.transformer(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                                  img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                                  attention_mask=torch.cat([keep, torch.ones(2, 16, dtype=torch.bool)], 1),
                                  return_dict=False)[0]
        network.set_multiplier(0.0)
        base = bundle.unet(**x)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base, ours, atol=1e-4)  # the LoRA really changes the output
    return network


def test_double_blocks_load_in_diffusers_chroma_pipeline(tmp_path, caplog):
    bundle = build_tiny_flux_bundle("chroma", seed=0, depth=2, depth_single=0)
    _check_diffusers_load(bundle, tmp_path, caplog, {"attn_qkv": 3})


@pytest.mark.slow  # diffusers' converter hard-codes the 3072 width of single blocks: one full-width block, ~10 s
def test_single_block_at_full_width_loads_in_diffusers_chroma_pipeline(tmp_path, caplog):
    bundle = build_tiny_flux_bundle("chroma", seed=2, depth=0, depth_single=1, hidden=3072, num_heads=24)
    network = _check_diffusers_load(bundle, tmp_path, caplog, {"0_linear1": 4})
    assert [t.kohya_name for t in network.targets] == ["lora_unet_single_blocks_0_linear1",
                                                       "lora_unet_single_blocks_0_linear2"]


# ------------------------------------------------------------------ sampler
def test_sampler_equals_diffusers_chroma_pipeline():
    """Our Euler loop with classifier-free guidance and guidance 0 gives ChromaPipeline's latents (its
    scheduler with the resolution shift, the transformer converted to diffusers' layout).

    ChromaPipeline (diffusers 0.42) encodes the prompts as we do (T5 with the tokenizer's mask) but builds the
    transformer's mask in the float dtype, which attention treats as an additive bias, not a mask; so its own
    prompt embeddings go back in with the same masks as booleans (what kohya and Chroma's reference apply)."""
    from lora_trainer.train.flux_sampling import denoise

    diffusers = _diffusers_chroma()
    bundle = build_tiny_flux_bundle("chroma", seed=10)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                          max_shift=1.15, base_image_seq_len=256,
                                                          max_image_seq_len=4096)
    pipe = diffusers.ChromaPipeline(scheduler=scheduler, vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                    tokenizer=bundle.tokenizers[0], transformer=_twin(bundle.unet))
    pipe.set_progress_bar_config(disable=True)
    embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
        prompt="a red circle", negative_prompt="blurry", do_classifier_free_guidance=True, device="cpu",
        max_sequence_length=512)
    family = family_for(bundle)
    cond = family.encode_text(bundle, ["a red circle"])
    torch.testing.assert_close(cond["t5"], embeds, rtol=1e-5, atol=1e-5)
    assert int(mask.sum()) == int(cond["t5_mask"].sum()) + 1  # the caption and one padding token
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = denoise(bundle, family, "a red circle", noise, steps=4, guidance=0.0, cfg_scale=4.0,
                   negative_prompt="blurry")
    theirs = pipe(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=negative,
                  negative_prompt_attention_mask=negative_mask.bool(), height=64, width=64, num_inference_steps=4,
                  guidance_scale=4.0, latents=pack_latents(noise), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_samples_during_training(tmp_path, data):
    result = run_training(_config(data, tmp_path / "o", epochs=1, sample_prompts=["a circle"],
                                  sample_every_n_epochs=1, sample_steps=2, sample_cfg_scale=4.0,
                                  sample_negative_prompt="blurry"),
                          bundle=build_tiny_flux_bundle("chroma"))
    from PIL import Image

    assert [p.name for p in result.samples] == ["tiny_e000001_00.png"]
    assert Image.open(result.samples[0]).size == (64, 64)
