"""accel.attention: cuDNN attention first for a run on Hopper, the backend flags restored after it.

No GPU here: the Hopper check is forced on for the flag tests (PyTorch's backend flags and priority order exist
and are settable in CPU builds too); which kernel then runs on a GPU is measured by bench/sdpa_backends.py."""

from __future__ import annotations

import inspect

import pytest
import torch

from lora_trainer.accel import AccelOptions, attention, describe

sdpa = pytest.importorskip("torch.nn.attention")
if "set_priority" not in inspect.signature(sdpa.sdpa_kernel).parameters:
    pytest.skip("this torch's sdpa_kernel takes no priority order (torch < 2.6)", allow_module_level=True)

B = sdpa.SDPBackend


def _state():
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(),
            cuda.cudnn_sdp_enabled(), list(torch._C._get_sdp_priority_order()))


def test_not_hopper_or_cpu_changes_nothing():
    before = _state()
    with attention.preferred_attention("cpu") as on:
        assert on is False and _state() == before
    assert not attention.cudnn_first_supported("cpu")


def test_cudnn_first_within_and_the_hosts_flags_back_after(monkeypatch):
    monkeypatch.setattr(attention, "cudnn_first_supported", lambda device: True)
    torch.backends.cuda.enable_mem_efficient_sdp(False)  # a host's own choice
    try:
        before = _state()
        with attention.preferred_attention("cuda") as on:
            assert on is True
            assert torch._C._get_sdp_priority_order()[0] == int(B.CUDNN_ATTENTION)
            assert not torch.backends.cuda.mem_efficient_sdp_enabled()  # still off
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert _state() == before
        with pytest.raises(RuntimeError), attention.preferred_attention("cuda"):
            raise RuntimeError("a failed run")
        assert _state() == before
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(True)


def test_cudnn_turned_off_by_the_host_or_accel_off_is_respected(monkeypatch):
    monkeypatch.setattr(attention, "cudnn_first_supported", lambda device: True)
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        before = _state()
        with attention.preferred_attention("cuda") as on:
            assert on is False and _state() == before
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    with attention.preferred_attention("cuda", enabled=False) as on:
        assert on is False
    from types import SimpleNamespace

    assert AccelOptions.from_config(SimpleNamespace()).cudnn_attention is False  # off until measured
    assert AccelOptions.from_config(SimpleNamespace(cudnn_attention=True)).cudnn_attention is True
    assert AccelOptions.from_config(SimpleNamespace(accel="off", cudnn_attention=True)).cudnn_attention is False
    assert "cuDNN attention" not in describe(AccelOptions(), "cpu")
