"""The resume state file: a real optimizer/scheduler/scaler round trip without torch.load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.train.state import STATE_FILE, Position, load_state, save_state


def test_round_trip_keeps_types_tensors_and_optimizer_state(tmp_path):
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        sum(p.float().square().sum() for p in params).backward()
        opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    sched.step()
    lora = {"lora_unet_x.lora_down.weight": torch.randn(2, 3)}
    position = Position(step=7, epoch=1, chunk=3, losses=[0.5, float("nan")], smoothed=0.4, saved=["a.safetensors"])
    folder = save_state(tmp_path / "s", config_hash="h", config_json=json.dumps({"rank": 2}), lora=lora,
                        optimizer=opt, scheduler=sched, scaler=None, position=position)
    assert (folder / STATE_FILE).is_file() and not list(folder.glob(".*tmp"))
    payload = load_state(folder, "h")
    assert torch.equal(payload["lora"]["lora_unet_x.lora_down.weight"], lora["lora_unet_x.lora_down.weight"])
    saved = opt.state_dict()
    got = payload["optimizer"]
    assert set(got["state"]) == {0, 1}  # integer keys stay integers
    for i in (0, 1):
        for name, value in saved["state"][i].items():
            assert torch.equal(got["state"][i][name], value) and got["state"][i][name].dtype == value.dtype
    assert got["param_groups"][0]["betas"] == (0.9, 0.99)  # tuples stay tuples
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    fresh.load_state_dict(got)
    assert payload["scheduler"] == sched.state_dict()
    assert payload["position"]["saved"] == ["a.safetensors"] and np.isnan(payload["position"]["losses"][1])
    rng = payload["rng"]
    assert rng["torch"].dtype == torch.uint8 and rng["numpy"][0] == "MT19937"
    assert len(rng["python"][1]) == 625  # Mersenne Twister words, as random.getstate() gives


def test_refuses_other_settings_and_unreadable_files(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    folder = save_state(tmp_path / "s", config_hash="h", config_json="{}", lora={}, optimizer=opt,
                        scheduler=sched, scaler=None, position=Position())
    with pytest.raises(ConfigError, match="different training settings"):
        load_state(folder, "other")
    (folder / STATE_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="cannot be read"):
        load_state(folder, "h")
    (folder / STATE_FILE).unlink()
    (folder / "state.pt").write_bytes(b"old")
    with pytest.raises(ConfigError, match="older version"):
        load_state(folder, "h")
