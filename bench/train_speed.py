#!/usr/bin/env python3
"""End-to-end training speed and peak VRAM of `lora_trainer.train.run_training`.

SD1.5-size and SDXL-size models with random weights (full-size configs bundled with the package,
built in memory on the GPU: no download), a generated dataset, and the engine exactly as users
run it (latent + text caching, LoRA on kohya's target set, presets' precision/checkpointing/fp8,
accel). For each model: 512 px batch 1 and 4, 1024 px batch 1, with the default preset and the
low-VRAM preset. Reported: images/s and it/s over the timed steps (after warm-up), and peak VRAM
(torch max_memory_allocated over the whole run, caching included).

    python bench/train_speed.py --out results.json           # CUDA machine (about 10 minutes)
    python bench/train_speed.py --tiny --out /tmp/tiny.json  # CPU smoke test, tiny models (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lora_trainer.config import PRESETS, TrainConfig
from lora_trainer.errors import LoraTrainerError
from lora_trainer.models.bundle import EPSILON, Family, ModelBundle
from lora_trainer.train import run_training
from lora_trainer.train.placement import place_bundle

# (model family, default preset, low-VRAM preset)
MODELS = [("sd15", Family.SD1, "sd15", "sd15-lowvram"), ("sdxl", Family.SDXL, "sdxl", "sdxl-lowvram")]
SHAPES = [(512, 1), (512, 4), (1024, 1)]


def full_size_bundle(family: Family, device: torch.device) -> ModelBundle:
    """Random weights in the real SD1.5 / SDXL architectures, created directly on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.models.ldm_config import bundled_config
    from lora_trainer.models.tokenizers import PAD_ENDOFTEXT, PAD_EXCLAMATION, clip_tokenizer

    def text(name: str, cls):
        cfg = {k: v for k, v in bundled_config(name).items() if not k.startswith("_") and k != "architectures"}
        return cls(CLIPTextConfig(**cfg))

    with torch.device(device):
        if family is Family.SDXL:
            unet = UNet2DConditionModel.from_config(bundled_config("sdxl_unet"))
            vae = AutoencoderKL.from_config(bundled_config("sdxl_vae"))
            encoders = [text("clip_vit_l14", CLIPTextModel), text("open_clip_vit_bigg14", CLIPTextModelWithProjection)]
            tokenizers = [clip_tokenizer(PAD_ENDOFTEXT), clip_tokenizer(PAD_EXCLAMATION)]
        else:
            unet = UNet2DConditionModel.from_config(bundled_config("sd15_unet"))
            vae = AutoencoderKL.from_config(bundled_config("sd_vae"))
            encoders = [text("clip_vit_l14", CLIPTextModel)]
            tokenizers = [clip_tokenizer(PAD_ENDOFTEXT)]
    for m in (unet, vae, *encoders):
        m.eval().requires_grad_(False)
    return ModelBundle(family=family, prediction_type=EPSILON, unet=unet, vae=vae, text_encoders=encoders,
                       tokenizers=tokenizers, scaling_factor=0.13025 if family is Family.SDXL else 0.18215,
                       name=f"random-{family.value}", source="random weights (bench)")


def tiny_bundle(family: Family, device: torch.device) -> ModelBundle:
    from lora_trainer.models.tiny import build_tiny_bundle

    return build_tiny_bundle(family)


