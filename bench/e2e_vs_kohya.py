#!/usr/bin/env python3
"""The whole training command, ours vs kohya sd-scripts, from the same checkpoint file (issue 14).

For each case, each tool runs as a fresh process, as a user starts it, on the same random
full-size checkpoint file (fp16 `.safetensors`, A1111 layout, `tests/webui/random_checkpoint.py`,
page cache warm) and the same 32 captioned images (latents not cached yet): SD1.5 512 px batch 1 / 400 steps and batch 8 / 200
steps, SDXL 1024 px batch 1 / 100 steps. Same settings on both sides: LoRA rank 32 / alpha 16 on
kohya's default modules, UNet only, bf16, SDPA, AdamW lr 1e-4 constant, clip 1.0, latents and
(SDXL) text-encoder outputs cached in memory, no gradient checkpointing, no samples, one save at
the end. Ours: `python -m lora_trainer train --config <toml>`; kohya: `train_network.py` /
`sdxl_train_network.py` with the matching flags (below, and in the JSON).

Per run: wall clock from starting the process to its exit, time to the end of the first training
step, steady it/s (after warm-up), the process's peak *reserved* VRAM, and when each phase
(imports, dataset scan, model loading, latent caching, text caching, LoRA set-up, first step)
started and ended.

kohya's runs may be shorter than the target (`--kohya-steps`) to save GPU time: its whole-command
time at the target step count is then its measured wall clock plus the missing steps at its own
measured steady rate (marked `extrapolated`).

    python bench/e2e_vs_kohya.py --sd-scripts .kohya/sd-scripts --kohya-site /tmp/kohya-site \\
        --out bench/results/e2e_vs_kohya_h200.json
    python bench/e2e_vs_kohya.py --cases sd15_b1 --resolution 64 --steps 3 --skip-kohya --device cpu  # smoke

The child process's timing hooks and A/B variants are in `e2e_hooks.py`.
bench/README.md says how the sd-scripts checkout and its packages are set up.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

from e2e_hooks import VARIANTS, child_ours  # the child process (bench/ is on sys.path)

T_BEGIN = time.time()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name: (family, resolution, batch, steps)
CASES = {"sd15_b1": ("sd1", 512, 1, 400), "sd15_b8": ("sd1", 512, 8, 200), "sdxl_b1": ("sdxl", 1024, 1, 100)}
RANK, ALPHA, LR = 32, 16, 1e-4
REPEATS = 10


# ------------------------------------------------------------------------------------ set-up
def make_dataset(root: Path, size: int, count: int, repeats: int = REPEATS) -> Path:
    """`root/img/10_bench/NNN.png` + captions (random pixels: PNG decoding as costly as it gets)."""
    from random_data import random_pixels_dataset  # bench/ is on sys.path when a benchmark runs

    return random_pixels_dataset(root, size, count, repeats=repeats, caption="bench, random pixels, test image {i}")


def write_kohya_tokenizers(folder: Path) -> None:
    """The CLIP tokenizer folders sd-scripts looks for in --tokenizer_cache_dir (no Hub), written from
    this package's bundled vocabulary (the same OpenAI BPE; SDXL's second one differs only in padding,
    which sd-scripts sets itself)."""
    src = ROOT / "lora_trainer" / "models" / "tokenizer"
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    for name in ("openai_clip-vit-large-patch14", "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        for f in ("vocab.json", "merges.txt"):
            shutil.copyfile(src / f, d / f)
        (d / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(dict(
            special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer", errors="replace",
            add_prefix_space=False)), encoding="utf-8")


def ours_config(path: Path, ckpt: Path, data: Path, out: Path, res: int, batch: int, steps: int, device: str,
                epochs: int = 0) -> None:
    lines = {
        "model": str(ckpt), "data": str(data), "output_dir": str(out), "name": "ours", "resolution": res,
        "batch_size": batch, "max_steps": steps, "epochs": epochs, "rank": RANK, "alpha": float(ALPHA),
        "learning_rate": LR, "train_text_encoder": False, "train_unet": True, "mixed_precision": "bf16",
        "gradient_checkpointing": False, "optimizer": "AdamW", "lr_scheduler": "constant", "lr_warmup_steps": 0,
        "max_grad_norm": 1.0, "save_state": False, "overwrite": True, "device": device, "save_precision": "fp16",
        "min_bucket_reso": min(256, res), "max_bucket_reso": max(1024, res), "cache_latents_to_disk": False,
        "flip_aug": False, "shuffle_caption": False, "sample_prompts": [], "sample_every_n_epochs": 0,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in lines.items())
    path.write_text(body + "\n", encoding="utf-8")


def kohya_args(family: str, ckpt: Path, data: Path, out: Path, tok: Path, res: int, batch: int, steps: int) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(ckpt), "--train_data_dir", str(data / "img"),
            "--output_dir", str(out), "--output_name", "kohya", "--resolution", f"{res},{res}",
            "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--learning_rate", str(LR),
            "--lr_scheduler", "constant", "--seed", "0", "--save_model_as", "safetensors", "--save_precision", "fp16",
            "--caption_extension", ".txt", "--tokenizer_cache_dir", str(tok), "--mixed_precision", "bf16", "--sdpa",
            "--cache_latents", "--network_train_unet_only", "--network_module", "networks.lora",
            "--network_dim", str(RANK), "--network_alpha", str(ALPHA), "--optimizer_type", "AdamW",
            "--max_grad_norm", "1.0", "--max_data_loader_n_workers", "1", "--persistent_data_loader_workers"]
    if family == "sdxl":  # text outputs cached as ours are; VAE in bf16 on both sides (kohya's default)
        args += ["--cache_text_encoder_outputs"]
    return args


# ------------------------------------------------------------------------------------ summary
def summarise(tool: str, raw: dict, t_launch: float, t_exit: float, batch: int, steps: int, target: int) -> dict:
    """Relative times (from the launch) and rates from a child's absolute stamps."""
    stamps = raw.get("steps") or []
    row: dict = {"tool": tool, "steps_run": len(stamps), "target_steps": target,
                 "wall_s": round(t_exit - t_launch, 2), "error": raw.get("error")}
    if tool == "ours":  # stamps = ends of steps
        first_end = stamps[0] if stamps else None
    else:  # kohya: stamps = starts of steps; the first ends when the second starts
        first_end = stamps[1] if len(stamps) > 1 else None
    row["first_step_s"] = round(first_end - t_launch, 2) if first_end else None
    skip = max(10, len(stamps) // 10)
    body = stamps[skip:]
    if len(body) >= 3:
        its = (len(body) - 1) / (body[-1] - body[0])
        row.update(steady_it_s=round(its, 3), steady_img_s=round(its * batch, 2))
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    row["first_intervals_s"] = [round(x, 3) for x in intervals[:4]]
    for key in ("peak_reserved_gib", "peak_allocated_gib"):
        row[key] = raw.get(key)
    timeline = {"python started": [raw["t_start"] - t_launch] * 2,
                "imports done": [raw["t_imported"] - t_launch] * 2} if raw.get("t_start") else {}
    for name, (a, b) in sorted((raw.get("phases") or {}).items(), key=lambda kv: kv[1][0]):
        timeline[name] = [a - t_launch, b - t_launch]
    if stamps:
        timeline["first step ends"] = [first_end - t_launch] * 2 if first_end else None
        timeline["last step ends"] = [stamps[-1] - t_launch] * 2
    if raw.get("t_end"):  # the CLI returned (the run's clean-up done); the process exits after it
        timeline["cli returned"] = [raw["t_end"] - t_launch] * 2
    row["timeline_s"] = {k: [round(x, 2) for x in v] for k, v in timeline.items() if v}
    if target != len(stamps) and row.get("steady_it_s"):
        row["wall_s_at_target"] = round(row["wall_s"] + (target - len(stamps)) / row["steady_it_s"], 2)
        row["extrapolated"] = True
    else:
        row["wall_s_at_target"] = row["wall_s"]
    return row


def run_child(cmd: list[str], env: dict, cwd: str, log: Path, timeout: float) -> tuple[float, float, int]:
    t_launch = time.time()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  check=False)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return t_launch, time.time(), rc


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def compile_bytecode(folders: list[str]) -> list[str]:
    """Write the .pyc files of every module under `folders` (those that exist), as pip does at install time; a
    machine with PYTHONDONTWRITEBYTECODE set would otherwise compile them from source in every run. Returns the
    folders compiled."""
    import compileall

    done = []
    for folder in dict.fromkeys(f for f in folders if f and Path(f).is_dir()):
        compileall.compile_dir(folder, quiet=2, workers=os.cpu_count() or 1)
        done.append(folder)
    return done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["ours"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--sd-scripts", default=str(ROOT / ".kohya" / "sd-scripts"))
    p.add_argument("--kohya-site", default="", help="sd-scripts' package versions (first on its PYTHONPATH)")
    p.add_argument("--kohya-python", default=sys.executable, help="the Python that runs sd-scripts")
    p.add_argument("--ours-site", default="", help="extra packages for our side (e.g. diffusers), PYTHONPATH")
    p.add_argument("--work", default="/tmp/e2e-vs-kohya")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "e2e_vs_kohya.json"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--kohya-steps", default="", help="e.g. sd15_b1=100,sd15_b8=50,sdxl_b1=30 (then extrapolated)")
    p.add_argument("--steps", type=int, default=0, help="override every case's step count (smoke tests)")
    p.add_argument("--resolution", type=int, default=0, help="override every case's resolution (smoke tests)")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--skip-kohya", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--before", default="", help="folder holding an older lora_trainer package to time as well")
    p.add_argument("--before-steps", type=int, default=0, help="steps for the --before runs (default: the case's)")
    p.add_argument("--before-cases", default="", help="cases for the --before runs (default: all)")
    p.add_argument("--variants", default="",
                   help=f"after the main runs, A/B runs of ours, each VARIANT or VARIANT@CASE: {', '.join(VARIANTS)}")
    p.add_argument("--variant-case", default="sd15_b1")
    p.add_argument("--variant-steps", type=int, default=40, help="0: the case's own step count")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--warm-runs", action="store_true",
                   help="first run each tool once on the first case's model, not counted: a user who has trained "
                        "before (kernel caches such as Triton's on disk, libraries in the page cache); kohya 4 "
                        "steps, ours one epoch of the pictures at batch 8 so that its epoch-end scoring runs too")
    p.add_argument("--compile-bytecode", action="store_true",
                   help="byte-compile both tools' packages first (what pip does at install), for machines that set "
                        "PYTHONDONTWRITEBYTECODE: otherwise every run compiles ~3,000 modules from source "
                        "(bench/results/startup_gpu_profile.md)")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds after this script started: start no run after it (0 = none)")
    a, rest = p.parse_known_args()
    if a.child == "ours":
        rc = child_ours(a.result, a.root, rest[1:] if rest[:1] == ["--"] else rest, a.variant)
        gc.freeze()  # as `python -m lora_trainer` ends (lora_trainer/__main__.py): no final collection's walk
        if a.variant == "fast_exit":  # what the interpreter's and CUDA's teardown cost: none of it
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        return rc

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env_base = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
                    TOKENIZERS_PARALLELISM="false")
    env_base.pop("PYTHONPATH", None)
    ours_env = dict(env_base, **({"PYTHONPATH": a.ours_site} if a.ours_site else {}))
    kohya_env = dict(env_base, **({"PYTHONPATH": a.kohya_site} if a.kohya_site else {}))
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    if a.ours_site:
        sys.path.insert(0, a.ours_site)
    import torch
    sys.path.insert(0, str(ROOT / "tests" / "webui"))
    from random_checkpoint import write_random_checkpoint  # the live WebUI suites' full-size random model

    report: dict = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                    "settings": {"rank": RANK, "alpha": ALPHA, "lr": LR, "images": a.images, "repeats": REPEATS,
                                 "precision": "bf16", "unet_only": True, "gradient_checkpointing": False},
                    "setup": {}, "runs": []}
    env_info = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        env_info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version())
    report["environment"] = env_info
    cases = [c for c in a.cases.split(",") if c]
    families = {CASES[c][0] for c in cases}
    ckpts = {}
    for fam in sorted(families):
        ckpt = work / f"random-{fam}.safetensors"
        if not ckpt.exists():
            t = time.perf_counter()
            write_random_checkpoint(fam, ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
            report["setup"][f"write {ckpt.name}"] = round(time.perf_counter() - t, 1)
        ckpts[fam] = ckpt
    report["setup"]["checkpoint_gib"] = {f: round(c.stat().st_size / 2**30, 2) for f, c in ckpts.items()}
    tok = work / "tok"
    write_kohya_tokenizers(tok)
    datasets = {}
    for c in cases:
        res = a.resolution or CASES[c][1]
        datasets[res] = make_dataset(work / f"data{res}", res, a.images)
    # ours' warm run: one epoch of the pictures once each at batch 8, so that it ends with the epoch-end scoring as
    # any earlier run of a user did (whatever that compiles and caches on disk, e.g. Triton's kernels, is there)
    warm_data = make_dataset(work / "warm-data", CASES[cases[0]][1], a.images, repeats=1) if a.warm_runs else None
    if a.compile_bytecode:
        t = time.perf_counter()
        report["setup"]["compile_bytecode"] = compile_bytecode(
            [a.ours_site, a.kohya_site, a.sd_scripts, str(ROOT / "lora_trainer"), a.before, *site.getsitepackages()])
        report["setup"]["compile_bytecode_s"] = round(time.perf_counter() - t, 1)
    # Warm page cache: what a user who just trained or generated with the model has.
    for path in [*ckpts.values(), *(f for d in datasets.values() for f in d.rglob("*") if f.is_file())]:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    # Warm machine: each side has run once before (byte-compiled modules, libraries in the page cache; on the GPU
    # `gpu_warmup`'s small forward and backward loads cuDNN's and cuBLAS's kernel libraries, which the first training
    # process on a freshly started machine otherwise reads in its first step; both tools share the one torch)
    warm = {"ours": ([sys.executable, "-c", ("import sys; sys.path.insert(0, sys.argv[1]); import torch; "
                      "import lora_trainer.train, lora_trainer.cli, lora_trainer.lora.network, lora_trainer.accel; "
                      "from diffusers import UNet2DConditionModel, AutoencoderKL; import peft, transformers; "
                      "sys.path.insert(0, sys.argv[2]); from e2e_hooks import gpu_warmup; gpu_warmup()"),
                      a.root, str(HERE)],
                     ours_env, str(ROOT)),
            "kohya": ([a.kohya_python, "-c", ("import sys, os; sys.path.insert(0, os.getcwd()); import torch; "
                       "import train_network, sdxl_train_network, networks.lora")], kohya_env, a.sd_scripts)}
    for tool, (cmd, env, cwd) in warm.items():
        if tool == "kohya" and a.skip_kohya:
            continue
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
        report["setup"][f"warm imports {tool}"] = round(time.perf_counter() - t, 1)
        if proc.returncode:
            report["setup"][f"warm imports {tool} error"] = proc.stderr[-800:]
    kohya_steps = dict(kv.split("=") for kv in a.kohya_steps.split(",") if kv)
    versions = {}
    for tool, env, python in (("ours", ours_env, sys.executable), ("kohya", kohya_env, a.kohya_python)):
        probe = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
                 "['torch', 'diffusers', 'transformers', 'accelerate', 'peft', 'safetensors'] "
                 "if __import__('importlib.util').util.find_spec(p.replace('-', '_'))}))")
        out = subprocess.run([python, "-c", probe], env=env, capture_output=True, text=True, check=False)
        versions[tool] = out.stdout.strip()
    report["versions"] = versions

    plan = []
    if a.warm_runs:
        plan += [(tool, cases[0], a.root, "warm") for tool in ("ours", "kohya")
                 if not getattr(a, f"skip_{tool}")]
    for c in cases:
        if not a.skip_ours:
            plan.append(("ours", c, a.root, ""))
        if not a.skip_kohya:
            plan.append(("kohya", c, None, ""))
    if a.before:
        plan += [("before", c, a.before, "") for c in (a.before_cases.split(",") if a.before_cases else cases)]
    for v in a.variants.split(","):  # "variant" (at --variant-case) or "variant@case"
        if v:
            name, _, case = v.partition("@")
            plan.append(("ours", case or a.variant_case, a.root, name))
    for tool, c, root, variant in plan:
        if a.deadline and time.time() - T_BEGIN > a.deadline:
            report.setdefault("skipped_for_deadline", []).append(f"{tool} {c} {variant}".strip())
            continue
        fam, res, batch, target = CASES[c]
        res = a.resolution or res
        target = a.steps or target
        steps = target
        if tool == "kohya" and c in kohya_steps:
            steps = int(kohya_steps[c])
        if tool == "before" and a.before_steps:
            steps = a.before_steps
        if variant == "warm":
            steps = target = 4
        elif variant:
            steps = target = a.variant_steps or target
        if tool == "before":
            target = steps
        label = f"{tool}-{c}" + (f"-{variant}" if variant else "")
        out = work / f"out-{label}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        result_json = work / f"result-{label}.json"
        result_json.unlink(missing_ok=True)
        log = work / f"log-{label}.txt"
        if tool in ("ours", "before"):
            cfg = work / f"config-{c}.toml"
            if variant == "warm":  # one epoch at batch 8 with its scoring (warm_data above)
                ours_config(cfg, ckpts[fam], warm_data, out, res, 8, 0, a.device, epochs=1)
            else:
                ours_config(cfg, ckpts[fam], datasets[res], out, res, batch, steps, a.device)
            cmd = [sys.executable, str(HERE / "e2e_vs_kohya.py"), "--child", "ours", "--result", str(result_json),
                   "--root", str(root), "--variant", "profile_start" if variant == "warm" else variant, "--", "train",
                   "--config", str(cfg)]
            t_launch, t_exit, rc = run_child(cmd, ours_env, str(ROOT), log, a.timeout)
            command = f"python -m lora_trainer train --config {cfg.name}  ({cfg.read_text().strip()})".replace(
                "\n", "; ")
        else:
            script = "sdxl_train_network.py" if fam == "sdxl" else "train_network.py"
            kargs = kohya_args(fam, ckpts[fam], datasets[res], out, tok, res, batch, steps)
            cmd = [a.kohya_python, str(HERE / "kohya_run.py"), str(result_json), script, "--", *kargs]
            t_launch, t_exit, rc = run_child(cmd, kohya_env, a.sd_scripts, log, a.timeout)
            command = f"python {script} " + " ".join(kargs)
        raw = json.loads(result_json.read_text()) if result_json.exists() else {"error": f"no result (rc {rc})"}
        row = {"case": c, "family": fam, "resolution": res, "batch": batch, "rc": rc,
               **summarise("ours" if tool != "kohya" else "kohya", raw, t_launch, t_exit, batch, steps, target)}
        row["tool"] = tool
        if raw.get("start_profile"):  # the warm run's profile of the CLI's start (e2e_hooks._StartProfile)
            row["start_profile"] = raw["start_profile"]
        if variant == "warm":
            row["variant"] = ("warm: a run first, not counted (--warm-runs): kohya 4 steps, ours one epoch of the "
                              "pictures at batch 8 with its epoch-end scoring")
        elif variant:
            row["variant"] = f"{variant}: " + "; ".join(VARIANTS[v] for v in variant.split("+"))
        row["command"] = command
        if rc or row.get("error"):
            row["log_tail"] = tail(log)
        report["runs"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("command", "log_tail", "timeline_s")}),
              flush=True)
        if row.get("log_tail"):
            print(row["log_tail"], flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    ratios = {}
    for c in cases:
        by = {r["tool"]: r for r in report["runs"] if r["case"] == c and not r.get("variant")}
        if "ours" in by and "kohya" in by and by["ours"].get("wall_s_at_target") and by["kohya"].get("wall_s_at_target"):
            ratios[c] = {"whole_command_x": round(by["kohya"]["wall_s_at_target"] / by["ours"]["wall_s_at_target"], 2),
                         "step_x": round((by["ours"].get("steady_it_s") or 0) / (by["kohya"].get("steady_it_s") or 1), 2)}
    report["ratios"] = ratios
    Path(a.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print("\ncase     tool    wall(s) @target  first step(s)  it/s    img/s   peak reserved GiB")
    for r in report["runs"]:
        print(f"{r['case']:8s} {r['tool'] + ('*' if r.get('variant') else ''):7s} {r['wall_s']:7} {r.get('wall_s_at_target')!s:8} "
              f"{r.get('first_step_s')!s:13} {r.get('steady_it_s')!s:7} {r.get('steady_img_s')!s:7} "
              f"{r.get('peak_reserved_gib')}")
    print("ratios:", json.dumps(ratios))
    print(f"wrote {a.out}")
    return 1 if any(r["rc"] for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
