#!/usr/bin/env python3
"""Where the first training step of a process spends its time, outside our engine.

A WebUI that has generated images has loaded CUDA's inference kernels; the first training step
still meets kernels it never ran (backward convs and GEMMs, the fused optimizer), which CUDA loads
lazily and cuDNN plans on first use. This probe times, in a fresh process, with the SD1.5 UNet
(random weights, bf16) after a txt2img's worth of no-grad forwards:
the first, second and third forward+backward at 512 px batch 1, and the first fused AdamW step.

    python bench/first_step_probe.py                            # CUDA lazy loading (the default)
    CUDA_MODULE_LOADING=EAGER python bench/first_step_probe.py  # every kernel loaded at CUDA init
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    t_cuda = time.perf_counter() - t_start
    from handoff_models import host_generation
    from train_speed import full_size_bundle

    from lora_trainer.models.bundle import Family

    unet = full_size_bundle(Family.SD1, torch.device("cuda")).unet.to(torch.bfloat16)
    ctx = torch.randn(2, 77, 768, device="cuda", dtype=torch.bfloat16)
    lat = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.bfloat16)
    row = {"cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING", "LAZY (default)"),
           "cuda_init_s": round(t_cuda, 2), "host_generation_s": host_generation(unet)}
    x = lat[:1].float().requires_grad_(True)
    for n in (1, 2, 3):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = unet(x, 500, encoder_hidden_states=ctx[:1]).sample
        out.float().square().mean().backward()
        torch.cuda.synchronize()
        row[f"forward_backward_{n}_s"] = round(time.perf_counter() - t0, 3)
    params = [torch.zeros(320, 32, device="cuda", requires_grad=True) for _ in range(64)]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for n in (1, 2):
        t0 = time.perf_counter()
        opt.step()
        torch.cuda.synchronize()
        row[f"fused_adamw_{n}_s"] = round(time.perf_counter() - t0, 3)
    row.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version())
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
