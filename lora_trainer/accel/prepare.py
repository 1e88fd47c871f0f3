"""prepare_model: apply the model-side speed-ups once, after LoRA injection."""

from __future__ import annotations

import functools
import logging
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn

from ..quant import quant_layers, weights_kept_for_backward
from ..quant.fp8_products import fp8_matmul_supported
from . import geglu, group_norm_nhwc
from .channels_last import use_channels_last
from .fp8 import fp8_available, quantize_linears_fp8, use_fp8_products
from .fused_math import fused_math_available, use_fused_dequant, use_fused_math
from .geglu import use_fused_geglu
from .lora_fast import fuse_lora_layers
from .norms import lowp_norms, nhwc_group_norms
from .options import AccelOptions
from .triton_check import check_early

log = logging.getLogger(__name__)


def graph_safe_checkpointing(model: nn.Module, keep_recomputed_weights: bool = False) -> int:
    """Make diffusers' gradient checkpointing capturable in a CUDA graph.

    diffusers checkpoints with preserve_rng_state=True, which reads and restores the CUDA RNG
    state around each block; the UNet draws no random numbers inside its blocks (dropout 0 in
    training configs), so there is nothing to preserve and the state calls are what breaks a
    capture. Only diffusers versions with a per-module `_gradient_checkpointing_func` (>= 0.32)
    let us swap it; older ones keep theirs (and a failed capture falls back to eager steps).
    `keep_recomputed_weights`: the recomputation keeps the frozen quantised weights it dequantises for the block's
    backward (quant.weights_kept_for_backward), where the model has any.
    """
    kwargs: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": False}
    if keep_recomputed_weights and any(True for _ in quant_layers(model)):
        kwargs["context_fn"] = _recompute_keeping_weights
    func = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)
    n = 0
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            m._gradient_checkpointing_func = func
            n += 1
    return n


def _recompute_keeping_weights() -> tuple[Any, Any]:
    """torch checkpoint's context_fn: the weights saved in both passes (the checkpoint checks that its forward and
    its recomputation save the same tensors; it holds none of the forward's)."""
    return weights_kept_for_backward(), weights_kept_for_backward()


COMPILED_BLOCKS = ("BasicTransformerBlock",)


def check_kernels_early(opts: AccelOptions, device: Any, dtype: torch.dtype) -> Future | None:
    """Start the Triton kernels' checks `prepare_model` will ask for with these options (weights of `dtype` on CUDA
    `device`) in a thread (`opts.early_kernel_check`); None where there are none. Wait for it before the first
    step (its kernels must not run beside a CUDA graph's capture)."""
    if not (opts.enabled and opts.early_kernel_check) or not fused_math_available(device):
        return None
    checks = []
    if opts.lowp_norms and opts.channels_last and opts.nhwc_group_norm:
        checks.append(lambda: group_norm_nhwc.check_kernels(device, dtype))
    if opts.fused_geglu:
        checks.append(lambda: geglu.check_kernels(device, dtype))
    return check_early(checks) if checks else None


def compile_blocks(model: nn.Module, device: Any = None) -> int:
    """torch.compile every transformer block in place (CUDA only; compiled lazily at the first step).

    Per block rather than the whole UNet: the blocks of one level share one compiled graph, so
    compiling takes tens of seconds instead of minutes, and the rest of the step stays eager
    (and capturable by StepRunner's CUDA graph).
    """
    if device is None or torch.device(device).type != "cuda" or not hasattr(nn.Module, "compile"):
        return 0
    n = 0
    for m in model.modules():
        if type(m).__name__ in COMPILED_BLOCKS:
            m.compile()
            n += 1
    return n


def prepare_model(model: nn.Module, opts: AccelOptions | None = None, *, device: Any = None) -> dict[str, int]:
    """Apply `opts` to a LoRA-injected model (UNet or text encoder) in place; returns counts.

    Call after `inject_lora`, moving to the device/dtype and enabling gradient checkpointing, and
    before building the optimizer (fp8 replaces frozen Linear modules, never LoRA parameters).
    """
    opts = opts or AccelOptions()
    done = {"fused_lora": 0, "fp8_linears": 0, "fp8_products": 0, "channels_last": 0, "lowp_norms": 0,
            "checkpoint_funcs": 0, "compiled_blocks": 0, "fused_math_blocks": 0,
            "fused_dequant": 0, "nhwc_group_norms": 0, "nhwc_block_outputs": 0,
            "fused_resnets": 0, "fused_geglus": 0}
    if not opts.enabled:
        return done
    if opts.fp8_base:
        if fp8_available():
            done["fp8_linears"] = quantize_linears_fp8(model)
        else:
            log.warning("fp8 base weights need torch >= 2.1; keeping %s weights",
                        next(model.parameters()).dtype)
    if opts.fp8_matmul and device is not None and fp8_matmul_supported(device):
        # the fp8 base from fp8_base above, or one the model placement made (Flux) or the host keeps
        done["fp8_products"] = use_fp8_products(model, backward=opts.fp8_matmul_backward)
    if opts.fused_lora:
        done["fused_lora"] = fuse_lora_layers(model, opts.lean_lora_product)
    if opts.lowp_norms:
        nhwc = opts.channels_last and opts.nhwc_group_norm and fused_math_available(device)
        done["lowp_norms"] = lowp_norms(model, nhwc=nhwc)
        done["nhwc_group_norms"] = nhwc_group_norms(model)
    on_cuda = torch.device(device).type == "cuda" if device is not None else True  # CUDA-only levers
    if opts.channels_last and on_cuda:
        done.update(use_channels_last(model))
        done["channels_last"] = 1
    # where the weights are on CUDA and the kernels pass their check; a CUDA device without a usable Triton (Windows'
    # usual torch, a GPU before Volta) keeps diffusers' GEGLU without a word, as the GroupNorms above keep torch's
    if opts.fused_geglu and on_cuda and (device is None or fused_math_available(device)):
        done["fused_geglus"] = use_fused_geglu(model)
    done["checkpoint_funcs"] = graph_safe_checkpointing(model, opts.keep_recomputed_weights)
    if opts.compile_blocks:
        done["compiled_blocks"] = compile_blocks(model, device)
    if opts.fused_math:
        done["fused_math_blocks"] = use_fused_math(model, device)
        done["fused_dequant"] = use_fused_dequant(model, device)
    log.info("accel.prepare_model: %s", done)
    return done
