"""Tagging throughput (images/s) of the WD14 tagger code with a model of real cost.

    python bench/tagger_throughput.py                      # CPU, batch 1 and 8
    python bench/tagger_throughput.py --provider cuda      # GPU (pip install onnxruntime-gpu onnx)

The model is a randomly initialised ViT-B/16 at 448 px with 10,861 outputs in the WD14
interface (bench/tagger_vit_model.py, built once into --model-dir). Two numbers per batch size:
`model`: preprocessed batches through onnxruntime only; `end_to_end`: `tag_folder` on generated
1024x768 JPEGs (decode, EXIF, pad, BICUBIC resize, inference, thresholds, caption writes).
Results (JSON + Markdown, with machine, versions and the command) go to --out.
Needs: numpy, Pillow, onnx, and onnxruntime (CPU) or onnxruntime-gpu (CUDA); not torch or timm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from tagger_vit_model import build_vit_tagger

from lora_trainer.dataset.samples import write_images
from lora_trainer.tagger.engine import Tagger
from lora_trainer.tagger.folder import tag_folder
from lora_trainer.tagger.registry import ModelFiles
from lora_trainer.tagger.session import PROVIDERS
from lora_trainer.tagger.thresholds import TagOptions


def machine(provider: str) -> dict:
    import onnxruntime as ort

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__, "onnxruntime_device": ort.get_device(), "numpy": np.__version__,
            "available_providers": ort.get_available_providers(),
            # other work on a shared machine skews CPU numbers: record how busy it was
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    if provider != "cpu" and shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        info["gpu"] = out.stdout.strip()
    return info


def bench_model(tagger: Tagger, batch: int, images: int) -> float:
    rng = np.random.default_rng(0)
    data = (rng.random((batch, tagger.size, tagger.size, 3), dtype=np.float32) * 255).astype(np.float32)
    tagger.predict_arrays(data)  # warm-up: kernels chosen, memory allocated
    runs = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(runs):
        tagger.predict_arrays(data)
    return runs * batch / (time.perf_counter() - start)


def bench_end_to_end(tagger: Tagger, folder: Path, batch: int) -> tuple[float, int]:
    tag_folder(folder, tagger, TagOptions(), mode="overwrite", batch_size=batch)  # warm-up, file cache
    start = time.perf_counter()
    run = tag_folder(folder, tagger, TagOptions(), mode="overwrite", batch_size=batch)
    return len(run.captions) / (time.perf_counter() - start), len(run.captions)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--images", type=int, default=None, help="images per measurement (default 16 CPU, 256 GPU)")
    p.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "lora_trainer_bench_vit_b16_448"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default=None, help="suffix of the result files (default: provider)")
    args = p.parse_args()
    images = args.images or (16 if args.provider == "cpu" else 256)

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.onnx").is_file():
        print(f"building the random ViT-B/16 448px tagger in {model_dir} ...", flush=True)
        build_vit_tagger(model_dir)
    if args.provider != "cpu":
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA/cuDNN from pip's nvidia-* wheels
            try:
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - the session start below reports what is missing
                print(f"preload_dlls: {e}", file=sys.stderr)
    files = ModelFiles(model_dir / "model.onnx", model_dir / "selected_tags.csv", "random ViT-B/16 448px")
    tagger = Tagger(files, provider=args.provider)
    wanted = PROVIDERS[args.provider]
    if tagger.provider != wanted:
        print(f"error: asked for {wanted} but the session runs on {tagger.provider}", file=sys.stderr)
        return 1
    print(f"provider {tagger.provider}, input {tagger.size}px, {len(tagger.labels)} tags", flush=True)

    work = Path(tempfile.mkdtemp(prefix="tagger_bench_"))
    try:
        write_images(work, images, (1024, 768), fmt="JPEG", captions=False)
        results = []
        for batch in args.batch_sizes:
            model_ips = bench_model(tagger, batch, images)
            e2e_ips, n = bench_end_to_end(tagger, work, batch)
            row = {"batch_size": batch, "images": n, "model_images_per_s": round(model_ips, 3),
                   "end_to_end_images_per_s": round(e2e_ips, 3)}
            print(json.dumps(row), flush=True)
            results.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {"benchmark": "tagger_throughput", "model": "random ViT-B/16, 448 px, 10,861 sigmoid outputs (WD14 I/O)",
              "provider": tagger.provider, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(args.provider),
              "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tagger_throughput_{args.tag or args.provider}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines = [f"# Tagger throughput: {report['model']}", "", f"- provider: {tagger.provider}",
             f"- command: `{report['command']}`", f"- date: {report['date_utc']}",
             *(f"- {k}: {v}" for k, v in report["machine"].items()), "",
             "| batch | images | model only (img/s) | end to end (img/s) |", "|---|---|---|---|",
             *(f"| {r['batch_size']} | {r['images']} | {r['model_images_per_s']} | {r['end_to_end_images_per_s']} |"
               for r in results)]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
