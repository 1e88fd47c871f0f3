"""Tensor functions compiled whole by torch.compile (CUDA with Triton only): Flux's weightless block math, the fp8
base weights' dequantisation (quant.formats.dequant8), and the fp8 products' per-row rounding (quant/fp8_products.py,
opt-in).

Between each Flux block's qkv projection and its attention sit the heads split, the fp32 RMS norms of q and k and
the fp32 rotary embedding: eager, a dozen full-size fp32 passes over q and k per block in the forward, more in the
backward, three times a step with checkpointing; around the projections, the modulated norms, the gated residual
adds and the single block's GELU beside its attention output. The model routes that math through `BlockMath`
(models/flux/block_math.py) as functions of tensors only; here they are compiled (`fullgraph`: one fused kernel group
each, no graph breaks) and put into every block. Outside CUDA, or without Triton (e.g. Windows), or where the first
compilation fails (for that kind of call: shapes, dtypes, grad mode), the eager functions run: the same function,
so the trained weights' math is unchanged.

Compiling happens at the first call of each shape and grad mode (the eager warm-up steps before a CUDA-graph
capture; the epoch-end scoring's first pass); inductor caches the kernels on disk for the next run.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_failed: list[str] = []  # the compile errors of this process (each for one kind of call, which then runs eagerly)

# Dynamo compiles a function at most 8 times (per code object) and then raises these; the block math is called
# from several places (image, text and joined streams; chunks of the modulation with their own strides and
# offsets; with and without grad) and legitimately needs more, so a new kind of call past the limit is compiled
# once more with a higher one. Calls matching an already compiled kind never get here.
_LIMIT_HIT = tuple(getattr(torch._dynamo.exc, name) for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit",
                                                                "RecompileLimitExceeded", "CacheLimitExceeded")
                   if hasattr(torch._dynamo.exc, name))
_VARIANTS = 64


def fused_math_available(device: Any) -> bool:
    """CUDA device, and torch.compile with a working Triton (inductor's GPU code generator)."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def _sig(a: Any) -> Any:
    return (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else tuple(map(_sig, a)) if isinstance(
        a, tuple) else a


def _key(args: tuple) -> tuple:
    """What tells one compiled graph from another here: the tensors' shapes and dtypes, the other arguments and
    whether autograd records (a block's recomputation under checkpointing has the same key as its forward)."""
    return (torch.is_grad_enabled(), *map(_sig, args))


def _limit_hit(e: BaseException) -> bool:
    # older releases (torch 2.3, Forge main's) raise a plain Unsupported("cache_size_limit reached")
    return isinstance(e, _LIMIT_HIT) or "cache_size_limit reached" in str(e)


def _limit_option() -> str:
    return "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


@functools.cache
def fused(fn: Callable, backend: str = "inductor") -> Callable:
    """`fn` (a function of tensors) compiled whole, called on CUDA tensors; eager for CPU tensors (with inductor)
    and for any kind of call the compiler could not handle. One wrapper per function and backend."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager_keys: set[tuple] = set()  # calls whose compiling failed: eager, forward and recomputation alike

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if backend == "inductor" and not args[0].is_cuda:
            return fn(*args)
        key = _key(args)
        if key in eager_keys:
            return fn(*args)
        try:
            try:
                return compiled(*args)
            except (torch._dynamo.exc.TorchDynamoException, *_LIMIT_HIT) as e:
                if not _limit_hit(e):
                    raise
                with torch._dynamo.config.patch(**{_limit_option(): _VARIANTS}):
                    return compiled(*args)
        except (torch._dynamo.exc.TorchDynamoException, *_LIMIT_HIT) as e:
            # only the compiler's own errors: anything else passes through, e.g. the exception with which
            # non-reentrant checkpointing stops a block's recomputation early, from inside this call
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # inside a CUDA-graph capture: the step runner falls back to eager steps itself
            eager_keys.add(key)
            _failed.append(f"{fn.__name__}: {type(e).__name__}: {e}")
            log.warning("%s could not be compiled for these inputs (%s); its eager version runs for them",
                        fn.__name__, str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
            return fn(*args)

    return call


@functools.cache
def fused_block_math(backend: str) -> Any:
    """One BlockMath of compiled functions per backend and process (compiled code is cached per function)."""
    from ..models.flux import block_math

    return block_math.BlockMath(**{name: fused(getattr(block_math, name), backend)
                                   for name in ("single_qkv", "double_qkv", "mod_norm", "gated_add", "single_out")})


def use_fused_math(model: nn.Module, device: Any = None, *, backend: str = "inductor") -> int:
    """Give every Flux block of `model` the fused math; returns how many blocks got it (0 where unavailable).
    `backend` other than inductor is for tests on the CPU (e.g. "aot_eager": traced, not compiled)."""
    from ..models.flux.block_math import BlockMath

    blocks = [m for m in model.modules() if isinstance(getattr(m, "math", None), BlockMath)]
    if not blocks or (backend == "inductor" and not fused_math_available(device)):
        return 0
    math = fused_block_math(backend)
    for m in blocks:
        m.math = math
    return len(blocks)


def use_fused_dequant(model: nn.Module, device: Any = None) -> int:
    """Let every fp8 frozen Linear of `model` (quant's QuantLinear over an Fp8Weight: Flux's fp8 base; accel's
    Fp8Linear) dequantise its weight in one compiled kernel (quant.formats.dequant8: the same values); returns how
    many (0 where unavailable). torch's own fp8 cast was a sixth of a Flux 24 GB step's GPU time."""
    from ..quant import Fp8Weight, QuantLinear
    from .fp8 import Fp8Linear

    if not fused_math_available(device):
        return 0
    layers = [m for m in model.modules()
              if isinstance(m, Fp8Linear) or (isinstance(m, QuantLinear) and isinstance(m.frozen, Fp8Weight))]
    for m in layers:
        m.fused_cast = True
    return len(layers)
