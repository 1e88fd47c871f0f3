#!/usr/bin/env python3
"""Where the time of a frozen fp8 Linear's product goes, at Flux.1's shapes (1024 px, batch 1: 4096 image
tokens, 512 text tokens), on the GPU machine (issue 15's fp8-product lever; accel `fp8_matmul`).

Per layer shape, milliseconds per call (CUDA events, median of 30 after 10 warm-up calls):
  bf16         F.linear with a bf16 weight already on the GPU (the ceiling without fp8 tensor cores)
  dequant      our default over an fp8 base (quant.QuantLinear): weight fp8 -> bf16 (x scale), then F.linear
  ours_fp8     quant/fp8_products.fp8_product: x rounded to e4m3 per row, torch._scaled_mm with per-row scales
  quant_x      only the per-row rounding of x (ours_fp8's overhead: quant/fp8_products.quantize_rows)
  mm_rowwise   only torch._scaled_mm with per-row scales (x already fp8)
  mm_tensor    only torch._scaled_mm with one scale per tensor (the fastest fp8 kernel)
and the sums over one Flux forward pass (19 double blocks: image and text streams; 38 single blocks).

    python bench/fp8_products.py --out $OUT/fp8_products.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.quant.fp8_products import FP8, FP8_MAX, fp8_product, quantize_rows, row_scale

# (name, tokens, in, out, count per forward)
SHAPES = [
    ("double img qkv", 4096, 3072, 9216, 19), ("double img proj", 4096, 3072, 3072, 19),
    ("double img mlp0", 4096, 3072, 12288, 19), ("double img mlp2", 4096, 12288, 3072, 19),
    ("double txt qkv", 512, 3072, 9216, 19), ("double txt proj", 512, 3072, 3072, 19),
    ("double txt mlp0", 512, 3072, 12288, 19), ("double txt mlp2", 512, 12288, 3072, 19),
    ("single linear1", 4608, 3072, 21504, 38), ("single linear2", 4608, 15360, 3072, 38),
]


def timed(fn, iters: int = 30, warm: int = 10) -> float:
    try:
        fn()
    except RuntimeError as exc:  # e.g. a scaling mode this torch's _scaled_mm lacks
        print(f"  skipped: {exc}"[:200], flush=True)
        return float("nan")
    for _ in range(warm):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(name: str, m: int, k: int, n: int, count: int, dev: torch.device, g: torch.Generator) -> dict:
    x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
    w16 = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    w8 = w16.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)  # a plain-cast fp8 checkpoint's weight
    ones = row_scale(None, n, dev)
    x8 = (x.float() / (x.float().abs().amax(1, keepdim=True) / FP8_MAX)).to(FP8)
    xs = (x.float().abs().amax(1, keepdim=True) / FP8_MAX)
    one = torch.ones((), device=dev)

    def quant_x():
        return quantize_rows(x)

    row = {"layer": name, "m": m, "k": k, "n": n, "count": count,
           "bf16": timed(lambda: torch.nn.functional.linear(x, w16)),
           "dequant": timed(lambda: torch.nn.functional.linear(x, w8.to(torch.bfloat16))),
           "ours_fp8": timed(lambda: fp8_product(x, w8, ones, None, torch.bfloat16)),
           "quant_x": timed(quant_x),
           "mm_rowwise": timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ones.reshape(1, -1),
                                                        out_dtype=torch.bfloat16)),
           "mm_tensor": timed(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                       out_dtype=torch.bfloat16))}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows, totals = [], {}
    for name, m, k, n, count in SHAPES:
        row = measure(name, m, k, n, count, dev, g)
        row["tflops_bf16"] = round(2 * m * k * n / row["bf16"] / 1e9, 1)
        row["tflops_mm_rowwise"] = round(2 * m * k * n / row["mm_rowwise"] / 1e9, 1)
        rows.append(row)
        for key in ("bf16", "dequant", "ours_fp8", "quant_x", "mm_rowwise", "mm_tensor"):
            totals[key] = totals.get(key, 0.0) + row[key] * count
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": rows,
           "forward_ms": {k: round(v, 2) for k, v in totals.items()},
           "command": "python bench/fp8_products.py --out $OUT/fp8_products.json"}
    print("one forward pass, ms:", out["forward_ms"])
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