def make_dataset(root: Path, size: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "img" / "1_bench"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("bench, random pixels, test image", encoding="utf-8")
    return root


def run_case(bundle: ModelBundle, preset: str, resolution: int, batch: int, steps: int, warmup: int,
             data: Path, out: Path, device: torch.device, tiny: bool, mixed_precision: str | None = None) -> dict:
    config = TrainConfig().with_preset(preset)
    if mixed_precision:
        config.mixed_precision = mixed_precision
    config.data, config.output_dir, config.name = str(data), str(out), "bench"
    config.resolution, config.batch_size = resolution, batch
    config.max_steps, config.epochs = steps, 0
    config.save_state, config.overwrite, config.device = False, True, str(device)
    config.min_bucket_reso = min(config.min_bucket_reso, resolution)
    config.max_bucket_reso = max(config.max_bucket_reso, resolution)
    if tiny:
        config.bucket_reso_steps, config.min_bucket_reso = 32, 32
    times: dict[int, float] = {}
    steps_vram = []

    def on_event(e):
        if e.kind == "step":
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[e.step] = time.perf_counter()
            if e.vram_bytes:
                steps_vram.append(e.vram_bytes)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = {"preset": preset, "preset_label": PRESETS[preset].label, "resolution": resolution, "batch": batch,
              "mixed_precision": config.mixed_precision}
    try:
        trained = run_training(config, bundle=bundle, on_event=on_event, owns_bundle=True)
        result["final_loss"] = trained.final_loss
        timed = [s for s in sorted(times) if s > warmup]
        if len(timed) >= 2:
            dt = times[timed[-1]] - times[timed[0]]
            its = (len(timed) - 1) / dt
            result.update(it_per_s=round(its, 3), images_per_s=round(its * batch, 3))
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":
            result["peak_vram_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            result["train_peak_vram_gb"] = round(max(steps_vram) / 2**30, 2) if steps_vram else None
    except LoraTrainerError as e:
        result["error"] = str(e)
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        result["error"] = f"{e.__class__.__name__}: {e}"
        traceback.print_exc()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu"] = None
        env["cpu_count"] = os.cpu_count()
    return env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="train_speed.json", help="JSON results file")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (proves the script runs)")
    p.add_argument("--steps", type=int, default=None, help="steps per case (default 30 GPU, 4 tiny)")
    p.add_argument("--warmup", type=int, default=None, help="steps not timed (default 8 GPU, 1 tiny)")
    p.add_argument("--models", default="sd15,sdxl")
    args = p.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("No CUDA device: run with --tiny for a CPU smoke test.", file=sys.stderr)
        return 2
    steps = args.steps or (4 if args.tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 8)
    build = tiny_bundle if args.tiny else full_size_bundle
    shapes = [(64, 1), (64, 4), (128, 1)] if args.tiny else SHAPES
    env = environment(device)
    print(json.dumps(env, indent=1))
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    rows = []
    try:
        datasets = {res: make_dataset(work / f"data{res}", res, 16 if not args.tiny else 4) for res, _ in shapes}
        for key, family, default, low in MODELS:
            if key not in args.models.split(","):
                continue
            bundle = None
            for preset in (default, low):
                dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
                    PRESETS[preset].settings.get("mixed_precision", "no")] if device.type == "cuda" else torch.float32
                for res, batch in shapes:
                    if bundle is None or PRESETS[preset].settings.get("fp8_base"):
                        # fp8 base weights replace the UNet's Linear modules for good: fresh model per case
                        bundle = None
                        gc.collect()
                        bundle = build(family, device)
                    place_bundle(bundle, device, dtype)  # as the engine lays out a model it loads itself
                    row = {"model": key, **run_case(bundle, preset, res, batch, steps, warmup, datasets[res],
                                                    work / "out", device, args.tiny)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            if key == "sd15":  # fp16 + loss scaling (GPUs without bf16), default preset, 512 px batch 1
                bundle = None
                gc.collect()
                bundle = build(family, device)
                place_bundle(bundle, device, torch.float16 if device.type == "cuda" else torch.float32)
                res, batch = shapes[0]
                row = {"model": key, **run_case(bundle, default, res, batch, steps, warmup, datasets[res],
                                                work / "out", device, args.tiny, mixed_precision="fp16")}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del bundle
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    header = (f"{'model':6} {'preset':28} {'prec':>5} {'res':>5} {'batch':>5} {'img/s':>8} {'it/s':>7} "
              f"{'peak VRAM GB':>13}")
    print()
    print(f"GPU: {env.get('gpu') or 'CPU (tiny smoke test)'}; torch {env['torch']}, diffusers {env['diffusers']}, "
          f"peft {env['peft']}, transformers {env['transformers']}")
    print(header)
    print("-" * len(header))
    for r in rows:
        vram = f"{r['peak_vram_gb']:.2f}" if "peak_vram_gb" in r else "-"
        if "error" in r:
            print(f"{r['model']:6} {r['preset_label']:28} {r['mixed_precision']:>5} {r['resolution']:>5} "
                  f"{r['batch']:>5}  ERROR {r['error'][:80]}")
        else:
            print(f"{r['model']:6} {r['preset_label']:28} {r['mixed_precision']:>5} {r['resolution']:>5} {r['batch']:>5} "
                  f"{r.get('images_per_s', 0):>8.2f} {r.get('it_per_s', 0):>7.2f} {vram:>13}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": env, "steps": steps, "warmup": warmup, "results": rows},
                                         indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
