#!/usr/bin/env python3
"""JobManager on a real GPU: a run that runs out of GPU memory (another program holds it) fails with a
user message and gives the memory back, then a normal run, a graceful stop and a resume still work (what "txt2img keeps working
after a failure" needs from the job runner). Tiny SD1 model; CUDA only.

    python bench/jobs_gpu_check.py --out results.json     # about a minute on one GPU

Reported per phase: job state, error text, CUDA memory allocated before/after (bytes), wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lora_trainer.config import TrainConfig
from lora_trainer.host import StandaloneHost
from lora_trainer.jobs import JobManager
from lora_trainer.models.tiny import build_tiny_bundle


def dataset(root: Path, n: int = 4) -> Path:
    folder = root / "img" / "2_shape"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("shape", encoding="utf-8")
    return root


def cuda_bundle():
    bundle = build_tiny_bundle("sd1")
    for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
        m.to("cuda")
    return bundle


def hogging_runner(config, **kw):
    """run_training while a block of almost all free GPU memory is held (like another program)."""
    from lora_trainer.train import run_training

    free, _ = torch.cuda.mem_get_info()
    hog = torch.empty(max(0, free - (64 << 20)), dtype=torch.uint8, device="cuda")
    try:
        return run_training(config, **kw)
    finally:
        del hog
        torch.cuda.empty_cache()


def phase(jm: JobManager, config: TrainConfig, *, stop_after_first_step: bool = False) -> dict:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    job = jm.submit_train(config)
    if stop_after_first_step:
        while job.state in ("queued", "running") and job.step < 1:
            time.sleep(0.01)
        jm.stop(job.id)
    jm.wait(job.id, 600)
    torch.cuda.synchronize()
    return {"state": job.state, "error": job.error, "message": job.message, "step": job.step,
            "total_steps": job.total_steps, "outputs": job.outputs, "state_dir": job.state_dir,
            "allocated_before": before, "allocated_after": torch.cuda.memory_allocated(),
            "seconds": round(time.perf_counter() - t0, 2), "id": job.id}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="jobs_gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available; this check needs a GPU.", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lt-jobs-gpu-"))
    data = dataset(work / "ds")
    host = StandaloneHost(work / "Lora", bundle_factory=cuda_bundle, device="cuda")
    jm = JobManager(host, work_dir=work / "runs")
    tiny = {"data": str(data), "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 4096,
            "bucket_reso_steps": 32, "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "seed": 1}
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    # 1. Another program holds nearly all GPU memory while we train: the run must OOM and fail cleanly.
    results["oom"] = phase(JobManager(host, work_dir=work / "runs", runner=hogging_runner),
                           TrainConfig(**tiny, name="oom", max_steps=2))
    # 2. A normal run right after.
    results["after_oom"] = phase(jm, TrainConfig(**tiny, name="ok", max_steps=4))
    # 3. Graceful stop, then resume.
    stopped = phase(jm, TrainConfig(**tiny, name="stop", epochs=20), stop_after_first_step=True)
    results["stop"] = stopped
    if stopped["state"] == "stopped" and stopped["state_dir"]:
        t0 = time.perf_counter()
        job = jm.wait(jm.resume(stopped["id"]).id, 600)
        results["resume"] = {"state": job.state, "error": job.error, "step": job.step,
                             "total_steps": job.total_steps, "seconds": round(time.perf_counter() - t0, 2)}
    ok = (results["oom"]["state"] == "failed" and "memory" in (results["oom"]["error"] or "").lower()
          and results["after_oom"]["state"] == "done" and results["stop"]["state"] == "stopped"
          and results.get("resume", {}).get("state") == "done")
    results["ok"] = ok
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))
    jm.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
