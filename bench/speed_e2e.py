#!/usr/bin/env python3
"""End to end through `run_training`: accel on ("auto") vs off, SD1.5-size random model.

kohya's benchmark settings (512 px, LoRA r32/alpha 16 on kohya's target set, UNet only, bf16,
AdamW, clip 1.0, cached latents and captions), 32 generated images, the model already in memory
(as inside the WebUI). Reported per case: it/s and images/s over the steps after warm-up, the time
from calling run_training to the end of the first step, the final loss, peak VRAM.

    python bench/speed_e2e.py --out results.json            # CUDA machine (~2 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from handoff_models import host_generation
from train_speed import full_size_bundle, make_dataset

from lora_trainer.config import TrainConfig
from lora_trainer.models.bundle import Family
from lora_trainer.train import run_training
from lora_trainer.train.placement import place_bundle


def run_case(bundle, data: Path, out: Path, accel: str, batch: int, steps: int, warmup: int,
             precision: str = "bf16") -> dict:
    config = TrainConfig().with_preset("sd15")
    config.mixed_precision = precision
    config.data, config.output_dir, config.name = str(data), str(out), f"e2e-{accel}-{batch}"
    config.rank, config.alpha, config.train_text_encoder = 32, 16.0, False
    config.resolution, config.batch_size, config.max_steps, config.epochs = 512, batch, steps, 0
    config.save_state, config.overwrite, config.device, config.accel = False, True, "cuda", accel
    config.lr_scheduler, config.learning_rate = "constant", 1e-4
    times: dict[int, float] = {}

    phases: dict[str, float] = {}

    def on_event(e):
        if e.kind == "step":
            torch.cuda.synchronize()
            times[e.step] = time.perf_counter()
        else:  # where the time before the first step goes (plan, latent caching, ...)
            phases.setdefault(f"{e.kind}: {(e.message or '')[:40]}", round(time.perf_counter() - t0, 2))

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = run_training(config, bundle=bundle, on_event=on_event)
    timed = [s for s in sorted(times) if s > warmup]
    its = (len(timed) - 1) / (times[timed[-1]] - times[timed[0]])
    return {"accel": accel, "precision": precision, "batch": batch, "steps": res.steps, "it_per_s": round(its, 3),
            "images_per_s": round(its * batch, 2), "first_step_s": round(times[min(times)] - t0, 2),
            "phases_s": {k: v for k, v in phases.items() if v <= times[min(times)] - t0},
            "wall_s": round(time.perf_counter() - t0, 1), "final_loss": res.final_loss,
            "mean_loss": sum(res.losses) / len(res.losses),
            "peak_alloc_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "speed_e2e.json"))
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--cudnn-benchmark", type=int, default=0, help="1: autotune convs (costs seconds per new shape)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precision", choices=["bf16", "fp16"], default="bf16",
                   help="fp16: loss scaling, as on GPUs without bf16 (GTX 16xx, RTX 20xx)")
    p.add_argument("--host-warm", action="store_true",
                   help="first generate one image with the model (20 UNet steps + VAE decode), as a WebUI has "
                        "done before anyone presses Train, and report that time apart")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    # The engine leaves cuDNN's autotuning as the host set it (off by default); so does this
    # benchmark unless asked, so the first case's time to first step is what a fresh process sees.
    torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)
    work = Path(tempfile.mkdtemp(prefix="e2e-"))
    rows = []
    try:
        data = make_dataset(work / "data", 512, a.images)
        bundle = place_bundle(full_size_bundle(Family.SD1, torch.device("cuda")), "cuda",
                              torch.float16 if a.precision == "fp16" else torch.bfloat16)
        host_warm_s = host_generation(bundle.unet, bundle.vae) if a.host_warm else None
        plan = {1: (60, 10), 8: (24, 8)}
        for batch in (int(b) for b in a.batches.split(",")):
            steps, warmup = plan.get(batch, (24, 8))
            for accel in ("auto", "off"):
                try:
                    row = run_case(bundle, data, work / "out", accel, batch, steps, warmup, a.precision)
                except Exception as e:  # noqa: BLE001 - record and go on
                    row = {"accel": accel, "batch": batch, "error": f"{type(e).__name__}: {e}"[:400]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.argv),
           "cudnn_benchmark": bool(a.cudnn_benchmark), "host_generation_s": host_warm_s}
    Path(a.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1), encoding="utf-8")
    for r in rows:
        print(f"accel={r['accel']:4s} batch {r['batch']}: {r.get('it_per_s')} it/s {r.get('images_per_s')} img/s, "
              f"first step {r.get('first_step_s')} s, loss {r.get('mean_loss')}, peak {r.get('peak_alloc_GiB')} "
              f"GiB {r.get('error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
