"""The training engine on tiny real models (diffusers UNet/VAE, transformers CLIP, peft adapters)."""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import hashlib
import shutil
import threading

import pytest
import torch
from train_support import lora_tensors, make_dataset, tiny_config, tiny_data  # noqa: F401

from lora_trainer.errors import ConfigError, TrainingError, UnsupportedModelError
from lora_trainer.lora import applied_lora, load_kohya_file
from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.train import run_training
from lora_trainer.train.cache import cache_latents
from lora_trainer.train.data import epoch_batches
from lora_trainer.train.engine import prepare_dataset
from lora_trainer.train.text import encode_captions


def _weights_hash(*modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ objective
@pytest.mark.parametrize("family, prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_first_step_loss_matches_diffusers_reference(tmp_path, tiny_data, family, prediction):
    from diffusers import DDPMScheduler

    bundle = build_tiny_bundle(family, prediction)
    config = tiny_config(tiny_data, tmp_path / "o", max_steps=1, epochs=0, learning_rate=1e-6)
    result = run_training(config, bundle=bundle)

    # Redo step 1 by hand: the same seeds, the scheduler math from diffusers, the base UNet
    # (lora_up starts at zero, so the adapted UNet equals the base one at step 1).
    dataset, _ = prepare_dataset(config)
    latents = cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=config.seed)
    k = epoch_batches(dataset, 1, config.seed, 0)[0][0]
    torch.manual_seed(config.seed)
    x0 = latents[k].latent[None]
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (1,))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", prediction_type=prediction)
    ac = ref.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    noisy = ref.add_noise(x0, noise, t)
    torch.testing.assert_close(noisy, ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    if prediction == "v_prediction":
        target = ref.get_velocity(x0, noise, t)
        torch.testing.assert_close(target, ac.sqrt() * noise - (1 - ac).sqrt() * x0)
    else:
        target = noise
    with torch.no_grad():
        hidden, _ = encode_captions(bundle, [dataset.items[k].caption])
        pred = bundle.unet(noisy, t, hidden).sample
    expected = torch.nn.functional.mse_loss(pred, target).item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ learning
def _eval_loss(bundle, latents, hidden, seed=0, n=6) -> float:
    """Training-set loss on fixed noise and timesteps (independent of the training RNG)."""
    sched = bundle.noise_scheduler()
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        for x0, h in zip(latents, hidden):
            for _ in range(n):
                noise = torch.randn(x0.shape, generator=g)[None]
                t = torch.randint(50, 950, (1,), generator=g)
                pred = bundle.unet(sched.add_noise(x0[None], noise, t), t, h[None]).sample
                total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / (len(latents) * n)


def test_training_loss_falls(tmp_path):
    data = make_dataset(tmp_path / "d", n=2, repeats=10)
    bundle = build_tiny_bundle("sd1")
    config = tiny_config(data, tmp_path / "o", rank=8, alpha=8.0, learning_rate=3e-3, epochs=2, batch_size=2)
    dataset, _ = prepare_dataset(config)
    latents = [c.latent for c in cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=1)]
    with torch.no_grad():
        hidden = [encode_captions(bundle, [i.caption])[0][0] for i in dataset.items]
    before = _eval_loss(bundle, latents, hidden)
    result = run_training(config, bundle=bundle)
    assert result.steps == 20 and not result.stopped
    with applied_lora(bundle, result.lora_path):  # the saved file is what was learned
        after = _eval_loss(bundle, latents, hidden)
    assert after < 0.8 * before, (before, after)
    assert _eval_loss(bundle, latents, hidden) == pytest.approx(before, rel=1e-6)  # removed after the block


