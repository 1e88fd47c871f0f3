#!/usr/bin/env python3
"""PyTorch's attention backends side by side on the attention shapes our training steps run (issues 14 and 15).

Times forward+backward of each shape with torch's own choice and with each backend forced, checks each backend's
output and gradients against an fp32 reference, and tries a CUDA-graph capture of a cuDNN forward+backward (the
training step is replayed as a graph). Measured on an H100 (bench/results/sdpa_backends_h100.md): cuDNN 1.65-1.9x
FlashAttention 2, and torch 2.11 already picks cuDNN on Hopper.

    python bench/sdpa_backends.py --out $OUT/sdpa_backends.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# name: (batch, heads, query length, key length, head dim)
SHAPES = {
    "flux 1024px b1 (joint attention)": (1, 24, 4608, 4608, 128),
    "flux 512px b1 (joint attention)": (1, 24, 1536, 1536, 128),
    "sdxl 1024px b1 self, level 1": (1, 10, 4096, 4096, 64),
    "sdxl 1024px b1 self, level 2": (1, 20, 1024, 1024, 64),
    "sdxl 1024px b1 cross, level 1": (1, 10, 4096, 77, 64),
    "sd15 512px b8 self, level 1": (8, 8, 4096, 4096, 40),
    "sd15 512px b8 self, level 2": (8, 8, 1024, 1024, 80),
    "sd15 512px b8 self, level 3": (8, 8, 256, 256, 160),
    "sd15 512px b1 self, level 1": (1, 8, 4096, 4096, 40),
    "sd15 512px b8 cross, level 1": (8, 8, 4096, 77, 40),
}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def _inputs(shape, dtype, seed=0):
    b, h, lq, lk, d = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, lq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, h, lk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, h, lk, d, device="cuda", dtype=dtype, generator=g)
    dout = torch.randn(b, h, lq, d, device="cuda", dtype=dtype, generator=g)
    return [t.requires_grad_(True) for t in (q, k, v)], dout


def _run(q, k, v, dout):
    out = F.scaled_dot_product_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return out, grads


def _time(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _flops(shape) -> float:
    b, h, lq, lk, d = shape
    fwd = 4 * b * h * lq * lk * d
    return fwd * 3.5  # forward + backward (2.5x the forward)


def _graph_capture(shape, dtype) -> str:
    """A cuDNN forward+backward captured in a CUDA graph and replayed: 'ok (max diff ...)' or the error."""
    (q, k, v), dout = _inputs(shape, dtype, seed=1)
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    _run(q, k, v, dout)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out, grads = _run(q, k, v, dout)
            graph.replay()
            torch.cuda.synchronize()
            ref_out, ref_grads = _run(q, k, v, dout)
        diff = max(float((a - b).abs().max()) for a, b in zip((out, *grads), (ref_out, *ref_grads)))
        return f"ok (replay vs eager max diff {diff:.2e})"
    except Exception as e:  # noqa: BLE001 (reported, the benchmark goes on)
        return f"{type(e).__name__}: {str(e)[:300]}"


def _measure(name: str, shape, dtype, iters: int) -> dict:
    """One shape: default and per-backend forward+backward time, and each backend's error against fp32 math."""
    (q, k, v), dout = _inputs(shape, dtype)
    ref_in = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_grads = _run(*ref_in, dout.float())
    row: dict = {"shape": name, "bhlld": list(shape), "default_ms": round(_time(lambda: _run(q, k, v, dout), iters), 3)}
    for label, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend):
                out, grads = _run(q, k, v, dout)
                ms = _time(lambda: _run(q, k, v, dout), iters)
        except RuntimeError as e:
            row[label] = f"not available: {str(e).splitlines()[0][:160]}"
            continue
        errs = [float((x.float() - y).abs().max() / y.abs().max()) for x, y in zip((out, *grads), (ref_out, *ref_grads))]
        row[label] = {"ms": round(ms, 3), "tflops": round(_flops(shape) / ms / 1e9, 1),
                      "max_rel_err_out_dq_dk_dv": [f"{e:.1e}" for e in errs]}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="sdpa_backends.json")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    report = {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "dtype": a.dtype,
              "default_priority": [SDPBackend(int(x)).name for x in torch._C._get_sdp_priority_order()]
              if hasattr(torch._C, "_get_sdp_priority_order") else None, "shapes": []}
    for name, shape in SHAPES.items():
        row = _measure(name, shape, dtype, a.iters)
        print(json.dumps(row), flush=True)
        report["shapes"].append(row)
        torch.cuda.empty_cache()
    report["cudnn_graph_capture"] = {n: _graph_capture(SHAPES[n], dtype) for n in
                                     ("flux 512px b1 (joint attention)", "sd15 512px b1 self, level 1")}
    print(json.dumps(report["cudnn_graph_capture"]))
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
