"""The dataset scan runs beside the import of what the model's load needs first (engine.run_training), after the
model file's header check: a model error comes first, without waiting for a scan, a dataset error right after the
import, and the run trains on what the scan found."""

# ruff: noqa: F811  (pytest fixtures imported from train_support are used as arguments)

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file
from train_support import make_dataset, tiny_config, tiny_sd1_ckpt  # noqa: F401

from lora_trainer.errors import DatasetError, UnsupportedModelError
from lora_trainer.train import engine, run_training


def _empty_dataset(tmp_path):
    (tmp_path / "empty" / "img" / "2_thing").mkdir(parents=True)
    return tmp_path / "empty"


def test_a_model_error_comes_before_a_dataset_error(tmp_path, monkeypatch):
    not_a_model = tmp_path / "notes.safetensors"
    save_file({"something.else": torch.zeros(2)}, str(not_a_model))
    scans = []
    scan = engine.prepare_dataset
    monkeypatch.setattr(engine, "prepare_dataset", lambda config: scans.append(1) or scan(config))
    config = tiny_config(_empty_dataset(tmp_path), tmp_path / "o", model=str(not_a_model), max_steps=1)
    with pytest.raises(UnsupportedModelError):
        run_training(config)
    assert not (tmp_path / "o").exists() and scans == []  # no scan started: nothing to wait for at exit


def test_a_dataset_error_after_a_good_header(tmp_path, tiny_sd1_ckpt):
    config = tiny_config(_empty_dataset(tmp_path), tmp_path / "o", model=str(tiny_sd1_ckpt), max_steps=1)
    with pytest.raises(DatasetError, match="holds no images"):
        run_training(config)


def test_the_scan_runs_beside_the_loader_imports(tmp_path, tiny_sd1_ckpt, monkeypatch):
    seen: dict[str, object] = {}
    scan, check, imports = engine.prepare_dataset, engine.check_model_file, engine._import_loader_libraries
    order = []

    def prepare_dataset(config):
        seen["scan thread"] = threading.current_thread() is not threading.main_thread()
        order.append("scan")
        result = seen["scanned"] = scan(config)
        return result

    def check_model_file(*args):
        seen["check thread"] = threading.current_thread() is threading.main_thread()
        order.append("check")
        return check(*args)

    def import_loader_libraries():
        order.append("imports")
        return imports()

    monkeypatch.setattr(engine, "prepare_dataset", prepare_dataset)
    monkeypatch.setattr(engine, "check_model_file", check_model_file)
    monkeypatch.setattr(engine, "_import_loader_libraries", import_loader_libraries)
    data = make_dataset(tmp_path / "d", n=2)
    events = []
    result = run_training(tiny_config(data, tmp_path / "o", model=str(tiny_sd1_ckpt), max_steps=1,
                                      validate_every_n_epochs=0), on_event=events.append)
    assert seen["scan thread"] is True and seen["check thread"] is True and order[0] == "check"
    assert sorted(order[1:]) == ["imports", "scan"]
    plan = next(e for e in events if e.kind == "plan").plan
    assert plan is seen["scanned"][1] and result.steps == 1 and result.lora_path.is_file()