# ------------------------------------------------------------------ stop / resume
def test_stop_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    tiny_data = make_dataset(tmp_path / "d", n=2, repeats=2)  # 4 steps per epoch
    common = {"epochs": 2, "shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.2,
                  "save_every_n_epochs": 1, "learning_rate": 2e-3}
    full = run_training(tiny_config(tiny_data, tmp_path / "a", **common), bundle=build_tiny_bundle("sd1"))
    assert full.steps == 8
    a = lora_tensors(full.lora_path)
    for stop_at in (3, 4):  # mid-epoch, and on the epoch boundary
        out = tmp_path / f"b{stop_at}"
        stop = threading.Event()

        def on_event(e, stop=stop, stop_at=stop_at):
            if e.kind == "step" and e.step == stop_at:
                stop.set()

        seen = []
        first = run_training(tiny_config(tiny_data, out, **common), bundle=build_tiny_bundle("sd1"),
                             on_event=lambda e, on_event=on_event, seen=seen: (seen.append(e), on_event(e)), stop=stop)
        assert first.stopped and first.steps == stop_at and first.state_dir is not None
        # the epoch shown at the stop is the one its last step showed (epoch 1 of 2 in both cases)
        last_step = [e for e in seen if e.kind == "step"][-1]
        assert next(e for e in seen if e.kind == "stopped").epoch == last_step.epoch == 1
        assert first.lora_path.name == f"tiny-step{stop_at:08d}.safetensors" and first.lora_path.is_file()
        assert not (out / "tiny.safetensors").exists()

        # As inside A1111, whose modules/safe.py makes torch.load return None for archives it does
        # not know: the state must not depend on torch.load (a stand-in for that patch).
        with monkeypatch.context() as m:
            m.setattr(torch, "load", lambda *a, **k: None)
            resumed = run_training(tiny_config(tiny_data, out, resume=str(first.state_dir), **common),
                                   bundle=build_tiny_bundle("sd1"))
        assert not resumed.stopped and resumed.steps == 8
        assert resumed.losses == full.losses  # exact: same data order, noise, timesteps, captions
        b = lora_tensors(resumed.lora_path)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
        epoch1_a = lora_tensors(tmp_path / "a" / "tiny-000001.safetensors")
        epoch1_b = lora_tensors(out / "tiny-000001.safetensors")
        assert all(torch.equal(epoch1_a[k], epoch1_b[k]) for k in epoch1_a)


def test_the_next_batch_made_ahead_changes_nothing_and_is_undone_at_a_stop_or_save(tmp_path, monkeypatch):
    """On CUDA the next step's batch is made while the device runs the step (train/step.py); here on the CPU (where
    it is otherwise off) the same code path gives the run one step at a time gives, bit for bit, with every random
    draw a step makes (flips, caption shuffle and dropout, noise offset); a stop and a save made after a step whose
    next batch was already made undo its draws, so the resumed run still equals the uninterrupted one."""
    from lora_trainer.train import step as step_mod

    data = make_dataset(tmp_path / "d", n=2, repeats=2)  # 4 steps per epoch
    common = {"epochs": 2, "shuffle_caption": True, "keep_tokens": 1, "caption_tag_dropout_rate": 0.2,
              "flip_aug": True, "noise_offset": 0.05, "learning_rate": 2e-3}
    plain = run_training(tiny_config(data, tmp_path / "a", **common), bundle=build_tiny_bundle("sd1"))
    made = []
    monkeypatch.setattr(step_mod, "AHEAD_DEVICES", ("cuda", "cpu"))
    real = step_mod._Ahead
    monkeypatch.setattr(step_mod, "_Ahead", lambda *a: made.append(a[0]) or real(*a))
    ahead = run_training(tiny_config(data, tmp_path / "b", **common), bundle=build_tiny_bundle("sd1"))
    assert len(made) == 6  # steps 2-4 and 6-8: never across an epoch's end
    assert ahead.losses == plain.losses
    a, b = lora_tensors(plain.lora_path), lora_tensors(ahead.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)

    stop = threading.Event()
    first = run_training(tiny_config(data, tmp_path / "c", save_every_n_steps=2, save_state=True, **common),
                         bundle=build_tiny_bundle("sd1"), stop=stop,
                         on_event=lambda e: stop.set() if e.kind == "step" and e.step == 3 else None)
    assert first.stopped and first.steps == 3
    resumed = run_training(tiny_config(data, tmp_path / "c", save_every_n_steps=2, save_state=True,
                                       resume=str(first.state_dir), **common), bundle=build_tiny_bundle("sd1"))
    assert resumed.losses == plain.losses
    c = lora_tensors(resumed.lora_path)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_resume_with_other_settings_is_refused(tmp_path, tiny_data):
    stop = threading.Event()
    stop.set()
    first = run_training(tiny_config(tiny_data, tmp_path / "o", epochs=2), bundle=build_tiny_bundle("sd1"), stop=stop)
    assert first.stopped and first.steps == 1
    with pytest.raises(ConfigError, match="different training settings"):
        run_training(tiny_config(tiny_data, tmp_path / "o", epochs=2, rank=8, resume=str(first.state_dir)),
                     bundle=build_tiny_bundle("sd1"))


# ------------------------------------------------------------------ failures
def test_nan_loss_stops_with_message_and_keeps_last_good_save(tmp_path, tiny_data):
    bundle = build_tiny_bundle("sd1")

    def poison(e):  # a diverged model: its output turns NaN after step 2
        if e.kind == "step" and e.step == 2:
            with torch.no_grad():
                bundle.unet.conv_out.bias.fill_(float("nan"))

    config = tiny_config(tiny_data, tmp_path / "o", epochs=1, save_every_n_steps=1)
    events = []
    with pytest.raises(TrainingError, match="loss became NaN at step 3; lower the learning rate or use bf16/fp32"):
        run_training(config, bundle=bundle, on_event=lambda e: (events.append(e), poison(e)))
    assert events[-1].kind == "error"
    good = tmp_path / "o" / "tiny-step00000002.safetensors"
    assert good.is_file() and all(torch.isfinite(v).all() for v in lora_tensors(good).values())
    assert not (tmp_path / "o" / "tiny.safetensors").exists()
    assert not any("lora" in n for n, _ in bundle.unet.named_modules())  # adapters removed anyway


