"""bench/flux_vs_kohya.py's one-lever A/B runs: each patch changes one thing in this process for one of our runs
and returns its undo (bench-only; the product has no switch for these)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def fuse_qkv_only(out: Path):
    """Give the blocks a BlockMath with only single_qkv/double_qkv compiled (bench-only A/B); returns the undo."""
    from lora_trainer.accel import fused_math
    from lora_trainer.models.flux import block_math

    original = fused_math.fused_block_math

    def qkv_only(backend: str):
        return block_math.BlockMath(single_qkv=fused_math.fused(block_math.single_qkv, backend),
                                    double_qkv=fused_math.fused(block_math.double_qkv, backend))

    fused_math.fused_block_math = qkv_only

    def undo() -> None:
        fused_math.fused_block_math = original
    return undo


def eager_dequant(out: Path):
    """Leave the fp8 base's dequantisation to torch's own cast (bench-only A/B of accel's use_fused_dequant)."""
    from lora_trainer.accel import prepare

    original = prepare.use_fused_dequant
    prepare.use_fused_dequant = lambda model, device=None: 0

    def undo() -> None:
        prepare.use_fused_dequant = original
    return undo


def split_lora_product(out: Path):
    """The lean LoRA forward without QuantLinear.forward_with_lora: the base product, then addmm (bench-only A/B)."""
    from lora_trainer.accel import lora_fast

    original = lora_fast.QuantLinear
    lora_fast.QuantLinear = type("NotAQuantLinear", (), {})

    def undo() -> None:
        lora_fast.QuantLinear = original
    return undo


def heads_first_copy(out: Path):
    """q, k, v laid out (B, H, L, D) in memory as before `_heads_first` (so attention's output is transposed by a
    copy after it): bench-only A/B of the tokens-first layout."""
    from lora_trainer.models.flux import block_math

    original = block_math._heads_first
    block_math._heads_first = lambda *xs: tuple(x.transpose(1, 2).contiguous() for x in xs)

    def undo() -> None:
        block_math._heads_first = original
    return undo


def modulation_inside(out: Path):
    """Each block's modulation computed inside its checkpoint (recomputed in backward), as before
    `FluxTransformer._block_vec` (bench-only A/B)."""
    from lora_trainer.models.flux.model import FluxTransformer

    original = FluxTransformer._block_vec
    FluxTransformer._block_vec = lambda self, block, vec: vec

    def undo() -> None:
        FluxTransformer._block_vec = original
    return undo


def keep_recomputed_weight(out: Path):
    """Under gradient checkpointing, the lean LoRA product keeps the weight its recomputation dequantised for its own
    input gradient instead of dequantising it again in backward (bench-only A/B: a third of the fp8 base's
    dequantisation for up to one block's bf16 weights held during that block's backward)."""
    import torch
    from torch.nn import functional as F

    from lora_trainer.quant import linear as ql

    fn = ql._LoraProductFn
    original = fn.forward, fn.backward
    hooks = torch._C._autograd._top_saved_tensors_default_hooks  # set by checkpointing (kept only when recomputing)

    def forward(ctx, x, a, b, frozen, bias, dtype, compute8, fused):
        if compute8 or hooks(True) is None:
            return original[0](ctx, x, a, b, frozen, bias, dtype, compute8, fused)
        ctx.frozen, ctx.grad8, ctx.fused = frozen, False, fused
        x2 = ql._rows(x).to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            w = frozen.dequantize(dtype, x2.device, fused=fused)
            h = x2 @ a.t()
            y = F.linear(x2, w, bias)
            y.addmm_(h, b.t())
        ctx.save_for_backward(x2, h, a, b, w)
        ctx.shape, ctx.kept = x.shape, True
        return y.view(*x.shape[:-1], y.shape[-1])

    def backward(ctx, grad):
        if not getattr(ctx, "kept", False):
            return original[1](ctx, grad)
        x2, h, a, b, w = ctx.saved_tensors
        g2 = ql._rows(grad)
        gh = g2 @ b
        dx = (g2 @ w).addmm_(gh, a).view(ctx.shape) if ctx.needs_input_grad[0] else None
        return dx, gh.t() @ x2, g2.t() @ h, None, None, None, None, None

    fn.forward, fn.backward = staticmethod(forward), staticmethod(backward)

    def undo() -> None:
        fn.forward, fn.backward = staticmethod(original[0]), staticmethod(original[1])
    return undo


def tunable_gemm(out: Path):
    """torch.cuda.tunable (TunableOp): each GEMM shape timed against cuBLAS/cuBLASLt's candidates at its first call
    (in the eager warm-up steps), the fastest kept (in `results`); bench-only."""
    import torch

    if not torch.cuda.is_available():
        return lambda: None
    torch.cuda.tunable.set_filename(str(out / "tunableop_results.csv"))
    torch.cuda.tunable.enable(True)
    torch.cuda.tunable.tuning_enable(True)

    def undo() -> None:
        torch.cuda.tunable.tuning_enable(False)
        torch.cuda.tunable.enable(False)
    return undo


PATCHES: dict[str, Callable[[Path], Callable[[], None]]] = {
    "fused_qkv_only": fuse_qkv_only, "eager_dequant": eager_dequant, "split_lora_product": split_lora_product,
    "heads_first_copy": heads_first_copy, "modulation_inside": modulation_inside,
    "keep_recomputed_weight": keep_recomputed_weight, "tunable_gemm": tunable_gemm}


def apply(overrides: dict, out: Path) -> Callable[[], None] | None:
    """Pop the run's patch keys from `overrides` and apply them; the undo of all of them (None: no patch)."""
    undos = [PATCHES[k](out) for k in list(overrides) if k in PATCHES and overrides.pop(k)]
    if not undos:
        return None

    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo
