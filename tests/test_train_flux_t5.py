# ruff: noqa: F811  (the tiny_data fixture imported from train_support is used as an argument)
"""Text-encoder LoRAs for Flux.1 and Chroma on tiny real models (CPU): T5-XXL only on request (`train_t5`,
kohya's `train_t5xxl`, exported as `lora_te3_`), CLIP-L with `train_text_encoder`, and what gets cached.

diffusers cannot read the T5 part of a kohya Flux file (its converter raises on `lora_te3_`), so the T5 file
is read back by our own kohya loader on a fresh model (strict: every key matched) and checked against T5's
output; ComfyUI's key map for `lora_te3_` is covered by the opt-in tests/test_lora_flux_comfyui.py."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from flux_support import requires_flux_diffusers
from train_support import lora_tensors, make_dataset, tiny_config, tiny_data  # noqa: F401

from lora_trainer.cli import build_parser
from lora_trainer.commands.train import config_from_args
from lora_trainer.errors import ConfigError
from lora_trainer.lora import LoraSpec, find_targets, inject_lora, load_kohya_file
from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
from lora_trainer.train import run_training

pytestmark = requires_flux_diffusers


def _config(data, out, **kw):
    base = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
            "learning_rate": 2e-3, "t5_max_token_length": 32}
    base.update(kw)
    return tiny_config(data, out, **base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("t5-data"), n=2, repeats=2, sizes=[(64, 64), (96, 64)])


def _t5_out(bundle, text="shape, circle, colour 0"):
    ids = bundle.tokenizers[-1]([text], max_length=32, padding="max_length", truncation=True,
                                return_tensors="pt").input_ids
    t5 = bundle.text_encoders[-1].eval()
    with torch.no_grad():
        return t5(ids).last_hidden_state


@pytest.mark.parametrize("variant", ["dev", "chroma"])
def test_train_t5_exports_kohya_te3_and_reloads(tmp_path, data, variant):
    bundle = build_tiny_flux_bundle(variant, seed=3)
    before = _t5_out(bundle)
    result = run_training(_config(data, tmp_path / "o", max_steps=3, epochs=0, train_t5=True), bundle=bundle)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    tensors, md = load_kohya_file(result.lora_path)
    te3 = {k.split(".")[0] for k in tensors if k.startswith("lora_te3_")}
    fresh = build_tiny_flux_bundle(variant, seed=3)
    expected = {t.kohya_name for t in find_targets(fresh, text_encoder=False, t5=True) if t.component == "te3"}
    assert te3 == expected and "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in te3
    assert not any(k.startswith("lora_te1_") for k in tensors)  # CLIP-L only with train_text_encoder
    assert json.loads(md["ss_network_args"]) == {"train_t5xxl": "True"}
    assert any(tensors[f"{n}.lora_up.weight"].abs().sum() > 0 for n in te3)  # T5's adapters were trained
    assert torch.equal(_t5_out(bundle), before)  # the bundle is given back without adapters

    spec = LoraSpec.from_kohya_state_dict(tensors)
    assert spec.train_t5 and not spec.train_text_encoder
    network = inject_lora(fresh, spec)
    report = network.load_kohya_state_dict(tensors, strict=True)
    assert not report.unexpected and not report.missing
    after = _t5_out(fresh)
    assert not torch.allclose(after, before, atol=1e-6)  # the LoRA changes T5's output
    # kohya's arithmetic by hand: W + (alpha / rank) * up @ down on every T5 Linear gives the same output
    network.remove()
    with torch.no_grad():
        modules = dict(fresh.text_encoders[-1].named_modules())
        for t in find_targets(fresh, text_encoder=False, t5=True):
            if t.component == "te3":
                down, up = tensors[f"{t.kohya_name}.lora_down.weight"], tensors[f"{t.kohya_name}.lora_up.weight"]
                scale = float(tensors[f"{t.kohya_name}.alpha"]) / down.shape[0]
                modules[t.module_name].weight += scale * up.float() @ down.float()
    torch.testing.assert_close(_t5_out(fresh), after, atol=1e-5, rtol=1e-4)


def test_train_t5_stop_then_resume_equals_uninterrupted_run(tmp_path, data):
    common = {"epochs": 2, "train_t5": True, "train_text_encoder": True, "gradient_checkpointing": True}
    full = run_training(_config(data, tmp_path / "a", **common), bundle=build_tiny_flux_bundle("dev", seed=7))
    out = tmp_path / "b"
    stop = threading.Event()
    first = run_training(_config(data, out, **common), bundle=build_tiny_flux_bundle("dev", seed=7), stop=stop,
                         on_event=lambda e: stop.set() if e.kind == "step" and e.step == 3 else None)
    assert first.stopped and first.steps == 3
    resumed = run_training(_config(data, out, resume=str(first.state_dir), **common),
                           bundle=build_tiny_flux_bundle("dev", seed=7))
    assert resumed.losses == full.losses
    a, b = lora_tensors(full.lora_path), lora_tensors(resumed.lora_path)
    assert any(k.startswith("lora_te1_") for k in a) and any(k.startswith("lora_te3_") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_t5_cli_switch_and_refusal_for_sd(tmp_path, tiny_data, capsys):
    from lora_trainer.cli import main
    from lora_trainer.models.tiny import build_tiny_bundle

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--train-t5" in capsys.readouterr().out
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m.safetensors", "--train-t5"])
    assert config_from_args(args).train_t5 is True
    assert config_from_args(parser.parse_args(["train", "--model", "m.safetensors"])).train_t5 is False
    with pytest.raises(ConfigError, match="train_t5 trains Flux.1's or Chroma's T5-XXL"):
        run_training(tiny_config(tiny_data, tmp_path / "o", max_steps=1, epochs=0, train_t5=True),
                     bundle=build_tiny_bundle("sd1"))


# ------------------------------------------------------------------ what is cached
def test_clip_training_caches_t5_once_per_caption(tmp_path, data, monkeypatch):
    """CLIP-L trains, T5 does not: T5's outputs are cached (content-hashed on disk), CLIP-L runs every step;
    the losses are those of encoding both every step."""
    from lora_trainer.train import caching

    calls: dict[str, list[int]] = {"T5EncoderModel": [], "CLIPTextModel": []}
    cache = tmp_path / "cache"

    def run(out, **kw):
        bundle = build_tiny_flux_bundle("dev", seed=8)
        handles = [te.register_forward_hook(lambda m, i, o: calls[type(m).__name__].append(int(i[0].shape[0])))
                   for te in bundle.text_encoders]
        settings = {"max_steps": 4, "epochs": 0, "train_text_encoder": True, "cache_latents_to_disk": True,
                    "latent_cache_dir": str(cache), "sample_prompts": ["a circle"], "sample_every_n_epochs": 1,
                    "sample_steps": 1, "validate_every_n_epochs": 0, **kw}
        try:
            return run_training(_config(data, out, **settings), bundle=bundle)
        finally:
            for h in handles:
                h.remove()

    first = run(tmp_path / "a")
    # T5: the two captions in one batched call (plus the sample prompt); CLIP-L: every step (and the sample)
    assert calls["T5EncoderModel"] == [2, 1] and calls["CLIPTextModel"] == [1, 1, 1, 1, 1]
    assert len(list((cache / "text").glob("*.safetensors"))) == 2
    tensors = lora_tensors(first.lora_path)
    assert any(k.startswith("lora_te1_") for k in tensors) and not any(k.startswith("lora_te3_") for k in tensors)

    for v in calls.values():
        v.clear()
    again = run(tmp_path / "b")  # the T5 entries come from disk
    assert calls["T5EncoderModel"] == [1] and again.losses == first.losses  # only the sample prompt

    for v in calls.values():
        v.clear()
    monkeypatch.setattr(caching, "captions_are_static", lambda *a: False)  # reference: both encoders every step
    per_step = run(tmp_path / "c")
    assert calls["T5EncoderModel"] == [1, 1, 1, 1, 1]
    assert per_step.losses == pytest.approx(first.losses, rel=1e-5)
    monkeypatch.undo()

    for v in calls.values():
        v.clear()
    run(tmp_path / "d", train_text_encoder=False)  # a full entry (CLIP-L + T5) is another file than a T5-only one
    assert calls["T5EncoderModel"] == [2, 1] and calls["CLIPTextModel"] == [2, 1]
    assert len(list((cache / "text").glob("*.safetensors"))) == 4

    for v in calls.values():
        v.clear()
    # "did it learn?" scores the training captions (no leak-check set: nothing else): their T5 outputs are the
    # training ones, cached in the same one call; CLIP-L encodes them when scoring (base model and the epoch's end)
    scored = run(tmp_path / "e", cache_latents_to_disk=False, validate_every_n_epochs=1)
    assert calls["T5EncoderModel"] == [2, 1]
    assert scored.report is not None and math.isfinite(scored.report["base_loss"]) and scored.report["epochs"]