def test_existing_output_is_never_overwritten(tmp_path, tiny_data):
    out = tmp_path / "o"
    out.mkdir()
    (out / "tiny.safetensors").write_bytes(b"keep me")
    events = []
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        run_training(tiny_config(tiny_data, out), bundle=build_tiny_bundle("sd1"), on_event=events.append)
    assert events == [] and (out / "tiny.safetensors").read_bytes() == b"keep me"  # refused before training
    result = run_training(tiny_config(tiny_data, out, overwrite=True, max_steps=1, epochs=0),
                          bundle=build_tiny_bundle("sd1"))
    assert result.lora_path.stat().st_size > 100


def test_model_file_that_is_not_a_model(tmp_path, tiny_data):
    fake = tmp_path / "model.safetensors"
    fake.write_text("this is not a checkpoint", encoding="utf-8")
    with pytest.raises(UnsupportedModelError, match="not a readable model file"):
        run_training(tiny_config(tiny_data, tmp_path / "o", model=str(fake)))
    other = tmp_path / "notes.txt"
    other.write_text("hello", encoding="utf-8")
    with pytest.raises(UnsupportedModelError, match="not a model checkpoint"):
        run_training(tiny_config(tiny_data, tmp_path / "o", model=str(other)))


# ------------------------------------------------------------------ host bundle, events, outputs
def test_host_bundle_is_given_back_untouched_and_events(tmp_path):
    tiny_data = make_dataset(tmp_path / "d", n=2, repeats=1)  # 2 steps per epoch
    bundle = build_tiny_bundle("sd1")
    before = _weights_hash(bundle.unet, bundle.vae, *bundle.text_encoders)
    flags = [p.requires_grad for p in bundle.unet.parameters()]
    events = []
    config = tiny_config(tiny_data, tmp_path / "o", epochs=2, save_every_n_epochs=1, train_text_encoder=True,
                         sample_prompts=["shape, circle"], sample_every_n_epochs=2, sample_steps=2,
                         gradient_checkpointing=True, activation_text="shape")
    result = run_training(config, bundle=bundle, on_event=events.append)

    assert _weights_hash(bundle.unet, bundle.vae, *bundle.text_encoders) == before
    assert [p.requires_grad for p in bundle.unet.parameters()] == flags
    assert not bundle.unet.training and not bundle.text_encoders[0].training
    assert not any("lora" in n for m in (bundle.unet, *bundle.text_encoders) for n, _ in m.named_modules())
    assert all(p.device.type == "cpu" for p in bundle.vae.parameters())

    kinds = [e.kind for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "done" and "sample" in kinds and "epoch" in kinds
    cache = [e.message for e in events if e.kind == "cache"]
    assert cache[0] == "Caching latents: 1/2 images" and cache[-1] == "Caching latents: 2/2 images"
    assert kinds.index("cache") < kinds.index("step")
    assert "4 steps" in events[0].message and events[0].plan.total_steps == 4
    steps = [e for e in events if e.kind == "step"]
    step = steps[0]
    assert step.total_steps == 4 and step.loss is not None and step.lr == pytest.approx(1e-3)
    # no speed from the first step alone (it carries one-off costs); then a windowed speed and an ETA
    assert step.it_per_s is None and step.eta_s is None and step.phase == "train"
    assert steps[2].it_per_s and steps[2].eta_s is not None and steps[2].vram_bytes is None  # None on the CPU
    # every phase reports progress: caching, training, sampling (per denoising step), saving
    assert [e.phase for e in events if e.kind == "cache"] == ["cache"] * len(cache)
    sampling = [e for e in events if e.kind == "phase" and e.phase == "sample"]
    assert [(e.phase_done, e.phase_total) for e in sampling] == [(0, 2), (1, 2), (2, 2)]
    assert sampling[1].message == "Sampling after epoch 2: image 1/1, step 1/2" and sampling[1].epoch == 2
    assert kinds.index("sample") > kinds.index("phase")
    saving = [e for e in events if e.kind == "phase" and e.phase == "save"]
    assert [e.message for e in saving] == ["Saving tiny-000001.safetensors…", "Saving tiny.safetensors…"]
    names = sorted(p.name for p in result.saved)
    assert names == ["tiny-000001.safetensors", "tiny.safetensors"]
    assert result.samples and result.samples[0].name == "tiny_e000002_00.png" and result.samples[0].is_file()
    meta = __import__("json").loads((tmp_path / "o" / "tiny.json").read_text(encoding="utf-8"))
    assert meta["activation text"] == "shape" and meta["sd version"] == "SD1" and meta["preferred weight"] == 0.8
    tensors, md = load_kohya_file(result.lora_path)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert md["ss_steps"] == "4" and md["ss_num_train_images"] == "2" and md["ss_network_dim"] == "4"


def test_sdxl_short_run_with_buckets(tmp_path):
    data = make_dataset(tmp_path / "d", n=2, repeats=1, sizes=[(64, 64), (128, 32)])
    bundle = build_tiny_bundle("sdxl")
    result = run_training(tiny_config(data, tmp_path / "o", epochs=1, min_snr_gamma=5.0, noise_offset=0.05,
                                      multires_noise_iterations=2, loss_type="huber", flip_aug=True,
                                      sample_prompts=["shape"], sample_every_n_epochs=1, sample_steps=2),
                          bundle=bundle)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert len(result.samples) == 1 and result.samples[0].is_file()
    tensors, md = load_kohya_file(result.lora_path)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(k.startswith("lora_unet_input_blocks") for k in tensors)


def test_latent_disk_cache_is_keyed_by_content(tmp_path):
    data = make_dataset(tmp_path / "d", n=2)
    bundle = build_tiny_bundle("sd1")
    config = tiny_config(data, tmp_path / "o")
    dataset, _ = prepare_dataset(config)
    calls = []
    encode = bundle.vae.encode
    bundle.vae.encode = lambda x: (calls.append(1), encode(x))[1]  # spy: count real encodes
    cache = tmp_path / "cache"
    first = cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=1, disk_dir=cache)
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2
    again = cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=1, disk_dir=cache)
    assert len(calls) == 2 and torch.equal(first[0].latent, again[0].latent)
    # Edit one image in place (same name, same size): its latent must be recomputed.
    from PIL import Image

    path = dataset.items[0].path
    Image.new("RGB", (64, 64), (0, 0, 0)).save(path)
    edited = cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=1, disk_dir=cache)
    assert len(calls) == 3 and not torch.equal(edited[0].latent, first[0].latent)
    assert torch.equal(edited[1].latent, first[1].latent)
    shutil.rmtree(cache)


