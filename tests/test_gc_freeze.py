"""The collector skips what lives through a run (lora_trainer/gc_freeze.py), and nothing stays frozen or
alive after it: real garbage collector, real engine on a tiny checkpoint file."""

from __future__ import annotations

import gc
import weakref

import pytest
from train_support import tiny_config, tiny_data, tiny_sd1_ckpt  # noqa: F401 - fixtures

from lora_trainer import gc_freeze
from lora_trainer.models import loader
from lora_trainer.train import engine, run_training


class _Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref:
    return weakref.ref(_Node())


def test_a_scope_freezes_what_exists_and_its_end_gives_it_back():
    before = _Node()
    with gc_freeze.run_scope():
        assert gc.get_freeze_count() > 0
        with gc_freeze.run_scope():  # a second run in the same process (a WebUI's job thread)
            pass
        assert gc.get_freeze_count() > 0, "only the outermost scope unfreezes"
        young = _cycle()  # garbage made during the run is collected during the run
        gc.collect()
        assert young() is None
    assert gc.get_freeze_count() == 0
    old = weakref.ref(before)
    del before
    gc.collect()
    assert old() is None


def test_what_was_built_is_frozen_until_thaw_then_collected():
    with gc_freeze.run_scope():
        with gc_freeze.building():
            assert not gc.isenabled()
            built = _Node()
        assert gc.isenabled()
        ref = weakref.ref(built)
        del built
        gc.collect()
        assert ref() is not None, "frozen: full collections skip it"
        gc_freeze.thaw()
        gc.collect()
        assert ref() is None


def test_thaw_inside_an_outer_scope_leaves_the_freeze_to_that_scope():
    with gc_freeze.run_scope():  # the CLI's: the process ends with the run
        with gc_freeze.run_scope():  # the engine's
            with gc_freeze.building():
                built = _Node()
            ref = weakref.ref(built)
            del built
            gc_freeze.thaw()
            gc.collect()
            assert ref() is not None
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert ref() is None


def test_building_keeps_the_collector_off_if_it_was_off():
    gc.disable()
    try:
        with gc_freeze.building():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_run_from_a_file_freezes_while_training_and_leaves_nothing_frozen_or_alive(
        tmp_path, tiny_data, tiny_sd1_ckpt, monkeypatch):  # noqa: F811 - fixtures
    loaded: list[weakref.ref] = []
    original = loader.load_model

    def spy(*args, **kwargs):  # the real loader; only remembers what it built
        bundle = original(*args, **kwargs)
        loaded.extend(weakref.ref(m) for m in (bundle.unet, bundle.vae, *bundle.text_encoders))
        return bundle

    monkeypatch.setattr(loader, "load_model", spy)
    frozen_at_steps: list[int] = []

    def on_event(event):
        if event.kind == "step":
            frozen_at_steps.append(gc.get_freeze_count())

    config = tiny_config(tiny_data, tmp_path / "out", model=str(tiny_sd1_ckpt), max_steps=2)
    result = run_training(config, on_event=on_event)
    assert result.steps == 2
    assert frozen_at_steps and min(frozen_at_steps) > 0
    assert gc.get_freeze_count() == 0
    del result
    gc.collect()  # as before this module: the run's own objects hold the model until run_training returns
    assert loaded and all(ref() is None for ref in loaded), "the loaded model is freed after the run"
    assert engine.run_training.__wrapped__  # the scope wraps the engine's entry point


def test_a_refused_run_leaves_nothing_frozen(tmp_path, tiny_data):  # noqa: F811 - fixture
    from lora_trainer.errors import LoraTrainerError

    config = tiny_config(tiny_data, tmp_path / "out", model=str(tmp_path / "missing.safetensors"))
    with pytest.raises(LoraTrainerError):
        run_training(config)
    assert gc.get_freeze_count() == 0
    assert gc.isenabled()
