"""Products with a frozen fp8 (e4m3fn) weight on fp8 tensor cores (`torch._scaled_mm`, compute capability >= 8.9:
Ada and Hopper), at twice the bf16 rate: the other operand rounded to e4m3 with one scale per row, the weight's
per-row scale applied in the product's epilogue. Used by accel.fp8.Fp8Linear and quant.QuantLinear when
accel's `fp8_matmul` is on (off by default until measured)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..torch_version import torch_at_least

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # e4m3fn's largest finite value


def fp8_matmul_supported(device: torch.device | str) -> bool:
    """Row-scaled fp8 products (`torch._scaled_mm` with per-row scales, torch >= 2.5) on this device: CUDA
    compute capability 8.9 or newer."""
    dev = torch.device(device)
    if FP8 is None or not hasattr(torch, "_scaled_mm") or dev.type != "cuda" or not torch.cuda.is_available():
        return False
    if not torch_at_least(2, 5):
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 9)


def fp8_product(x: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                dt: torch.dtype) -> torch.Tensor:
    """x @ (weight8 * scale).T + bias on fp8 tensor cores: x rounded to e4m3 with one scale per row (its largest
    magnitude maps to fp8's largest), the weight's per-row scale applied in the product's epilogue."""
    k = x.shape[-1]
    x8, xs = compiled(quantize_rows, x.device.type)(x.reshape(-1, k))
    y = torch._scaled_mm(x8, weight8.t(), scale_a=xs, scale_b=scale.float().reshape(1, -1),
                         bias=None if bias is None else bias.to(dt), out_dtype=dt)
    return y.view(*x.shape[:-1], y.shape[-1])


def quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor as e4m3fn with one fp32 scale per row (its largest magnitude maps to fp8's largest)."""
    # Two passes over x in its own dtype (an fp32 copy and clamps cost 4x the memory traffic: at Flux's shapes
    # that overhead equalled the fp8 product's whole gain, bench/results/fp8_products_h100.md). The row's max
    # magnitude is exact in any dtype; the scaled values land within 0.8% of 448 (two bf16 roundings), well under
    # 464, from where e4m3fn (no infinity) would give NaN.
    xs = (torch.linalg.vector_norm(x2, float("inf"), dim=1, keepdim=True).float() / FP8_MAX).clamp_(min=1e-12)
    return (x2 * xs.reciprocal().to(x2.dtype)).to(FP8), xs


def scaled_rows(grad2: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D gradient times the weight's per-row scale (over its columns), rounded to e4m3 per row."""
    return quantize_rows(grad2.float() * scale.float().reshape(1, -1))


@functools.cache
def compiled(fn: Callable, device_type: str) -> Callable:
    """`fn` as one fused kernel (torch.compile, accel/fused_math.py) where the device is CUDA with Triton, else
    `fn`: eager, rounding x takes two passes over it, 43 of the fp8 product's 97 ms per Flux forward on an H100
    (bench/results/fp8_products_h100.json)."""
    from ..accel.fused_math import fused, fused_math_available

    return fused(fn) if fused_math_available(device_type) else fn


def fp8_input_grad(grad: torch.Tensor, weight8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad @ (weight8 * scale) on fp8 tensor cores: the weight's per-row scale folded into grad's columns, grad
    rounded to e4m3 per row; the weight is read transposed (a per-call copy: _scaled_mm wants it column-major)."""
    n = grad.shape[-1]
    g8, gs = compiled(scaled_rows, grad.device.type)(grad.reshape(-1, n), scale)
    w_cols = weight8.t().contiguous().t()  # (N, K), column-major
    ones = torch.ones(1, weight8.shape[1], device=grad.device, dtype=torch.float32)
    dx = torch._scaled_mm(g8, w_cols, scale_a=gs, scale_b=ones, out_dtype=grad.dtype)
    return dx.view(*grad.shape[:-1], dx.shape[-1])


def fp8_product_fits(x: torch.Tensor, weight8: torch.Tensor, dt: torch.dtype) -> bool:
    """`x @ weight8.T` can run as a row-scaled fp8 product: _scaled_mm's layout rules (dimensions multiples of
    16), its row-scaled kernels' bf16 output, an e4m3fn weight on x's device."""
    return (dt == torch.bfloat16 and weight8.dtype == FP8 and weight8.device == x.device
            and x.shape[-1] % 16 == 0 and weight8.shape[0] % 16 == 0 and (x.numel() // x.shape[-1]) % 16 == 0)


def row_scale(scale: torch.Tensor | float | None, rows: int, device: torch.device) -> torch.Tensor:
    """A weight's scale as one fp32 value per output row (from none, one number, or one per row), made by kernels
    only: a number copied from the host (torch.as_tensor) cannot run inside a CUDA graph capture, where it made the
    whole Flux step fall back to eager (R1F in bench/results/flux_vs_kohya_h100_pool.md)."""
    if not isinstance(scale, torch.Tensor):
        return torch.full((rows,), 1.0 if scale is None else float(scale), dtype=torch.float32, device=device)
    return scale.to(device=device, dtype=torch.float32).reshape(-1).expand(rows).contiguous()
