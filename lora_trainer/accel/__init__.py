"""Speed and memory levers the training engine opts into (issue 7).

Contract (docs/internals.md, "accel/"): `AccelOptions.from_config`, `prepare_model`,
`optimizer_kwargs`, `StepRunner`. Every lever falls back to the plain path without CUDA.
"""

from __future__ import annotations

from .fp8 import Fp8Conv2d, Fp8Linear, quantize_linears_fp8
from .geglu import restore_geglu, use_fused_geglu
from .graphs import StepRunner
from .lora_fast import fuse_lora_layers, unfuse_lora_layers
from .norms import lowp_norms, restore_norms
from .options import AccelOptions, describe, optimizer_kwargs
from .prepare import check_kernels_early, compile_blocks, graph_safe_checkpointing, prepare_model

__all__ = [
    "AccelOptions",
    "Fp8Conv2d",
    "Fp8Linear",
    "StepRunner",
    "check_kernels_early",
    "compile_blocks",
    "describe",
    "fuse_lora_layers",
    "graph_safe_checkpointing",
    "lowp_norms",
    "optimizer_kwargs",
    "prepare_model",
    "quantize_linears_fp8",
    "restore_geglu",
    "restore_norms",
    "unfuse_lora_layers",
    "use_fused_geglu",
]
