"""CPU timings of two fixed costs before the first step (issue 14), each run in a fresh process, A/B pairs
interleaved (this tree and `--before`, an older copy of the package), medians of `--runs`.

inject: `inject_lora` on a full-size UNet (SD1.5: 192 modules, SDXL: 722) built on the meta device whose
    weights are then zero-storage bf16 CPU tensors (`expand` of one element): peft sees a real device and
    dtype, as with a loaded model, without 5 GiB of weights. r32/alpha16, UNet only, seeded, fp32 adapters,
    with the objects alive before it frozen out of the collector as in a run (gc_freeze.py).
vae: full-size VAE (random weights, fp32) encoding 8 images one per call vs in one call, at several sizes.
cli: the whole `python -m lora_trainer train` on a tiny SD1 checkpoint (4 images at 64 px, 1 step, r32, fp32
    on the CPU, validation off): process CPU and wall seconds, this tree and `--before`.
setup: `python -m lora_trainer train --config CONFIG` (a full-size checkpoint, e.g. startup_cpu.py's with --keep)
    from the process's start to the start of latent caching, the part of start -> first step a GPU does not speed
    up: process CPU and wall seconds at the engine's import, the header check, the dataset scan and the model's
    load (imports included: hooks are set as the modules appear, the run's own import order is kept); the process
    leaves when caching starts.

    OMP_NUM_THREADS=1 python bench/levers_cpu.py inject --before /tmp/main-before --runs 5
    OMP_NUM_THREADS=1 python bench/levers_cpu.py vae --sizes 64,128,256 --runs 3
    OMP_NUM_THREADS=1 python bench/levers_cpu.py cli --before /tmp/main-before --runs 5
    OMP_NUM_THREADS=1 python bench/levers_cpu.py setup --config /tmp/startup-cpu/train.toml --before /tmp/main-before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_inject(family: str) -> dict:
    import gc

    import torch

    from lora_trainer.lora import LoraSpec, inject_lora
    from lora_trainer.models.build import meta_modules
    from lora_trainer.models.bundle import Family, ModelBundle
    from lora_trainer.models.ldm_config import ModelConfig

    cfg = ModelConfig.bundled(Family(family))
    unet = meta_modules(cfg)["unet"]
    for module in unet.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.zeros((), dtype=torch.bfloat16).expand(p.shape), requires_grad=False)
    bundle = ModelBundle(Family(family), cfg.prediction_type, unet, None, [], [], cfg.schedule, cfg.scaling_factor)
    gc.collect()
    gc.freeze()
    wall, cpu = time.perf_counter(), time.process_time()
    net = inject_lora(bundle, LoraSpec(rank=32, alpha=16.0, train_text_encoder=False), seed=1)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "modules": len(net.layers)}


def child_vae(px: int, images: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    from lora_trainer.models.build import init_kwargs
    from lora_trainer.models.ldm_config import bundled_config

    torch.manual_seed(0)
    cfg = bundled_config("sd_vae")
    cfg.pop("scaling_factor", None)
    vae = AutoencoderKL(**init_kwargs(AutoencoderKL, cfg)).eval()
    x = torch.randn(images, 3, px, px)
    with torch.no_grad():
        vae.encode(x[:1])  # warm-up
        cpu = time.process_time()
        single = torch.cat([vae.encode(x[i:i + 1]).latent_dist.mean for i in range(images)])
        one_per_call = time.process_time() - cpu
        cpu = time.process_time()
        batched = vae.encode(x).latent_dist.mean
        one_call = time.process_time() - cpu
    return {"one_per_call_cpu_s": one_per_call, "one_call_cpu_s": one_call,
            "max_abs_diff": float((single - batched).abs().max())}


def make_cli_inputs(work: Path) -> Path:
    """A tiny SD1 checkpoint, 4 captioned 64 px images and the run's settings file."""
    import numpy as np
    from PIL import Image

    from lora_trainer.models.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work, "sd1")
    folder = work / "data" / "img" / "1_thing"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"thing, picture {i}", encoding="utf-8")
    cfg = work / "train.toml"
    cfg.write_text("\n".join([
        f'model = "{ckpt}"', f'data = "{work / "data"}"', f'output_dir = "{work / "out"}"', 'name = "cli"',
        "resolution = 64", "batch_size = 1", "max_steps = 1", "epochs = 0", "rank = 32", "alpha = 16.0",
        'device = "cpu"', 'mixed_precision = "no"', "overwrite = true", "min_bucket_reso = 64",
        "validate_every_n_epochs = 0", ""]), encoding="utf-8")
    return cfg


