#!/usr/bin/env python3
"""Data-parallel scaling (issue 16): img/s on 1 vs 2/4/8 GPUs, SD1.5 at 512 px and SDXL at 1024 px.

Each run is the real command a user types, as a fresh process: `python -m lora_trainer train --config
<toml> --gpus N` (N = 1 is the single-GPU path, no process group), on a random full-size checkpoint
(`tests/webui/random_checkpoint.py`, fp16, A1111/SGM layout) and 64 random-pixel captioned images in one
bucket. Same settings for every N: per-GPU batch 8 (so N GPUs train 8N images per step), LoRA rank 32 /
alpha 16 on kohya's default modules, UNet only, bf16, SDPA, AdamW 1e-4 constant, clip 1.0, latents and
text-encoder outputs cached in memory, accel "auto" (fused LoRA + CUDA graphs; under DDP the graphs are
captured after 11 eager steps per shape), no samples, no state, one save at the end.

Measured from rank 0's progress lines: steady it/s = the windowed rate the CLI prints at the last step
(the last 20 steps, training time only, so after warm-up and graph capture), img/s = it/s x 8 x N,
speedup = img/s(N) / img/s(1), efficiency = speedup / N; also the whole command's wall clock, the time
to the first step line, and rank 0's peak reserved GPU memory. Target: speedup >= 1.8 on 2 GPUs at
per-GPU batch 8.

    python bench/ddp_scaling.py --out bench/results/ddp_scaling_h200x8.json           # every GPU count up to all
    python bench/ddp_scaling.py --gpus 1,2 --families sd15 --out /tmp/ddp.json          # a quick pair
    python bench/ddp_scaling.py --smoke --out /tmp/ddp_smoke.json                       # CPU, gloo, tiny model

NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 unless already set). On machines without network, diffusers travels as a wheel:
see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# family: (checkpoint family, resolution, steps at each GPU count)
FAMILIES = {"sd15": ("sd1", 512, 60), "sdxl": ("sdxl", 1024, 40)}
RANK, ALPHA, LR, BATCH, IMAGES, REPEATS = 32, 16, 1e-4, 8, 64, 10
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
STEP = re.compile(r"^step (\d+)/(\d+) .*?(?:  ([\d.]+) it/s)?(?:  ETA [\d:]+)?(?:  GPU memory ([\d.]+) GiB)?$")


def make_dataset(root: Path, size: int, count: int) -> Path:
    """`root/img/10_bench/NNN.png` + captions, one bucket (square images)."""
    from random_data import random_pixels_dataset  # bench/ is on sys.path when a benchmark runs

    return random_pixels_dataset(root, size, count, repeats=REPEATS, caption="bench, random pixels, image {i}")


def write_config(path: Path, ckpt: Path, data: Path, out: Path, res: int, batch: int, steps: int,
                 device: str, accel: str) -> None:
    settings = {
        "model": str(ckpt), "data": str(data), "output_dir": str(out), "name": "ddp", "resolution": res,
        "batch_size": batch, "max_steps": steps, "epochs": 0, "rank": RANK, "alpha": float(ALPHA),
        "learning_rate": LR, "train_text_encoder": False, "mixed_precision": "bf16", "gradient_checkpointing": False,
        "optimizer": "AdamW", "lr_scheduler": "constant", "max_grad_norm": 1.0, "save_state": False,
        "overwrite": True, "device": device, "save_precision": "fp16", "min_bucket_reso": min(256, res),
        "max_bucket_reso": max(1024, res), "bucket_reso_steps": min(64, res // 2), "flip_aug": False,
        "shuffle_caption": False, "accel": accel, "seed": 0,
    }
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()) + "\n", encoding="utf-8")


def run_case(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict:
    """Run one training command; what its progress lines and the clock say."""
    t0 = time.time()
    first_step = None
    lines: list[str] = []
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # past the timeout (a hang, silent or not): SIGTERM to the launcher, which stops its workers
        timer = threading.Timer(timeout, proc.terminate)
        timer.start()
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                lines.append(line.rstrip("\n"))
                if first_step is None and line.startswith("step 1/"):
                    first_step = time.time() - t0
            rc = proc.wait()
        finally:
            timer.cancel()
    steps = [m for m in (STEP.match(line) for line in lines) if m]
    last = steps[-1] if steps else None
    peaks = [float(m.group(4)) for m in steps if m.group(4)]
    return {"returncode": rc, "wall_s": round(time.time() - t0, 2),
            "first_step_s": None if first_step is None else round(first_step, 2),
            "steps": int(last.group(1)) if last else 0,
            "it_s": float(last.group(3)) if last and last.group(3) else None,
            "peak_reserved_gib": max(peaks) if peaks else None,
            "tail": lines[-12:] if rc else []}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--gpus", default="", help="comma-separated GPU counts (default: 1, 2, 4, 8 up to all GPUs)")
    p.add_argument("--families", default="sd15,sdxl")
    p.add_argument("--batch", type=int, default=BATCH, help="per-GPU batch (default 8)")
    p.add_argument("--steps", default="", help="override steps, e.g. sd15=60,sdxl=40")
    p.add_argument("--accel", default="auto", choices=["auto", "off"])
    p.add_argument("--work", default="/tmp/lora-trainer-ddp-bench", help="checkpoints, images, outputs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--smoke", action="store_true", help="CPU: tiny SD1 at 64 px, 1 and 2 gloo processes")
    a = p.parse_args()

    import torch

    sys.path.insert(0, str(ROOT))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in NO_MULTICAST.items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)

    if a.smoke:
        from lora_trainer.models.tiny import write_tiny_checkpoint

        counts = [1, 2]
        cases = {"tiny-sd1": (write_tiny_checkpoint(work / "ckpt", "sd1", seed=0), 64, 6)}
        batch, device, flag = 2, "cpu", "--processes"
        images = 8
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
            return 2
        sys.path.insert(0, str(ROOT / "tests" / "webui"))
        from random_checkpoint import write_random_checkpoint  # the live WebUI suites' full-size random model

        available = torch.cuda.device_count()
        counts = [int(x) for x in a.gpus.split(",")] if a.gpus else [n for n in (1, 2, 4, 8) if n <= available]
        steps_override = dict(kv.split("=") for kv in a.steps.split(",") if kv)
        cases = {}
        for name in a.families.split(","):
            family, res, steps = FAMILIES[name]
            ckpt = work / f"{family}-random.safetensors"
            if not ckpt.is_file():
                write_random_checkpoint(family, ckpt, device="cuda")
            cases[name] = (ckpt, res, int(steps_override.get(name, steps)))
        batch, device, flag = a.batch, "cuda", "--gpus"
        images = IMAGES

    report: dict = {
        "command": " ".join([sys.executable, *sys.argv]),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available()
        else None, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "multicast_env": {k: env[k] for k in NO_MULTICAST}, "per_gpu_batch": batch, "results": [],
    }
    try:
        import diffusers
        import peft

        report["diffusers"], report["peft"] = diffusers.__version__, peft.__version__
    except ImportError:
        pass
    for name, (ckpt, res, steps) in cases.items():
        data = make_dataset(work / f"data-{res}", res, images)
        base = None
        for n in counts:
            out = work / f"out-{name}-{n}"
            cfg = work / f"{name}-{n}.toml"
            write_config(cfg, Path(ckpt), data, out, res, batch, steps, device, a.accel)
            cmd = [sys.executable, "-m", "lora_trainer", "train", "--config", str(cfg), flag, str(n)]
            print(f"{name}: {n} x batch {batch} ...", flush=True)
            r = run_case(cmd, env, work / f"{name}-{n}.log", a.timeout)
            r.update(family=name, resolution=res, processes=n, global_batch=batch * n, cmd=" ".join(cmd))
            r["img_s"] = round(r["it_s"] * batch * n, 2) if r["it_s"] else None
            if n == 1 and r["img_s"]:
                base = r["img_s"]
            if base and r["img_s"]:
                r["speedup"] = round(r["img_s"] / base, 3)
                r["efficiency"] = round(r["img_s"] / (base * n), 3)
            report["results"].append(r)
            print(f"  rc {r['returncode']}  {r['img_s']} img/s  speedup {r.get('speedup')}  "
                  f"efficiency {r.get('efficiency')}  peak {r['peak_reserved_gib']} GiB", flush=True)
            Path(a.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    two = [r for r in report["results"] if r["processes"] == 2 and r.get("speedup")]
    report["target"] = "speedup >= 1.8 on 2 GPUs at per-GPU batch 8"
    report["target_met"] = {r["family"]: r["speedup"] >= 1.8 for r in two} if batch == 8 and not a.smoke else None
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if all(r["returncode"] == 0 for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
