#!/usr/bin/env python3
"""Whole-run peak VRAM of each preset, as a user runs it: a checkpoint file, a fresh process.

`train_speed.py` hands the engine a model already on the GPU (as the WebUI does), so its peak
includes the whole model during latent caching. A user of the CLI or of a low-VRAM preset starts
from a file: the engine loads it on the CPU, caches latents (VAE alone on the GPU), then text
(text encoders alone), then moves the UNet over. This benchmark measures exactly that path:

1. writes a full-size random SD1.5 or SDXL checkpoint (LDM layout, fp16 `.safetensors`) once;
2. per case, starts a fresh Python process that calls `run_training(model=<file>)` and reports
   the process's peak *reserved* and allocated VRAM over the whole run (loading, caching,
   training, saving), the steps' own peak, it/s, and the time from the call to the first step.

    python bench/lowvram_e2e.py --family sdxl --out sdxl.json      # CUDA machine (~3 minutes)
    python bench/lowvram_e2e.py --family sd15 --out sd15.json
    python bench/lowvram_e2e.py --family sd15 --tiny --out t.json   # CPU smoke test (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# (family, [(preset, resolution, batch)]): the low-VRAM presets at their intended sizes, and the
# default preset beside them for scale.
CASES = {
    "sd15": [("sd15-lowvram", 512, 1), ("sd15", 512, 1)],
    "sdxl": [("sdxl-lowvram", 1024, 1), ("sdxl-lowvram", 512, 1), ("sdxl", 1024, 1)],
}


def write_checkpoint(family: str, path: Path, tiny: bool) -> None:
    """A random full-size (or tiny) model of `family` as an LDM single file, written atomically."""
    import torch

    from lora_trainer.models.ldm_writer import bundle_to_ldm_state_dict, save_state_dict

    fam = {"sd15": "sd1", "sdxl": "sdxl"}[family]
    if tiny:
        from lora_trainer.models.tiny import write_tiny_checkpoint

        written = write_tiny_checkpoint(path.parent, fam, name=path.stem)
        assert written == path, (written, path)
        return
    from handoff_models import full_size_random_bundle

    torch.manual_seed(0)
    bundle = full_size_random_bundle(fam)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in bundle_to_ldm_state_dict(bundle).items()}
    save_state_dict(sd, path, "safetensors")


def child(args: argparse.Namespace) -> int:
    """One training run in this (fresh) process; prints one JSON line."""
    import torch
    from train_speed import make_dataset

    from lora_trainer.config import TrainConfig
    from lora_trainer.train import run_training

    cuda = torch.cuda.is_available() and not args.tiny
    work = Path(tempfile.mkdtemp(prefix="lowvram-e2e-"))
    data = make_dataset(work / "data", args.resolution, args.images)
    config = TrainConfig().with_preset(args.preset)
    config.model, config.data, config.output_dir, config.name = args.checkpoint, str(data), str(work / "out"), "bench"
    config.resolution, config.batch_size = args.resolution, args.batch
    config.max_steps, config.epochs = args.steps, 0
    config.save_state, config.overwrite, config.device = False, True, "cuda" if cuda else "cpu"
    config.min_bucket_reso = min(config.min_bucket_reso, args.resolution)
    config.max_bucket_reso = max(config.max_bucket_reso, args.resolution)
    if args.tiny:
        config.bucket_reso_steps, config.min_bucket_reso = 32, 32
    times: dict[int, float] = {}
    phases: dict[str, float] = {}
    step_vram: list[int] = []

    def on_event(e) -> None:
        now = time.perf_counter()
        if e.kind == "step":
            if cuda:
                torch.cuda.synchronize()
                step_vram.append(torch.cuda.max_memory_reserved())
            times[e.step] = time.perf_counter()
        else:
            phases.setdefault(f"{e.kind}: {(e.message or '')[:40]}", round(now - t0, 2))

    t0 = time.perf_counter()
    result = run_training(config, on_event=on_event)
    timed = sorted(s for s in times if s > args.warmup)
    row = {"preset": args.preset, "resolution": args.resolution, "batch": args.batch, "steps": result.steps,
           "final_loss": result.final_loss, "wall_s": round(time.perf_counter() - t0, 1),
           "first_step_s": round(times[min(times)] - t0, 2), "phases_s": phases}
    if len(timed) >= 2:
        its = (len(timed) - 1) / (times[timed[-1]] - times[timed[0]])
        row.update(it_per_s=round(its, 3), images_per_s=round(its * args.batch, 3))
    if cuda:
        row.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                   gpu=torch.cuda.get_device_name())
    print("RESULT " + json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(CASES), default="sdxl")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "lowvram_e2e.json"))
    p.add_argument("--checkpoint", default=None, help="where the random checkpoint is written (kept for reuse)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (proves the script runs)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    ckpt = Path(args.checkpoint or Path(tempfile.gettempdir()) / f"random-{args.family}{'-tiny' if args.tiny else ''}.safetensors")
    if not ckpt.exists():
        t = time.perf_counter()
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(args.family, ckpt, args.tiny)
        print(f"wrote {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", flush=True)
    cases = CASES[args.family]
    if args.tiny:
        cases = [(preset, 64, batch) for preset, _, batch in cases[:1]]
        args.steps, args.warmup = 4, 1
    rows = []
    for preset, res, batch in cases:
        cmd = [sys.executable, __file__, "--child", "--checkpoint", str(ckpt), "--preset", preset,
               "--resolution", str(res), "--batch", str(batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--images", str(args.images)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            row = {"preset": preset, "resolution": res, "batch": batch,
                   "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:400]}
        else:
            row = json.loads(lines[-1][len("RESULT "):])
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    env = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
           "checkpoint_gib": round(ckpt.stat().st_size / 2**30, 2)}
    for pkg in ("diffusers", "transformers", "peft"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - informational
            env[pkg] = None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
