"""Preparer throughput (images/s) on 1,000 generated images: first run and idempotent re-run.

    python bench/prepare_throughput.py [--images 1000] [--size 768 512]

The source mixes what users have: 80% JPEG, 10% PNG (copied byte for byte), 5% transparent PNG
and 5% GIF (decoded and written as PNG), each with a caption. Every image is fully decoded and
hashed (duplicate check) on each run. Results (JSON + Markdown with machine, versions and the
command) go to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import PIL
from PIL import Image

from lora_trainer.dataset.prepare import prepare_dataset
from lora_trainer.dataset.samples import gradient


def make_source(folder: Path, count: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = gradient(*size, seed=i)
        kind = i % 20
        if kind < 16:
            path = folder / f"photo_{i:04d}.jpg"
            img.save(path, quality=90)
        elif kind < 18:
            path = folder / f"photo_{i:04d}.png"
            img.save(path)
        elif kind == 18:
            path = folder / f"cutout_{i:04d}.png"
            rgba = img.convert("RGBA")
            alpha = np.full((size[1], size[0]), 255, np.uint8)
            alpha[: size[1] // 4] = 0
            rgba.putalpha(Image.fromarray(alpha))
            rgba.save(path)
        else:
            path = folder / f"anim_{i:04d}.gif"
            img.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
        path.with_suffix(".txt").write_text(f"mychar, photo, tag_{i % 13}, tag_{i % 7}\n", encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--size", type=int, nargs=2, default=[768, 512], metavar=("W", "H"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        src = work / "src"
        t = time.perf_counter()
        make_source(src, args.images, tuple(args.size))
        print(f"generated {args.images} images in {time.perf_counter() - t:.1f}s", flush=True)
        rows = []
        for label in ("first run", "re-run (nothing to write)"):
            t = time.perf_counter()
            result = prepare_dataset(src, work / "dataset", "mychar", repeats=2, resolution=512)
            dt = time.perf_counter() - t
            usable = result.manifest["counts"]["usable"]
            rows.append({"run": label, "images": usable, "seconds": round(dt, 2),
                         "images_per_s": round(usable / dt, 1), "files_written": len(result.written),
                         "converted": result.manifest["counts"]["converted"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    report = {"benchmark": "prepare_throughput", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "source": f"{args.images} images {args.size[0]}x{args.size[1]}: 80% JPEG, 10% PNG, "
                        "5% transparent PNG, 5% GIF, all captioned",
              "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                          "python": platform.python_version(), "pillow": PIL.__version__, "numpy": np.__version__,
                          "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]},
              "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare_throughput.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    lines = ["# Preparer throughput", "", f"- source: {report['source']}", f"- command: `{report['command']}`",
             f"- date: {report['date_utc']}", *(f"- {k}: {v}" for k, v in report["machine"].items()), "",
             "| run | images | seconds | images/s | files written | converted |", "|---|---|---|---|---|---|",
             *(f"| {r['run']} | {r['images']} | {r['seconds']} | {r['images_per_s']} | {r['files_written']} | "
               f"{r['converted']} |" for r in rows)]
    (out / "prepare_throughput.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}/prepare_throughput.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