def test_text_encoder_outputs_cached_only_when_static(tmp_path, tiny_data):
    calls = []
    bundle = build_tiny_bundle("sd1")
    handle = bundle.text_encoders[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        # frozen text encoder + static captions: each image's caption is encoded once, before the loop
        # (the 3 captions in one batched call; 6 batches / 2 accumulated per step)
        # (validation off here: tests/test_train_report.py counts its captions in the same call)
        result = run_training(tiny_config(tiny_data, tmp_path / "a", gradient_accumulation_steps=2,
                                          validate_every_n_epochs=0), bundle=bundle)
        assert result.steps == 3 and calls == [3]
        calls.clear()
        # shuffled captions change every step: encoded per batch
        run_training(tiny_config(tiny_data, tmp_path / "b", shuffle_caption=True, max_steps=2, epochs=0,
                                 validate_every_n_epochs=0), bundle=bundle)
        assert calls == [1, 1]
    finally:
        handle.remove()


def test_out_of_memory_becomes_a_clear_error(tmp_path, tiny_data):
    # No GPU here: torch's own CUDA OOM exception is raised from the progress callback during step 2,
    # where a real allocation failure would surface. Everything after it is the real engine.
    bundle = build_tiny_bundle("sd1")

    def on_event(e):
        if e.kind == "step" and e.step == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(TrainingError, match="ran out of memory at step 2.*batch size or resolution.*gradient "
                                            "checkpointing.*low-VRAM preset"):
        run_training(tiny_config(tiny_data, tmp_path / "o"), bundle=bundle, on_event=on_event)
    assert not any("lora" in n for n, _ in bundle.unet.named_modules())


def test_early_lora_where_nothing_uploads_beside_caching_injects_after_it(tmp_path, tiny_data, monkeypatch):
    """accel's early_lora asks for the adapters in the UNet's upload thread; on the CPU (or a GPU without room for
    the upload beside caching) nothing uploads there, and the adapters come after caching as before: the same run."""
    from lora_trainer import accel

    real_options = accel.AccelOptions.from_config
    early_lora = [False]

    def options(config):
        opts = real_options(config)
        opts.early_lora = early_lora[0]
        return opts

    assert accel.AccelOptions().early_lora  # the default
    monkeypatch.setattr(accel.AccelOptions, "from_config", staticmethod(options))
    plain = run_training(tiny_config(tiny_data, tmp_path / "a", max_steps=3), bundle=build_tiny_bundle("sd1"))
    early_lora[0] = True
    early = run_training(tiny_config(tiny_data, tmp_path / "b", max_steps=3), bundle=build_tiny_bundle("sd1"))
    assert early.losses == plain.losses
