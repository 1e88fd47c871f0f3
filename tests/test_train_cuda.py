"""The engine on a CUDA GPU (skipped here: no GPU on the CI machines; run on a GPU box with
`python -m pytest tests/test_train_cuda.py`). Tiny models, seconds."""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from train_support import lora_tensors, make_dataset, tiny_config, tiny_data  # noqa: F401

from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.train import run_training
from lora_trainer.train.placement import place_bundle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _hash(*modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_mixed_precision_runs_and_host_bundle_comes_back(tmp_path, tiny_data, precision, family):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]
    bundle = build_tiny_bundle(family)
    bundle.unet.to("cuda", dtype)  # a host model: UNet on the GPU in half precision, the rest too
    bundle.vae.to("cuda", torch.float32 if family == "sdxl" else dtype)
    for te in bundle.text_encoders:
        te.to("cuda", dtype)
    before = _hash(bundle.unet, bundle.vae, *bundle.text_encoders)
    result = run_training(tiny_config(tiny_data, tmp_path / "o", mixed_precision=precision, device="cuda",
                                      epochs=2, gradient_checkpointing=True, train_text_encoder=True,
                                      sample_prompts=["shape"], sample_every_n_epochs=2, sample_steps=2),
                          bundle=bundle)
    assert result.steps == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    assert _hash(bundle.unet, bundle.vae, *bundle.text_encoders) == before
    assert all(p.is_cuda for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters())
    assert all(torch.isfinite(v).all() for v in lora_tensors(result.lora_path).values())


def test_fp8_low_vram_preset_on_an_owned_model(tmp_path, tiny_data):
    bundle = place_bundle(build_tiny_bundle("sdxl"), "cuda", torch.bfloat16)
    config = tiny_config(tiny_data, tmp_path / "o", mixed_precision="bf16", device="cuda", fp8_base=True,
                         gradient_checkpointing=True)
    result = run_training(config, bundle=bundle, owns_bundle=True)
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.fixture
def deterministic_cuda():
    """cuDNN's default conv algorithms and TF32 differ run to run in the last bits; lr 2e-3 then
    amplifies that over a few steps. Pin them so a resume can be compared with a straight run."""
    b = torch.backends
    saved = (b.cudnn.deterministic, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    b.cudnn.deterministic, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = True, False, False, False
    yield
    b.cudnn.deterministic, b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("ahead", [False, True], ids=["batch_after", "batch_ahead"])
def test_stop_resume_on_cuda_matches(tmp_path, tiny_data, deterministic_cuda, monkeypatch, ahead):
    """batch_ahead: the next step's batch made while the GPU runs the step (train/step.py AHEAD_DEVICES), its
    draws undone at the stop."""
    from lora_trainer.train import step as step_mod

    monkeypatch.setattr(step_mod, "AHEAD_DEVICES", ("cuda",) if ahead else ())
    common = {"epochs": 2, "device": "cuda", "learning_rate": 2e-3, "accel": "off"}

    def straight(out):
        return run_training(tiny_config(tiny_data, out, **common),
                            bundle=place_bundle(build_tiny_bundle("sd1"), "cuda", torch.float32), owns_bundle=True)

    full, again = straight(tmp_path / "a"), straight(tmp_path / "a2")
    stop = threading.Event()
    first = run_training(tiny_config(tiny_data, tmp_path / "b", **common),
                         bundle=place_bundle(build_tiny_bundle("sd1"), "cuda", torch.float32), owns_bundle=True,
                         on_event=lambda e: e.kind == "step" and e.step == 4 and stop.set(), stop=stop)
    assert first.steps == 4
    resumed = run_training(tiny_config(tiny_data, tmp_path / "b", resume=str(first.state_dir), **common),
                           bundle=place_bundle(build_tiny_bundle("sd1"), "cuda", torch.float32), owns_bundle=True)
    # A resumed run may differ from a straight one about as much as two straight runs differ (GPU
    # atomics remain even with these flags, and lr 2e-3 amplifies them), never by what a wrong
    # resume gives: a lost optimizer state, RNG state or data order moves the loss by percents.
    noise = max(abs(x - y) for x, y in zip(full.losses, again.losses))
    assert resumed.losses == pytest.approx(full.losses, rel=2e-3, abs=3 * noise)
    a, a2, b = (lora_tensors(r.lora_path) for r in (full, again, resumed))
    for key in a:
        spread = float((a[key].float() - a2[key].float()).abs().max())
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5 + 3 * spread)


def test_cuda_graphs_path(tmp_path):
    data = make_dataset(tmp_path / "d", n=2, repeats=6)
    bundle = place_bundle(build_tiny_bundle("sd1"), "cuda", torch.bfloat16)
    result = run_training(tiny_config(data, tmp_path / "o", mixed_precision="bf16", device="cuda", epochs=1),
                          bundle=bundle, owns_bundle=True)
    assert result.steps == 12 and all(torch.isfinite(torch.tensor(result.losses)))


def test_background_upload_gives_the_same_weights_and_a_run_from_a_file_trains(tmp_path, tiny_data):
    """placement.py: the UNet copied and cast on a side stream while other GPU work runs equals a
    plain copy; a run from a checkpoint file (the lazy path, VAE/text encoder dropped) trains."""
    from lora_trainer.models.loader import load_model
    from lora_trainer.models.tiny import write_tiny_checkpoint
    from lora_trainer.train.placement import Placement

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "sdxl", seed=0)
    bundle = load_model(ckpt, dtype=None, device=None)
    expected = {k: v.to("cuda", torch.bfloat16) for k, v in bundle.unet.state_dict().items()}
    place = Placement(bundle, "cuda", torch.bfloat16)
    assert place.upload_in_background(bundle.unet)
    busy = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):
        busy = busy @ busy / 2048  # GPU work on the current stream meanwhile
    place.to(bundle.unet, "cuda")
    got = bundle.unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    place.close()
    result = run_training(tiny_config(tiny_data, tmp_path / "o", model=str(ckpt), mixed_precision="bf16",
                                      device="cuda", max_steps=4))
    assert result.steps == 4 and all(torch.isfinite(torch.tensor(result.losses)))



def test_early_lora_adds_the_adapters_beside_caching_with_the_same_start(tmp_path, tiny_data, monkeypatch,
                                                                         deterministic_cuda):
    """accel's early_lora: the adapters are added in the UNet's upload thread while the latents are cached; the
    run starts from the same adapters (same seed) and follows the same losses as with them added after caching."""
    from lora_trainer import accel
    from lora_trainer.lora import network as lora_network
    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", "sd1", seed=0)
    threads, starts = [], []
    real_inject, real_options = lora_network.inject_lora, accel.AccelOptions.from_config

    def inject(*a, **k):
        net = real_inject(*a, **k)
        threads.append(threading.current_thread().name)
        starts.append([p.detach().cpu().clone() for p in net.parameters()])
        return net

    monkeypatch.setattr(lora_network, "inject_lora", inject)
    runs = []
    for early in (False, True):
        def options(config, early=early):
            opts = real_options(config)
            opts.early_lora = early
            return opts

        monkeypatch.setattr(accel.AccelOptions, "from_config", staticmethod(options))
        config = tiny_config(tiny_data, tmp_path / f"o{early}", model=str(ckpt), mixed_precision="bf16",
                             device="cuda", max_steps=6)
        runs.append(run_training(config))
    assert threads[0] == threading.current_thread().name and threads[1].startswith("upload"), threads
    assert len(starts[0]) == len(starts[1]) and all(torch.equal(a, b) for a, b in zip(*starts))
    assert runs[1].losses == pytest.approx(runs[0].losses, rel=2e-2)
