"""torch_version.torch_at_least: release, local and pre-release version strings."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.torch_version import torch_at_least


@pytest.mark.parametrize("version, need, expected", [
    ("2.1.2+cu121", (2, 3), False), ("2.3.1", (2, 3), True), ("2.13.0+cpu", (2, 8), True),
    ("2.8.0a0+git5a2f7e9", (2, 8), True), ("2.10.0rc1", (2, 10), True), ("2.7.1", (2, 8), False),
])
def test_torch_at_least(monkeypatch, version, need, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_at_least(*need) is expected
