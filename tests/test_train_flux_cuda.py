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


def _run(data, out, **kw):
    from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
    from lora_trainer.train import run_training

    base = {"resolution": 256, "min_bucket_reso": 256, "max_bucket_reso": 256, "bucket_reso_steps": 64,
            "device": "cuda", "mixed_precision": "bf16", "gradient_checkpointing": True, "max_steps": 5, "epochs": 0,
            "t5_max_token_length": 64, "learning_rate": 1e-3, "save_precision": "float"}
    base.update(kw)
    bundle = build_tiny_flux_bundle("dev", seed=3, depth=3, depth_single=6, hidden=512, num_heads=8)
    result = run_training(tiny_config(data, out, **base), bundle=bundle, owns_bundle=True)
    assert all(torch.isfinite(torch.tensor(result.losses))), result.losses
    return result.losses


def _close(a, b, rel):
    return all(abs(x - y) <= rel * abs(y) + 1e-4 for x, y in zip(a, b))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("flux-cuda"), n=3, repeats=2, sizes=[(256, 256)] * 3)


def test_swap_fp8_offload_and_fast_path_match_plain_bf16(tmp_path, data):
    eager = _run(data, tmp_path / "eager", accel="off")  # the reference: bf16, no swap, no graphs
    fast = _run(data, tmp_path / "fast")
    swapped = _run(data, tmp_path / "swap", blocks_to_swap=4)  # 2 double + 4 single blocks streamed
    # streaming the weights changes no arithmetic (exact on the CPU, tests/test_train_flux.py); on the GPU
    # attention's backward accumulates with atomics, so two runs agree to rounding only
    assert _close(swapped, fast, 2e-3), (swapped, fast)
    assert _close(fast, eager, 2e-2), (fast, eager)  # the fast path stays within bf16 noise
    fp8 = _run(data, tmp_path / "fp8", fp8_base=True)
    fp8_swap_offload = _run(data, tmp_path / "fp8swap", fp8_base=True, blocks_to_swap=4, cpu_offload_checkpointing=True)
    assert _close(fp8_swap_offload, fp8, 2e-3), (fp8_swap_offload, fp8)
    assert _close(fp8, eager, 5e-2), (fp8, eager)
