#!/usr/bin/env python3
"""Flux.1 LoRA training, ours vs kohya sd-scripts' `flux_train_network.py`, on the same random full-size
Flux.1-dev weights (issue 15's targets), in one call on the GPU machine.

What runs (each kohya run is a fresh process; ours run one after the other in one process, peak memory
counters reset between them, so each run's peak covers its own load, caching, training and save):
  K24  kohya at its 24 GB settings: --fp8_base, gradient checkpointing, no block swap
  K16  kohya at its 12 GB settings: the same with --blocks_to_swap 16
  R1   ours, preset flux-24gb        R2  ours, preset flux-12gb        R3  ours, preset flux-8gb
  R0   ours, plain eager bf16 reference (accel off, no fp8 base, no swap): the loss-curve reference
  R1F, R2F  R1 and R2 with the fp8 base's forward products on fp8 tensor cores (accel's fp8_matmul)
  R1B  R1F with the input-gradient products on fp8 too (fp8_matmul_backward)
  R1N, R2N  R1 and R2 without the epoch-end "did it learn?" scoring (its share of the peak memory)
  R1U, R2U  R1 and R2 with the blocks' q/k norms and RoPE eager (accel's fused_math off)
  R1X  R1 with the fp8 base dequantised by torch's own cast (not accel's compiled kernel, use_fused_dequant)
  R1L  R1 with the LoRA's product added after the base's (autograd adds the input gradients; addmm copies)
  R1K  R1 with the fp8 base dequantised again for the input gradients in backward (accel's keep_recomputed_weights
        off: the recomputation's weights not kept)
  R1T  R1 with torch.cuda.tunable choosing each GEMM's kernel by timing (the first steps tune; run it last)
  R1Q  R1 with only the q/k norms and RoPE compiled (the fused block math's first part; its second part, the
        modulated norms, gated adds and the single block's GELU, eager): the second part's gain on one machine
  R1P, R1FP  R1 and R1F profiled over steps 6-8 (torch.profiler: GPU kernel time by kind, top kernels; the
        profiler's own overhead makes their it/s no measure), R1PE the same with CUDA graphs off (kernels
        launched one by one: the breakdown where a graph's replay hides it)
Same data (8 captioned 1024 px images, latents and T5/CLIP outputs cached), batch 1, LoRA rank 16 /
alpha 16 on the transformer's double and single blocks, lr 1e-4 constant, kohya's recommended flow
settings (timestep_sampling shift, discrete_flow_shift 3.1582, raw prediction, guidance 1.0), seed 0.
kohya uses torch's AdamW at both settings (its 12 GB advice is bitsandbytes' AdamW8bit, which the GPU
machine does not have); our 12/8 GB presets use our own 8-bit AdamW.

The weights (random, seeded, drawn on the GPU and written tensor by tensor): the transformer in BFL
layout with its block Linear weights in float8_e4m3fn (as flux1-dev-fp8 files; both tools then train over
fp8 weights with --fp8_base, and the bf16 reference dequantises the same values), CLIP-L fp16,
T5-XXL with fp8 Linear weights (t5xxl_fp8_e4m3fn), the autoencoder in bf16 (ae.safetensors layout).

    python bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts --kohya-site /tmp/kohya-site \\
        --work /tmp/fluxbench --out $OUT/flux_vs_kohya.json
    python bench/flux_vs_kohya.py --size smoke --device cpu --skip-kohya --work /tmp/fb --out /tmp/fb.json  # CPU

`--deadline S` stops starting runs S seconds after the script started (what ran is still written).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

T_BEGIN = time.time()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

RANK, ALPHA, LR, SEED = 16, 16.0, 1e-4, 0
sys.path.insert(0, str(HERE))
import flux_ab  # bench/ is on the path
from flux_files import SIZES, make_dataset, write_kohya_tokenizers, write_models

# ------------------------------------------------------------------------------------ ours
OURS = {
    "R1": {"preset": "flux-24gb"},
    "R2": {"preset": "flux-12gb"},
    "R3": {"preset": "flux-8gb"},
    "R0": {"preset": "flux-24gb", "fp8_base": False, "accel": "off"},  # plain eager bf16 reference
    # A/B: the fp8 base's forward products on fp8 tensor cores (accel's fp8_matmul)
    "R1F": {"preset": "flux-24gb", "fp8_matmul": True},
    "R2F": {"preset": "flux-12gb", "fp8_matmul": True},
    "R1B": {"preset": "flux-24gb", "fp8_matmul": True, "fp8_matmul_backward": True},  # backward products on fp8 too
    # the "did it learn?" scoring's share of the peak: the presets without it
    "R1N": {"preset": "flux-24gb", "validate_every_n_epochs": 0},
    "R2N": {"preset": "flux-12gb", "validate_every_n_epochs": 0},
    # A/B: the blocks' weightless math (q/k norms, RoPE) eager instead of fused by torch.compile (accel's fused_math)
    "R1U": {"preset": "flux-24gb", "fused_math": False},
    "R2U": {"preset": "flux-12gb", "fused_math": False},
    "R1Q": {"preset": "flux-24gb", "fused_qkv_only": True},
    "R1X": {"preset": "flux-24gb", "eager_dequant": True},  # A/B: torch's own fp8 cast, not the compiled one
    "R1T": {"preset": "flux-24gb", "tunable_gemm": True},  # torch.cuda.tunable picks each GEMM's kernel (run it last)
    "R1H": {"preset": "flux-24gb", "heads_first_copy": True},  # A/B: attention inputs laid out (B, H, L, D)
    "R1M": {"preset": "flux-24gb", "modulation_inside": True},  # A/B: modulations recomputed in backward
    "R1K": {"preset": "flux-24gb", "keep_recomputed_weights": False},  # A/B: recomputed weights dequantised again
    "R16": {"preset": "flux-16gb"},  # block swap 8, AdamW
    "R1L": {"preset": "flux-24gb", "split_lora_product": True},  # A/B: base and LoRA products as separate ops
    # where a step's time goes (row["profile"]): steps PROFILE_STEPS, before the epoch-end scoring
    "R1P": {"preset": "flux-24gb", "profile": True},
    "R1FP": {"preset": "flux-24gb", "fp8_matmul": True, "profile": True},
    "R1PE": {"preset": "flux-24gb", "cuda_graphs": False, "profile": True},
}
PROFILE_STEPS = (5, 8)  # profiled from the end of step 5 to the end of step 8: three steady steps


def child_ours(spec_path: str, result_path: str) -> int:
    """Run our configurations in this process, one after the other; JSON with each run's step times,
    losses and whole-run peak reserved memory."""
    sys.path.insert(0, str(ROOT))
    import torch

    from lora_trainer.config import TrainConfig
    from lora_trainer.train import run_training

    spec = json.loads(Path(spec_path).read_text())
    cuda = torch.cuda.is_available()
    running_max, before_loop = [0], [0]
    # the scoring's memory between steps (accel/graphs.py StepRunner.scratch), in the log tail
    graphs_log = logging.getLogger("lora_trainer.accel.graphs")
    graphs_log.setLevel(logging.DEBUG)
    graphs_log.addHandler(logging.StreamHandler())
    original_reset = torch.cuda.reset_peak_memory_stats

    def reset(*a, **k):  # the engine resets the peak before its loop: keep the whole run's
        if cuda:
            before_loop[0] = torch.cuda.max_memory_reserved()
            running_max[0] = max(running_max[0], before_loop[0])
        return original_reset(*a, **k)

    torch.cuda.reset_peak_memory_stats = reset
    results = {}
    for name in spec["runs"]:
        if time.time() > spec["deadline"]:
            results[name] = {"skipped": "deadline"}
            continue
        settings = dict(spec["common"])
        overrides = dict(OURS[name])
        config = TrainConfig().with_preset(overrides.pop("preset"))
        profiler = _profiler() if overrides.pop("profile", False) else None
        window: dict = {}
        restore = flux_ab.apply(overrides, Path(spec["out"]))
        for k, v in {**settings, **overrides}.items():
            setattr(config, k, v)
        config.output_dir = str(Path(spec["out"]) / name)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            original_reset()
        running_max[0] = 0
        base = torch.cuda.memory_reserved() if cuda else 0
        stamps, losses, phases = [], [], {}
        t0 = time.time()

        def on_event(e, stamps=stamps, losses=losses, phases=phases, t0=t0, profiler=profiler, window=window):
            now = time.time() - t0
            if e.kind == "step":
                stamps.append(now)
                losses.append(e.loss)
                if profiler is not None and len(stamps) in PROFILE_STEPS:
                    _profile_edge(profiler, window, len(stamps) == PROFILE_STEPS[0])
            elif e.kind in ("cache", "phase") and e.phase not in phases:
                phases[e.phase] = now
        row = {"settings": {k: getattr(config, k) for k in ("preset", "fp8_base", "blocks_to_swap", "optimizer",
                                                            "gradient_checkpointing", "cpu_offload_checkpointing",
                                                            "accel", "rank", "alpha", "resolution")}}
        row["settings"]["fp8_matmul"] = getattr(config, "fp8_matmul", False)
        row["settings"]["fp8_matmul_backward"] = getattr(config, "fp8_matmul_backward", False)
        row["settings"]["fused_math"] = getattr(config, "fused_math", True)
        row["settings"]["validate_every_n_epochs"] = getattr(config, "validate_every_n_epochs", None)
        try:
            result = run_training(config, on_event=on_event)
            row["final_loss"] = result.final_loss
        except Exception as e:  # noqa: BLE001 - recorded, the next run goes on
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:600]
        row["wall_s"] = round(time.time() - t0, 2)
        row["reserved_before_gib"] = round(base / 2**30, 3)
        if cuda:
            row["peak_reserved_gib"] = round(max(running_max[0], torch.cuda.max_memory_reserved()) / 2**30, 3)
            row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            row["peak_reserved_before_loop_gib"] = round(before_loop[0] / 2**30, 3)  # load and caching
            before_loop[0] = 0
        row["step_end_s"] = [round(s, 3) for s in stamps]
        row["losses"] = losses
        row["phase_start_s"] = phases
        if restore is not None:
            restore()
        if window.get("summary"):
            row["profile"] = window["summary"]
        results[name] = row
        Path(result_path).write_text(json.dumps(results, indent=1))
        print(f"{name}: {summary_line(row)}", flush=True)
    return 0


def _profiler():
    import torch
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if torch.cuda.is_available()
                   else [ProfilerActivity.CPU])


def _profile_edge(profiler, window: dict, start: bool) -> None:
    """Start the profiler at the end of one step, stop and summarise it at the end of a later one (step events
    come after the step's loss is read, so the GPU has finished it)."""
    from kernel_categories import summarize

    if start:
        profiler.start()
        window["t"] = time.perf_counter()
        return
    if "t" not in window:
        return
    profiler.stop()
    wall = time.perf_counter() - window.pop("t")
    window["summary"] = summarize(profiler, PROFILE_STEPS[1] - PROFILE_STEPS[0], wall)


def summary_line(row: dict) -> str:
    if row.get("error"):
        return "ERROR " + row["error"][:200]
    rate = steady_rate(row.get("step_end_s") or [])
    return (f"{rate and round(rate, 3)} it/s, peak reserved {row.get('peak_reserved_gib')} GiB, "
            f"wall {row.get('wall_s')} s, losses {[round(x, 4) for x in (row.get('losses') or [])][:4]}...")


def steady_rate(ends: list[float], skip: int = 4) -> float | None:
    """Steps per second from the median step interval after the first `skip` steps (warm-up, graph capture):
    our runs' epoch-end "did it learn?" scoring (on by default, kept so that the peak memory is the user's) lands
    inside one interval (~8.5 s for these 8 images on an H100, results/flux_vs_kohya_h100.md)."""
    body = ends[skip:]
    if len(body) < 3:
        body = ends[1:]
    if len(body) < 2:
        return None
    median = statistics.median(b - a for a, b in itertools.pairwise(body))
    return 1.0 / median if median > 0 else None


# ------------------------------------------------------------------------------------ kohya
def kohya_args(models: dict, data: Path, out: Path, tok: Path, size: dict, steps: int, swap: int) -> list[str]:
    args = ["--pretrained_model_name_or_path", models["flux1-dev-random-fp8"], "--clip_l", models["clip_l"],
            "--t5xxl", models["t5xxl_fp8_e4m3fn"], "--ae", models["ae"],
            "--train_data_dir", str(data / "img"), "--output_dir", str(out), "--output_name", "kohya",
            "--resolution", f"{size['res']},{size['res']}", "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", str(LR), "--lr_scheduler", "constant",
            "--seed", str(SEED), "--save_model_as", "safetensors", "--save_precision", "bf16",
            "--caption_extension", ".txt", "--tokenizer_cache_dir", str(tok), "--mixed_precision", "bf16", "--sdpa",
            "--cache_latents", "--cache_text_encoder_outputs", "--network_train_unet_only",
            "--network_module", "networks.lora_flux", "--network_dim", str(RANK), "--network_alpha", str(ALPHA),
            "--optimizer_type", "AdamW", "--max_grad_norm", "1.0", "--max_data_loader_n_workers", "1",
            "--persistent_data_loader_workers", "--fp8_base", "--gradient_checkpointing", "--guidance_scale", "1.0",
            "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw"]
    if swap:
        args += ["--blocks_to_swap", str(swap)]
    return args


def summarise_kohya(raw: dict, t_launch: float, t_exit: float) -> dict:
    starts = [s - t_launch for s in raw.get("steps") or []]
    ends = starts[1:]  # a step ends when the next starts
    row = {"wall_s": round(t_exit - t_launch, 2), "error": raw.get("error"),
           "step_start_s": [round(s, 3) for s in starts], "peak_reserved_gib": raw.get("peak_reserved_gib"),
           "peak_allocated_gib": raw.get("peak_allocated_gib"),
           "phases_s": {k: [round(a - t_launch, 2), round(b - t_launch, 2)] for k, (a, b) in
                        (raw.get("phases") or {}).items()}}
    row["steady_it_s"] = steady_rate(ends, skip=3)
    return row


# ------------------------------------------------------------------------------------ main
def loss_deltas(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    if not n:
        return {}
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n])]
    return {"steps": n, "max_rel": round(max(rel), 5), "mean_rel": round(sum(rel) / n, 5),
            "first_step_rel": round(rel[0], 6)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/fluxbench")
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kohya-steps", type=int, default=8)
    p.add_argument("--sd-scripts", default=str(ROOT / ".kohya" / "sd-scripts"))
    p.add_argument("--kohya-site", default="/tmp/kohya-site")
    p.add_argument("--skip-kohya", action="store_true")
    p.add_argument("--ours", default="R1,R2,R3,R0", help="which of our runs, in order")
    p.add_argument("--order", default="R1,R2,R0,K24,K16,R3", help="run order (kohya: K24, K16)")
    p.add_argument("--deadline", type=float, default=1e9, help="seconds after start: start no run after this")
    a = p.parse_args()

    work = Path(a.work)
    size = SIZES[a.size]
    result: dict = {"command": " ".join(sys.argv), "size": a.size, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    sys.path.insert(0, str(ROOT))
    import torch

    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name(0)
    result["torch"] = torch.__version__
    t = time.time()
    models = write_models(work / "models", size, a.device if torch.cuda.is_available() else "cpu")
    result["write_models_s"] = round(time.time() - t, 1)
    result["model_files_gib"] = {k: round(os.path.getsize(v) / 2**30, 2) for k, v in models.items()}
    data = make_dataset(work / "data", size["res"], size["images"])
    tok = work / "tokenizers"
    write_kohya_tokenizers(tok)
    for f in models.values():  # page cache warm for both tools
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    result["prepared_s"] = round(time.time() - T_BEGIN, 1)
    print(f"models and data ready after {result['prepared_s']} s: {result['model_files_gib']}", flush=True)

    common = {"model": models["flux1-dev-random-fp8"], "clip_l": models["clip_l"], "t5": models["t5xxl_fp8_e4m3fn"],
              "vae": models["ae"], "data": str(data), "name": "ours", "max_steps": a.steps, "epochs": 0,
              "seed": SEED, "save_state": False, "overwrite": True, "device": a.device, "save_precision": "bf16",
              "rank": RANK, "alpha": ALPHA, "learning_rate": LR, "resolution": size["res"]}
    if a.size == "smoke":
        common.update(bucket_reso_steps=32, min_bucket_reso=32, max_bucket_reso=128)
    ours_done: dict = {}
    kohya_done: dict = {}
    pending_ours: list[str] = []

    def flush_ours() -> None:
        if not pending_ours:
            return
        spec = work / "ours_spec.json"
        spec.write_text(json.dumps({"runs": list(pending_ours), "common": common, "out": str(work / "out"),
                                    "deadline": T_BEGIN + a.deadline}))
        res = work / "ours_result.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        log = work / "ours.log"
        t_launch = time.time()
        with open(log, "w") as f:
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child-ours", str(spec), str(res)],
                           env=env, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT, check=False)
        got = json.loads(res.read_text()) if res.is_file() else {}
        for name in pending_ours:
            row = got.get(name, {"error": "no result (see log)"})
            row["steady_it_s"] = steady_rate(row.get("step_end_s") or [])
            ours_done[name] = row
        result["ours_process_s"] = round(time.time() - t_launch, 1)
        text = log.read_text(errors="replace")
        result["ours_log_tail"] = text[-3000:]
        # kinds of call of the compiled block math that ran eagerly instead (accel/fused_math.py warns each)
        result.setdefault("ours_compile_fallbacks", []).extend(
            line[:300] for line in text.splitlines() if "could not be compiled" in line)
        pending_ours.clear()

    wanted = set(a.ours.split(","))
    for item in a.order.split(","):
        if item.startswith("R"):
            if item in wanted:
                pending_ours.append(item)
            continue
        flush_ours()
        if a.skip_kohya or time.time() - T_BEGIN > a.deadline:
            kohya_done[item] = {"skipped": "skip-kohya" if a.skip_kohya else "deadline"}
            continue
        swap = 16 if item == "K16" else 0
        out = work / "kohya" / item
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        raw_path = out / "timing.json"
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([a.kohya_site, a.sd_scripts])}
        cmd = [sys.executable, str(HERE / "kohya_run.py"), str(raw_path), "flux_train_network.py", "--",
               *kohya_args(models, data, out, tok, size, a.kohya_steps, swap)]
        log = out / "log.txt"
        t_launch = time.time()
        with open(log, "w") as f:
            subprocess.run(cmd, env=env, cwd=a.sd_scripts, stdout=f, stderr=subprocess.STDOUT, check=False)
        t_exit = time.time()
        raw = json.loads(raw_path.read_text()) if raw_path.is_file() else {"error": "no timing file"}
        row = summarise_kohya(raw, t_launch, t_exit)
        row["args"] = " ".join(kohya_args(models, data, Path("OUT"), Path("TOK"), size, a.kohya_steps, swap))
        if row.get("error") or not row.get("steady_it_s"):
            row["log_tail"] = log.read_text(errors="replace")[-3000:]
        kohya_done[item] = row
        print(f"{item}: {row.get('steady_it_s')} it/s, peak reserved {row.get('peak_reserved_gib')} GiB, "
              f"wall {row['wall_s']} s, error {row.get('error')}", flush=True)
        Path(a.out).write_text(json.dumps({**result, "ours": ours_done, "kohya": kohya_done}, indent=1))
    flush_ours()

    result["ours"], result["kohya"] = ours_done, kohya_done
    ref = ours_done.get("R0", {}).get("losses") or []
    result["loss_vs_eager_bf16"] = {k: loss_deltas(v.get("losses") or [], ref) for k, v in ours_done.items()
                                    if k != "R0"}
    targets = {}

    def rate(d, k):
        return (d.get(k) or {}).get("steady_it_s")

    def peak(d, k):
        return (d.get(k) or {}).get("peak_reserved_gib")

    if rate(ours_done, "R1") and rate(kohya_done, "K24"):
        targets["24gb_speedup_vs_kohya"] = round(rate(ours_done, "R1") / rate(kohya_done, "K24"), 3)
        targets["24gb_peak_not_higher"] = (peak(ours_done, "R1") or 1e9) <= (peak(kohya_done, "K24") or 0)
    if rate(ours_done, "R2") and rate(kohya_done, "K16"):
        targets["12gb_speedup_vs_kohya_swap16"] = round(rate(ours_done, "R2") / rate(kohya_done, "K16"), 3)
    targets["12gb_peak_le_11_5"] = peak(ours_done, "R2") is not None and peak(ours_done, "R2") <= 11.5
    targets["8gb_peak_le_7_5"] = peak(ours_done, "R3") is not None and peak(ours_done, "R3") <= 7.5
    result["targets"] = targets
    result["total_s"] = round(time.time() - T_BEGIN, 1)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"targets": targets, "loss_vs_eager_bf16": result["loss_vs_eager_bf16"]}, indent=1))
    for k, v in itertools.chain(ours_done.items(), kohya_done.items()):
        print(f"{k}: {v.get('steady_it_s')} it/s, peak reserved {v.get('peak_reserved_gib')} GiB, error "
              f"{(v.get('error') or '')[:200]}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ours":
        sys.exit(child_ours(sys.argv[2], sys.argv[3]))
    sys.exit(main())
