#!/usr/bin/env python3
"""The fixed costs of `python -m lora_trainer train` on the CPU: imports, model loading, caching, set-up,
time to the first step and to exit (issue 14), phase by phase, in fresh processes.

Writes a random full-size SD1.5 checkpoint (fp16 `.safetensors`, A1111 layout,
`tests/webui/random_checkpoint.py`, ~2 GB) and a few captioned 64 px images, warms the page cache,
then per Python interpreter (`--python`, default this one) and package copy (this tree; `--before DIR`
an older copy) runs:
- once with `-X importtime`: the import time of the whole command, by top-level package;
- `--runs` times plainly: wall clock and process CPU time of each phase (hooks on the engine's own
  functions), automatic and explicit full garbage collections (count, seconds), peak RSS, whole command
  to exit. The CPU time is the figure to compare on a shared machine: the wall clock also counts
  waiting for a core.
Training is 1 step at 64 px (the step itself is not what is measured), "did it learn?" validation off
unless `--validate` (its base-model scoring runs before step 1: see the .md).

    python bench/startup_cpu.py --python /tmp/venv-forge/bin/python --before /tmp/main-before \\
        --out bench/results/startup_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GROUPS = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "PIL", "numpy",
          "lora_trainer")


# ------------------------------------------------------------------------------------ child
def child(result_path: str, root: str, config: str) -> None:
    """Run the CLI's __main__ in this process with timing hooks; write the stamps at exit."""
    t_start, c_start = time.time(), time.process_time()
    import atexit
    import contextlib
    import gc
    import resource
    import runpy

    sys.path.insert(0, root)
    gcs = {"auto_full": [0, 0.0], "explicit_full": [0, 0.0], "young": [0, 0.0]}
    began: dict[str, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            began["t"] = time.perf_counter()
            return
        spent = time.perf_counter() - began.get("t", time.perf_counter())
        key = "young" if info["generation"] < 2 else ("explicit_full" if explicit[0] else "auto_full")
        gcs[key][0] += 1
        gcs[key][1] += spent

    explicit = [0]
    collect = gc.collect

    def counted_collect(*args, **kwargs):
        explicit[0] += 1
        try:
            return collect(*args, **kwargs)
        finally:
            explicit[0] -= 1

    gc.collect = counted_collect
    gc.callbacks.append(on_gc)
    try:  # import the engine as this copy's CLI does (commands/train.py)
        from lora_trainer.gc_freeze import building
    except ImportError:
        building = contextlib.nullcontext
    try:  # the CLI's `train` does this first (lean_imports.py); the hooks' imports below would come before it
        from lora_trainer.lean_imports import lean_model_zoos

        lean_model_zoos()
    except ImportError:  # an older copy (--before)
        pass
    with building():  # + what the hooks need: the loader, LoRA, report
        import lora_trainer.train as train_pkg
        from lora_trainer.lora import network
        from lora_trainer.models import loader
        from lora_trainer.train import engine, placement, validation
    t_imported, c_imported = time.time(), time.process_time()

    phases: dict[str, list[float]] = {}
    steps: list[list[float]] = []

    def hook(owner, name: str, label: str, only=None) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            start, cpu = time.time(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                if (only is None or only(*args, **kwargs)) and label not in phases:
                    phases[label] = [start, time.time(), cpu, time.process_time()]

        setattr(owner, name, wrapper)

    hook(engine, "check_model_file", "check model header")
    hook(engine, "prepare_dataset", "scan dataset")
    hook(loader, "load_model", "load model")
    try:  # the cache phase lives in train/caching.py (in engine.py in older copies, e.g. --before)
        from lora_trainer.train import caching as cache_phase
    except ImportError:
        cache_phase = engine
    hook(cache_phase, "cache_latents", "cache latents")
    hook(cache_phase, "cache_text_outputs", "cache text")
    hook(placement.Placement, "to", "UNet placed",
         only=lambda self, module, device: module is getattr(self, "_unet", None))
    hook(validation.Validator, "start", "base model scored")
    hook(network, "inject_lora", "inject LoRA")
    original_init = placement.Placement.__init__

    def init(self, bundle, *a, **k):
        original_init(self, bundle, *a, **k)
        self._unet = bundle.unet

    placement.Placement.__init__ = init
    original_run = train_pkg.run_training

    def run_training(config, *, on_event=None, **kwargs):
        def tee(event) -> None:
            if event.kind == "step":
                steps.append([time.time(), time.process_time()])
            elif event.kind in ("save", "done"):
                phases.setdefault(event.kind, [time.time(), time.time(), time.process_time(), time.process_time()])
            if on_event is not None:
                on_event(event)

        return original_run(config, on_event=tee, **kwargs)

    train_pkg.run_training = run_training

    def write() -> None:
        Path(result_path).write_text(json.dumps({
            "t_start": t_start, "c_start": c_start, "t_imported": t_imported, "c_imported": c_imported,
            "phases": phases, "steps": steps, "t_end": time.time(), "c_end": time.process_time(),
            "gc": gcs, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))

    atexit.register(write)
    sys.argv = ["lora_trainer", "train", "--config", config]
    runpy.run_module("lora_trainer", run_name="__main__", alter_sys=True)


# ------------------------------------------------------------------------------------ set-up
def make_inputs(work: Path, images: int, validate: bool) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from e2e_vs_kohya import make_dataset, ours_config

    ckpt = work / "sd15-random.safetensors"
    if not ckpt.is_file():
        subprocess.run([sys.executable, str(ROOT / "tests" / "webui" / "random_checkpoint.py"), "sd1", str(ckpt)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    data = make_dataset(work / "data", 64, images)
    cfg = work / "train.toml"
    ours_config(cfg, ckpt, data, work / "out", 64, 1, 1, "cpu")
    with open(cfg, "a", encoding="utf-8") as f:
        f.write(f"validate_every_n_epochs = {1 if validate else 0}\n")
    with open(ckpt, "rb") as f:  # page cache warm, as for a user's second run
        while f.read(64 << 20):
            pass
    return ckpt, cfg


def import_profile(python: str, root: str, cfg: Path, log: Path) -> dict:
    """`-X importtime` of the whole command: seconds by top-level package (self times summed)."""
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        subprocess.run([python, "-X", "importtime", "-m", "lora_trainer", "train", "--config", str(cfg)],
                       cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=f, check=False)
    by: dict[str, float] = {}
    total = 0.0
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        own = int(m[1]) / 1e6
        top = m[4].split(".")[0]
        group = top if top in GROUPS else ("torch" if top.startswith("torch") else "other")
        by[group] = by.get(group, 0.0) + own
        total += own
    return {"total_s": round(total, 2), "by_package_s": {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])}}


def timed_run(python: str, root: str, cfg: Path, work: Path, log: Path) -> dict:
    result = work / "child.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    t_launch = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([python, str(Path(__file__).resolve()), "--child", str(result), "--root", root,
                             "--config", str(cfg)], cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                            check=False).returncode
    t_exit = time.time()
    if rc or not result.is_file():
        return {"error": f"exit code {rc}", "log": log.read_text(errors="replace")[-1500:]}
    raw = json.loads(result.read_text())
    c0 = raw["c_start"]
    row: dict = {"wall_s": round(t_exit - t_launch, 2),
                 "imports_done_s": round(raw["t_imported"] - t_launch, 2),
                 "cpu_at_imports_done_s": round(raw["c_imported"] - c0, 2)}
    phases = {}
    for name, (a, b, ca, cb) in sorted(raw["phases"].items(), key=lambda kv: kv[1][0]):
        phases[name] = {"from_s": round(a - t_launch, 2), "wall_s": round(b - a, 2), "cpu_s": round(cb - ca, 2)}
    row["phases"] = phases
    if raw["steps"]:
        row["first_step_ends_s"] = round(raw["steps"][0][0] - t_launch, 2)
        row["cpu_to_first_step_s"] = round(raw["steps"][0][1] - c0, 2)
    row["cpu_total_s"] = round(raw["c_end"] - c0, 2)
    row["after_done_to_exit_s"] = round(t_exit - raw["phases"]["done"][0], 2) if "done" in raw["phases"] else None
    row["gc"] = {k: {"count": n, "s": round(s, 2)} for k, (n, s) in raw["gc"].items()}
    row["peak_rss_gib"] = round(raw["peak_rss_gib"], 2)
    return row


def median_row(rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {}

    def med(values):
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    out = {k: med([r.get(k) for r in ok]) for k in ("wall_s", "imports_done_s", "cpu_at_imports_done_s",
                                                     "first_step_ends_s", "cpu_to_first_step_s", "cpu_total_s",
                                                     "after_done_to_exit_s", "peak_rss_gib")}
    names = list(ok[0]["phases"])
    out["phases"] = {n: {k: med([r["phases"].get(n, {}).get(k) for r in ok]) for k in ("wall_s", "cpu_s")}
                     for n in names}
    out["gc"] = {k: {"count": med([r["gc"][k]["count"] for r in ok]), "s": med([r["gc"][k]["s"] for r in ok])}
                 for k in ok[0]["gc"]}
    return out


def versions(python: str) -> dict:
    code = ("import json, sys, torch, diffusers, transformers, safetensors\n"
            "try:\n import peft; p = peft.__version__\nexcept ImportError:\n p = None\n"
            "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'diffusers': diffusers.__version__, 'transformers': transformers.__version__, "
            "'safetensors': safetensors.__version__, 'peft': p}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--python", action="append", default=[], help="interpreter(s) to time (default: this one)")
    p.add_argument("--before", default="", help="a folder holding an older copy of the package to time as well")
    p.add_argument("--runs", type=int, default=3, help="timed runs per interpreter and copy (medians reported)")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--validate", action="store_true", help="keep 'did it learn?' validation on (the default)")
    p.add_argument("--work", default="/tmp/startup-cpu")
    p.add_argument("--keep", action="store_true", help="keep the 2 GB checkpoint in --work afterwards")
    p.add_argument("--machine", default="", help="how to describe this machine in the results")
    p.add_argument("--out", default="/tmp/startup_cpu.json")
    a = p.parse_args()
    if a.child:
        child(a.child, a.root, a.config)
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = make_inputs(work, a.images, a.validate)
    copies = {"after": str(ROOT)}
    if a.before:
        copies = {"before": str(Path(a.before).resolve()), **copies}
    pythons = a.python or [sys.executable]
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "machine": a.machine or f"{os.cpu_count()}-core CPU, {platform.machine()}",
                     "checkpoint": {"family": "sd1", "bytes": ckpt.stat().st_size, "dtype": "fp16"},
                     "settings": "64 px, 1 step, batch 1, r32, fp32 on the CPU, latents and text cached in memory, "
                                 + ("validation on" if a.validate else "validation off"),
                     "runs_per_case": a.runs, "cases": {}}
    for python in pythons:
        env_key = Path(python).parent.parent.name or python
        info = versions(python)
        for label, root in copies.items():
            case = f"{env_key}:{label}"
            print(f"[{case}] importtime", flush=True)
            imports = import_profile(python, root, cfg, work / f"{env_key}-{label}-importtime.txt")
            rows = []
            for i in range(a.runs):  # interleaved with the other copy would be fairer; runs are short
                rows.append(timed_run(python, root, cfg, work, work / f"{env_key}-{label}-{i}.log"))
                print(f"[{case}] run {i + 1}: {json.dumps({k: rows[-1].get(k) for k in ('wall_s', 'cpu_total_s', 'first_step_ends_s', 'error')})}",
                      flush=True)
            results["cases"][case] = {"python": python, "versions": info, "root": root, "importtime": imports,
                                      "median": median_row(rows), "runs": rows}
            Path(a.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
    if not a.keep:
        ckpt.unlink(missing_ok=True)
    print(json.dumps({c: v["median"] for c, v in results["cases"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
