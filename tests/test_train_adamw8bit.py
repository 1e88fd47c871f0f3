"""The 8-bit AdamW used where bitsandbytes does not import: close to torch's AdamW, 2 bytes of state per
parameter, exact resume through its state dict, and picked by `build_optimizer` when bitsandbytes is absent."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_trainer.train.adamw8bit import AdamW8bit
from lora_trainer.train.optim import bitsandbytes_works, build_optimizer


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(64, 48, generator=g)
    x = torch.randn(256, 64, generator=g)
    params = [torch.nn.Parameter(torch.randn(64, 48, generator=g) * 0.1), torch.nn.Parameter(torch.zeros(48))]
    return x, target, params


def _run(opt_cls, steps: int = 60, **kw):
    x, target, params = _problem()
    opt = opt_cls(params, lr=3e-2, weight_decay=1e-2, **kw)
    losses = []
    for _ in range(steps):
        loss = ((x @ params[0] + params[1] - x @ target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, params, opt


def test_tracks_torch_adamw():
    ref, ref_params, _ = _run(torch.optim.AdamW, steps=150)
    ours, params, opt = _run(AdamW8bit, steps=150)
    assert ours[-1] < 0.01 * ours[0]
    for a, b in zip(ours, ref):  # within 6% of torch's AdamW at every step
        assert abs(a - b) <= 0.06 * b + 1e-3
    rel = (params[0] - ref_params[0]).norm() / ref_params[0].norm()
    assert rel < 0.02
    state = opt.state[params[0]]
    n = sum(p.numel() for p in params)
    assert state["m_code0"].dtype == torch.int8 and state["v_code0"].dtype == torch.uint8
    assert state["m_code0"].numel() < n + 256  # one byte each, one flat buffer for the (small) group


def test_chunked_update_equals_one_chunk(monkeypatch):
    import lora_trainer.train.adamw8bit as mod

    whole, params_a, _ = _run(AdamW8bit, steps=20)
    monkeypatch.setattr(mod, "CHUNK", 1000)  # the 64x48 matrix alone, then the bias
    chunked, params_b, opt = _run(AdamW8bit, steps=20)
    assert "m_code1" in opt.state[params_b[0]]
    assert chunked == whole and all(torch.equal(a, b) for a, b in zip(params_a, params_b))


def test_state_dict_resumes_exactly():
    x, target, params = _problem(1)
    opt = AdamW8bit(params, lr=1e-2)

    def step(o, ps):
        loss = ((x @ ps[0] + ps[1] - x @ target) ** 2).mean()
        o.zero_grad()
        loss.backward()
        o.step()
        return loss.item()

    for _ in range(5):
        step(opt, params)
    saved_params = [copy.deepcopy(p) for p in params]
    saved = copy.deepcopy(opt.state_dict())
    cont = [step(opt, params) for _ in range(5)]
    resumed = AdamW8bit(saved_params, lr=1e-2)
    resumed.load_state_dict(saved)
    again = [step(resumed, saved_params) for _ in range(5)]
    assert again == cont


def test_learning_rate_as_a_tensor_and_groups():
    x, target, params = _problem(2)
    opt = AdamW8bit([{"params": params[:1], "lr": torch.tensor(1e-2)}, {"params": params[1:], "lr": 1e-3}])
    loss = ((x @ params[0] + params[1] - x @ target) ** 2).mean()
    loss.backward()
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    assert len(opt.state) == 2  # one flat state per group


def test_build_optimizer_falls_back_without_bitsandbytes():
    if bitsandbytes_works():
        pytest.skip("bitsandbytes imports here")
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer("AdamW8bit", [{"params": [p], "lr": 1e-3}], lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, AdamW8bit)
