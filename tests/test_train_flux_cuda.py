"""GPU checks of the Flux memory plan (skipped without CUDA): block swap through CUDA streams and pinned
host memory, fp8 base weights, offloaded checkpoints and the fast path (fused LoRA forward, CUDA graphs)
give the losses of plain bf16 training without swap (exactly where the arithmetic is the same, within
tolerance where fp8 rounds the frozen weights).

    python -m pytest tests/test_train_flux_cuda.py
"""

from __future__ import annotations

import pytest
import torch
from train_support import make_dataset, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


_RUNS: dict[str, list[float]] = {}  # losses per setting, shared by the tests (each run once per session)
_SETTINGS = {
    "eager": {"accel": "off"},  # the reference: bf16, no swap, no graphs
    "fast": {},
    "swap": {"blocks_to_swap": 4},  # 2 double + 4 single blocks streamed
    "fp8": {"fp8_base": True},
    "fp8_swap_offload": {"fp8_base": True, "blocks_to_swap": 4, "cpu_offload_checkpointing": True},
}


def _losses(data, tmp_path_factory, key: str) -> list[float]:
    """Four steps of a small Flux (2 double + 4 single blocks, 256 wide) at 128 px, bf16, checkpointed."""
    from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
    from lora_trainer.train import run_training

    if key not in _RUNS:
        base = {"resolution": 128, "min_bucket_reso": 128, "max_bucket_reso": 128, "bucket_reso_steps": 64,
                "device": "cuda", "mixed_precision": "bf16", "gradient_checkpointing": True, "max_steps": 4,
                "epochs": 0, "t5_max_token_length": 32, "learning_rate": 1e-3, "save_precision": "float",
                **_SETTINGS[key]}
        bundle = build_tiny_flux_bundle("dev", seed=3, depth=2, depth_single=4, hidden=256, num_heads=4)
        result = run_training(tiny_config(data, tmp_path_factory.mktemp(key), **base), bundle=bundle,
                              owns_bundle=True)
        assert all(torch.isfinite(torch.tensor(result.losses))), result.losses
        _RUNS[key] = list(result.losses)
    return _RUNS[key]


def _close(a, b, rel):
    return len(a) == len(b) and all(abs(x - y) <= rel * abs(y) + 1e-4 for x, y in zip(a, b))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("flux-cuda"), n=3, repeats=2, sizes=[(128, 128)] * 3)


def test_fast_path_matches_eager_bf16(data, tmp_path_factory):
    fast, eager = _losses(data, tmp_path_factory, "fast"), _losses(data, tmp_path_factory, "eager")
    assert _close(fast, eager, 2e-2), (fast, eager)  # fused LoRA + CUDA graphs stay within bf16 noise


def test_block_swap_matches_no_swap(data, tmp_path_factory):
    # streaming the weights changes no arithmetic (exact on the CPU, tests/test_train_flux.py); on the GPU
    # attention's backward accumulates with atomics, so two runs agree to rounding only
    swapped, fast = _losses(data, tmp_path_factory, "swap"), _losses(data, tmp_path_factory, "fast")
    assert _close(swapped, fast, 2e-3), (swapped, fast)


def test_fp8_base_with_swap_and_offload_matches_bf16(data, tmp_path_factory):
    fp8, both = _losses(data, tmp_path_factory, "fp8"), _losses(data, tmp_path_factory, "fp8_swap_offload")
    assert _close(both, fp8, 2e-3), (both, fp8)
    assert _close(fp8, _losses(data, tmp_path_factory, "eager"), 5e-2), fp8  # fp8 rounds the frozen weights
