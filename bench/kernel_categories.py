"""GPU kernel time by kind, from a torch.profiler trace: what bench/speed.py's and bench/flux_vs_kohya.py's
profiles report (where a step's time goes)."""

from __future__ import annotations

from typing import Any

_KINDS = (  # first match wins: attention before gemm (cuDNN's attention kernels name gemm-like parts)
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax", "cudnn_generated_fort_native_sdpa")),
    ("conv", ("conv", "fprop", "dgrad", "wgrad", "implicit_gemm", "winograd")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "gemv", "matmul", "splitk", "scaled_mm", "f8f8")),
    ("fused (triton)", ("triton_",)),
    ("norm", ("norm", "welford", "moments", "gammabeta")),
    ("optimizer/clip", ("adam", "multi_tensor", "foreach")),
    ("copy/cast/layout", ("copy", "cast", "transpose", "permute", "nchw", "nhwc", "convert", "memcpy", "memset")),
    ("reduction", ("reduce", "sum", "mean")),
)


def classify(name: str) -> str:
    n = name.lower()
    return next((kind for kind, keys in _KINDS if any(k in n for k in keys)), "elementwise/other")


def summarize(prof: Any, steps: int, wall_s: float, top: int = 15) -> dict[str, Any]:
    """Per step: GPU kernel time (ms), its share of the wall clock, kernels, time by kind, the top kernels."""
    import torch

    total, count, kinds, names = 0.0, 0, {}, {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = ev.device_time_total
        total, count = total + t, count + 1
        kinds[classify(ev.name)] = kinds.get(classify(ev.name), 0.0) + t
        names[ev.name] = names.get(ev.name, 0.0) + t
    per = max(steps, 1) * 1e3  # profiler times are in microseconds
    return {"steps": steps, "wall_ms_per_step": round(wall_s / max(steps, 1) * 1e3, 2),
            "gpu_kernel_ms_per_step": round(total / per, 2),
            "gpu_busy": round(total / 1e6 / wall_s, 3) if wall_s else None,
            "kernels_per_step": count // max(steps, 1),
            "by_kind_ms": {k: round(v / per, 2) for k, v in sorted(kinds.items(), key=lambda x: -x[1])},
            "top_kernels_ms": [(k[:110], round(v / per, 3)) for k, v in sorted(names.items(), key=lambda x: -x[1])[:top]]}