def time_cli(root: str, cfg: Path) -> dict:
    import resource

    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lora_trainer", "train", "--config", str(cfg)], cwd=root, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "wall_s": time.perf_counter() - wall}


def child_setup(config: str) -> None:
    """The CLI's own run, hooked as its modules appear; prints the marks and leaves when latent caching starts."""
    import builtins
    import runpy

    with open("/proc/self/stat", encoding="ascii") as f:  # the process's start, in clock ticks since boot
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime", encoding="ascii") as f:
        t0 = time.perf_counter() - (float(f.read().split()[0]) - started)
    c0 = 0.0  # process_time counts from the process's start
    marks: dict[str, list[float]] = {}

    def mark(label: str) -> None:
        marks.setdefault(label, [time.perf_counter() - t0, time.process_time() - c0])

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            mark(label + " start")
            try:
                return original(*args, **kwargs)
            finally:
                mark(label + " end")

        setattr(owner, name, wrapper)

    def leave(*args, **kwargs):
        mark("cache latents start")
        print(json.dumps(marks), flush=True)
        os._exit(0)

    hooked: set[str] = set()
    hooks = {"lora_trainer.train.engine": lambda m: (mark("engine imported"),
                                                     timed(m, "check_model_file", "header"),
                                                     timed(m, "prepare_dataset", "scan")),
             "lora_trainer.models.loader": lambda m: timed(m, "load_model", "load model"),
             "lora_trainer.train.caching": lambda m: setattr(m.CachingMixin, "_cache_latents", leave)}
    original_import = builtins.__import__

    def hooking_import(*args, **kwargs):
        module = original_import(*args, **kwargs)
        if len(hooked) < len(hooks):
            for name in hooks.keys() - hooked:
                spec = getattr(sys.modules.get(name), "__spec__", None)
                if spec is not None and not getattr(spec, "_initializing", False):  # imported whole
                    hooked.add(name)
                    hooks[name](sys.modules[name])
        return module

    builtins.__import__ = hooking_import
    sys.argv = ["lora_trainer", "train", "--config", config]
    runpy.run_module("lora_trainer", run_name="__main__", alter_sys=True)
    raise SystemExit("the run ended before latent caching")


def run_child(what: str, root: str, args: list[str]) -> dict:
    # the copy first; a PYTHONPATH given to this script after it (e.g. a folder of older libraries)
    path = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), what, "--child", *args], cwd=root, env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("inject", "vae", "cli", "setup"))
    p.add_argument("--config", default="", help="setup: the run's settings file (a full-size checkpoint)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", default="sd1,sdxl")
    p.add_argument("--sizes", default="64,128,256")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--before", default="", help="a folder holding an older copy of the package (inject)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--work", default="/tmp/levers-cpu", help="cli: where the tiny checkpoint and images go")
    p.add_argument("--out", default="")
    args, rest = p.parse_known_args()
    if args.child and args.what == "setup":
        child_setup(args.config)
        return 1
    if args.child:
        result = child_inject(rest[0]) if args.what == "inject" else child_vae(int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return 0
    trees = {"after": str(ROOT), **({"before": args.before} if args.before else {})}
    results: dict = {}
    cfg = make_cli_inputs(Path(args.work)) if args.what == "cli" else None
    for run in range(args.runs):
        if cfg is not None:
            for label, root in trees.items():
                results.setdefault(label, []).append(time_cli(root, cfg))
        elif args.what == "setup":
            for label, root in (trees.items() if run % 2 else reversed(trees.items())):  # alternate who goes first
                marks = run_child("setup", root, ["--config", args.config])
                row = {f"{k} cpu_s": v[1] for k, v in marks.items()}
                row.update({f"{k} wall_s": v[0] for k, v in marks.items()})
                results.setdefault(label, []).append(row)
        elif args.what == "inject":
            for family in args.family.split(","):
                for label, root in trees.items():
                    results.setdefault(f"{family}/{label}", []).append(run_child("inject", root, [family]))
        else:
            for px in map(int, args.sizes.split(",")):
                results.setdefault(f"{px}px", []).append(run_child("vae", str(ROOT), [str(px), str(args.images)]))
    summary = {key: {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0]}
               for key, rows in results.items()}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
