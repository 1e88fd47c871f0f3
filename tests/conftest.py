"""Shared test setup: offline, single-threaded, deterministic."""

from __future__ import annotations

import os

# No Hugging Face Hub here or in CI: anything that tries the network must fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Without a GPU, Triton's kernels (accel/group_norm_nhwc.py) run in its interpreter: it must be chosen before
# anything imports Triton (its own library functions are built at import, one way or the other)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
