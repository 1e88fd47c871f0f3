"""The final LoRA's file is written by a thread while its epoch is scored (train/saving.py `_start_final_write`),
then renamed into place: the same file as a save after the scoring, and nothing half-written left when the write
or the scoring fails. Real tiny runs on the CPU; only the file writer and the scoring are wrapped, to observe them
or to make them fail."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from safetensors import safe_open
from train_support import lora_tensors, make_dataset, tiny_config

from lora_trainer.lora.errors import LoraFileError
from lora_trainer.lora.kohya_file import precalculate_safetensors_hashes
from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.train import run_training, saving, validation


def _run(tmp_path, epochs: int = 2):
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", epochs=epochs)
    return config, run_training(config, bundle=build_tiny_bundle("sd1"))


def _scorings(monkeypatch, on_call):
    """Validator._score wrapped: `on_call(validator)` before each scoring (the base model's too)."""
    real = validation.Validator._score

    def score(self):
        on_call(self)
        return real(self)

    monkeypatch.setattr(validation.Validator, "_score", score)


def _leftovers(config) -> list[str]:
    return sorted(p.name for p in Path(config.output_dir).rglob("*.tmp"))


def test_the_final_file_is_written_while_its_epoch_is_scored(tmp_path, monkeypatch):
    real_write, started, seen = saving.write_kohya_temp, threading.Event(), []

    def write(path, state, metadata):
        seen.append(threading.current_thread().name)
        started.set()
        return real_write(path, state, metadata)

    monkeypatch.setattr(saving, "write_kohya_temp", write)
    waited = []

    def before_scoring(v):
        if len(v.report.epochs) == 1:  # the second (last) epoch: its file is being written now, not after
            waited.append(started.wait(timeout=30))

    _scorings(monkeypatch, before_scoring)
    config, result = _run(tmp_path)
    assert waited == [True] and seen and seen[0].startswith("lora-final")
    assert result.lora_path.is_file()
    # the file is a whole kohya file: its hashes are those of its tensors and ss_* metadata
    with safe_open(str(result.lora_path), "pt") as f:
        metadata = f.metadata()
    tensors = lora_tensors(result.lora_path)
    assert (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"]) == precalculate_safetensors_hashes(
        tensors, metadata)
    assert metadata["ss_steps"] == str(result.steps) and metadata["ss_epoch"] == "2"
    assert _leftovers(config) == []


def test_the_final_file_equals_the_one_saved_after_scoring(tmp_path, monkeypatch):
    """The same run with validation off (the file is then written after the last step, on the run's thread):
    the same tensors (the scoring does not touch the weights)."""
    _, overlapped = _run(tmp_path / "a")
    data = make_dataset(tmp_path / "b" / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "b" / "out", epochs=2, validate_every_n_epochs=0)
    plain = run_training(config, bundle=build_tiny_bundle("sd1"))
    a, b = lora_tensors(overlapped.lora_path), lora_tensors(plain.lora_path)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_a_final_file_that_cannot_be_written_fails_the_run_clearly(tmp_path, monkeypatch):
    def full_disk(path, state, metadata):
        raise LoraFileError(f"Cannot write the LoRA file {path} (No space left on device); choose a folder you "
                            "can write to with enough free space.")

    monkeypatch.setattr(saving, "write_kohya_temp", full_disk)
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", epochs=2)
    with pytest.raises(LoraFileError, match="No space left"):
        run_training(config, bundle=build_tiny_bundle("sd1"))
    assert not saving.lora_file(config).exists() and _leftovers(config) == []


def test_a_failure_while_the_last_epoch_is_scored_leaves_no_half_made_file(tmp_path, monkeypatch):
    def before_scoring(v):
        if len(v.report.epochs) == 1:
            raise RuntimeError("the scoring broke")

    _scorings(monkeypatch, before_scoring)
    data = make_dataset(tmp_path / "ds", n=2, repeats=1)
    config = tiny_config(data, tmp_path / "out", epochs=2)
    with pytest.raises(RuntimeError, match="the scoring broke"):
        run_training(config, bundle=build_tiny_bundle("sd1"))
    assert not saving.lora_file(config).exists() and _leftovers(config) == []
