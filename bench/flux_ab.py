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
    "tunable_gemm": tunable_gemm}


def apply(overrides: dict, out: Path) -> Callable[[], None] | None:
    """Pop the run's patch keys from `overrides` and apply them; the undo of all of them (None: no patch)."""
    undos = [PATCHES[k](out) for k in list(overrides) if k in PATCHES and overrides.pop(k)]
    if not undos:
        return None

    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo
