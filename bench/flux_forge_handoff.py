"""GPU benchmark of training a Flux LoRA on the Flux that Forge already holds (issue 18; no Forge needed).

Builds a random full-size FLUX.1-dev (19 double + 38 single blocks, hidden 3072; CLIP-L; T5-XXL; the 16-channel
VAE) laid out as Forge main / Neo hold it on a GPU (built in flux_forge_models.py), with the Forge-shaped
stand-ins of tests/forge_flux_standins.py (`make_forge_flux`: Forge's Linear layers with the weight as stored,
every weight an inference tensor): the transformer stored as bf16, fp8 e4m3fn, fp8_scaled, GGUF Q8_0 or nf4; CLIP-L fp16;
T5-XXL's Linears fp8 e4m3fn (t5xxl_fp8_e4m3fn; its other weights fp16); the VAE bf16. GGUF Q8_0 is quantised
and dequantised in torch on the GPU here (`TorchQ8_0`: Neo's block layout and dequantize_pytorch; the `gguf`
package is not needed), nf4 with real bitsandbytes (`quantize_4bit`, blocksize 64, as Forge).

Per storage format, what ForgeHost does around a run: the fingerprint of Forge's weights, the hand-off
(`forge_flux.acquire`: the bytes it newly allocates and keeps alive, counted exactly on any device from the live
tensor storages before and after it (tests/tensor_accounting.py), and on CUDA the VRAM it adds: ~0 besides the
small copies it declares; its time),
`run_training` on it (flux-24gb preset settings at 1024 px, batch 1, rank 16, N steps; time from the call to the
end of the first step, steady it/s after warm-up, peak reserved VRAM of the run with Forge's model resident),
Forge's weights bit-identical afterwards and still the same tensor objects, and the trained LoRA's effect at
weight 1 (output with it - without it) on the stored base vs on the bf16 weights it was made from, both computed
in fp32 on fixed small inputs (relative error against `EFFECT_TOLERANCE` of the stand-ins; fp8 e4m3fn takes
fp8_scaled's bound, bf16 0.02: the same values, so only rounding noise, the run's own floor for the others).

    python bench/flux_forge_handoff.py --out bench/results/flux_forge_handoff.json --deadline 420
    python bench/flux_forge_handoff.py --tiny --device cpu --out /tmp/flux_forge_handoff.json   # CPU smoke (1 min)
    python bench/flux_forge_handoff.py --device cpu --handoff-only --handoff-dtype bf16 --blocks 1,1,1 \
        --formats bf16 --out /tmp/handoff_cpu.json    # the hand-off alone at full width, cast as on a GPU (40 s)

The JSON is written after every format (a run cut short keeps what it measured); `--deadline S` starts no
format S seconds after the start (recorded as skipped_for_deadline).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

T_BEGIN = time.time()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))  # also when run with runpy (the before/after check imports another lora_trainer)

import flux_forge_models as models
import tensor_accounting as accounting
import torch
from flux_forge_models import build_forge_flux, q8_0_matches_gguf
from torch import nn

FORMATS = ("bf16", "fp8", "fp8_scaled", "gguf", "nf4")
PRESET = "flux-24gb"  # what fitting_preset picks with an H200's memory (recorded per run)
MAKE_ROOM: list[int] = []  # what the hand-off asked Forge's (stand-in) memory manager to leave free


# ---------------------------------------------------------------- one storage format
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def steady_rate(ends: list[float], skip: int = 4) -> float | None:
    """Steps per second over the step ends after the first `skip` (CUDA graph capture, warm-up)."""
    body = ends[skip:] if len(ends) - skip >= 3 else ends[1:]
    return (len(body) - 1) / (body[-1] - body[0]) if len(body) >= 2 and body[-1] > body[0] else None


def train_config(data: Path, out: Path, device: torch.device, steps: int, tiny: bool, lr: float | None):
    from lora_trainer.config import TrainConfig

    config = TrainConfig().with_preset(PRESET)
    settings = {"data": str(data), "output_dir": str(out), "name": "forge_flux", "max_steps": steps, "epochs": 0,
                "seed": 0, "save_state": False, "device": str(device), "save_precision": "bf16", "overwrite": True,
                "validate_every_n_epochs": 0}  # no validation passes between the timed steps
    if tiny or models.BLOCKS:  # small pictures, short T5 sequences (CPU checks)
        settings.update(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32,
                        t5_max_token_length=32)
    if tiny:
        settings["learning_rate"] = 5e-2  # a large effect on the tiny model, as in the test
    if lr:
        settings["learning_rate"] = lr
    for k, v in settings.items():
        setattr(config, k, v)
    return config


def lora_effect(sd_model, reference: nn.Module, lora_path: Path, device: torch.device, tiny: bool) -> dict:
    """The LoRA at weight 1 on Forge's stored base (the hand-off, fp32 compute) and on the reference values
    (fp32): relative error of effect = out(LoRA) - out(no LoRA), on fixed small inputs."""
    from flux_support import inputs

    from lora_trainer.lora import LoraSpec, inject_lora, load_kohya_file
    from lora_trainer.webui import forge_flux

    tensors, _ = load_kohya_file(lora_path)
    bundle = forge_flux.bundle_from_forge_flux(sd_model, device=device, dtype=torch.float32)
    x = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
         for k, v in inputs(bundle.unet.params, latent=8 if tiny else 32, tokens=5 if tiny else 32).items()}
    effects, plain_norm = [], 0.0
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: the effect is a small difference of two outputs
    for model_bundle in (bundle, dataclasses.replace(bundle, unet=reference)):
        network = inject_lora(model_bundle, LoraSpec.from_kohya_state_dict(tensors))
        complete = network.load_kohya_state_dict(tensors).complete
        with torch.no_grad():
            network.set_multiplier(0.0)
            plain = model_bundle.unet(**x).float()
            network.set_multiplier(1.0)
            effects.append(model_bundle.unet(**x).float() - plain)
        plain_norm = float(plain.norm())
        network.remove()
        if not complete:
            raise RuntimeError("the trained LoRA file did not load completely")
    torch.set_float32_matmul_precision(precision)
    rel = float((effects[0] - effects[1]).norm() / effects[1].norm())
    return {"effect_rel_error": round(rel, 5), "effect_norm_rel_to_output": round(float(effects[1].norm()) / plain_norm, 6),
            "lora_keys": len(tensors)}


def rss_bytes() -> int | None:
    """This process's resident memory (Linux), a rough cross-check of the CPU hand-off's new bytes."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def handoff_accounting(row: dict, before: dict, handoff) -> None:
    """What the hand-off newly allocated and keeps alive, on any device (tests/tensor_accounting.py): the bytes of
    tensor storages alive now and not before it (Forge's are all older), de-duplicated by storage, and the
    largest of them named from the trainer-side modules."""
    bundle = handoff.bundle
    roots = {"transformer": bundle.unet, "CLIP-L": bundle.text_encoders[0], "T5": bundle.text_encoders[1],
             "VAE": bundle.vae}
    new = accounting.new_storages(before, accounting.live_storages())
    s = accounting.summary(new, accounting.name_storages(roots))
    row["handoff_new_bytes"] = s["new_bytes"]
    row["handoff_new_mib"] = round(s["new_bytes"] / 2**20, 2)
    row["handoff_new_storages"] = s["new_storages"]
    row["handoff_new_bytes_named"] = s["new_bytes_named"]
    row["handoff_new_bytes_by_device"] = s["new_bytes_by_device"]
    row["handoff_new_bytes_by_part"] = s["new_bytes_by_root"]  # on a CPU the VAE's bf16 is widened to fp32
    row["handoff_new_tensors_top"] = s["top"]
    # nothing new besides the copies the hand-off declares and small bookkeeping (anchors, position ids)
    row["new_ok"] = s["new_bytes"] <= row["handoff_copied_bytes"] + 8 * 2**20


def run_format(fmt: str, device: torch.device, tiny: bool, steps: int, work: Path, data: Path,
               lr: float | None = None, handoff_only: bool = False) -> dict:
    from forge_flux_standins import EFFECT_TOLERANCE, forge_tensors

    from lora_trainer.train import run_training
    from lora_trainer.webui import forge_flux
    from lora_trainer.webui.common import tensor_fingerprint

    cuda = device.type == "cuda"
    row: dict = {"format": fmt}
    _free(device)
    t0 = time.perf_counter()
    sd_model, reference_fn = build_forge_flux(fmt, device, tiny)
    _sync(device)
    _free(device)
    row["build_s"] = round(time.perf_counter() - t0, 2)
    row["forge_storage"] = forge_flux.storage_report(sd_model).describe()
    before = forge_tensors(sd_model)
    row["forge_weights"] = len(before)
    row["forge_param_bytes"] = sum(t.untyped_storage().nbytes() for t in
                             {t.untyped_storage().data_ptr(): t for t in before.values()}.values())
    t0 = time.perf_counter()
    fp = tensor_fingerprint(before)
    row["fingerprint_s"] = round(time.perf_counter() - t0, 3)
    config = train_config(data, work / f"out-{fmt}", device, steps, tiny, lr)
    row["settings"] = {k: getattr(config, k) for k in ("preset", "resolution", "batch_size", "rank", "alpha",
                                                       "learning_rate", "optimizer", "gradient_checkpointing",
                                                       "mixed_precision", "accel", "train_text_encoder")}
    budget = forge_flux.gpu_budget(forge_flux.parts_of(sd_model).values())
    row["fitting_preset"] = (p.key if (p := forge_flux.fitting_preset(budget)) else None) if budget else None
    row["preset"] = PRESET

    # --- Train pressed: the hand-off (what ForgeHost.acquire_model does after restoring clean weights)
    if cuda:
        _sync(device)
        mem0 = torch.cuda.memory_allocated(device)
        row["forge_model_allocated_bytes"] = mem0
    alive = accounting.live_storages()  # Forge's model and everything else alive before the hand-off
    rss0 = rss_bytes()
    t_train = time.perf_counter()
    handoff = forge_flux.acquire(sd_model, config, device=device, name="flux1-dev-random")
    _sync(device)
    row["handoff_s"] = round(time.perf_counter() - t_train, 3)
    row["training_dtype"] = str(forge_flux.training_dtype(config, device)).replace("torch.", "")
    gc.collect()
    row["handoff_rss_delta_bytes"] = (rss_bytes() - rss0) if rss0 is not None and not cuda else None
    row["make_room_bytes"] = MAKE_ROOM[-1] if MAKE_ROOM else None
    row["handoff_extra_vram_bytes"] = (torch.cuda.memory_allocated(device) - mem0) if cuda else None
    row["handoff_copied_bytes"] = handoff.stats.copied
    row["handoff_live_bytes"] = handoff.stats.live
    row["handoff_aliased_bytes"] = handoff.stats.aliased
    row["handoff_line"] = handoff.line
    handoff_accounting(row, alive, handoff)
    del alive
    if handoff_only:
        return handoff_checks(row, sd_model, handoff, before, fp, device)

    # --- the run, with the peak reserved of all of it (the engine resets the peak before its loop: keep the max)
    running_max = [0]
    original_reset = torch.cuda.reset_peak_memory_stats

    def reset(*a, **k):
        if cuda:
            running_max[0] = max(running_max[0], torch.cuda.max_memory_reserved(device))
        return original_reset(*a, **k)

    if cuda:
        original_reset(device)
        row["reserved_before_run_bytes"] = torch.cuda.memory_reserved(device)
    stamps, losses = [], []
    t_call = time.perf_counter()

    def on_event(e):
        if e.kind == "step":
            stamps.append(time.perf_counter() - t_call)
            losses.append(e.loss)

    torch.cuda.reset_peak_memory_stats = reset
    try:
        result = run_training(config, bundle=handoff.bundle, on_event=on_event)
    finally:
        torch.cuda.reset_peak_memory_stats = original_reset
    _sync(device)
    row["run_s"] = round(time.perf_counter() - t_call, 2)
    if cuda:
        row["peak_reserved_bytes"] = max(running_max[0], torch.cuda.max_memory_reserved(device))
        row["peak_reserved_gib"] = round(row["peak_reserved_bytes"] / 2**30, 2)
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    row["first_step_s"] = round(stamps[0], 2) if stamps else None  # run_training called -> step 1 done
    row["train_to_first_step_s"] = round(stamps[0] + row["handoff_s"], 2) if stamps else None
    row["step_end_s"] = [round(s, 3) for s in stamps]
    row["steady_it_s"] = (round(r, 3) if (r := steady_rate(stamps)) else None)
    row["losses"] = [round(float(x), 5) for x in losses]
    lora_path = result.lora_path
    del handoff, result  # nothing of the run keeps Forge's layers or the bundle alive

    # --- Forge's weights afterwards
    handoff_ok = forge_weights_after(row, sd_model, before, fp)
    _free(device)

    # --- the LoRA's effect on the stored base vs on the values it was made from
    if lora_path is not None:
        reference = reference_fn()
        row.update(lora_effect(sd_model, reference, lora_path, device, tiny))
        del reference
    tolerance = 0.02 if fmt == "bf16" else EFFECT_TOLERANCE.get(fmt, EFFECT_TOLERANCE["fp8_scaled"])
    row["effect_tolerance"] = tolerance
    row["effect_ok"] = row.get("effect_rel_error") is not None and row["effect_rel_error"] < tolerance
    row["handoff_ok"] = handoff_ok and len(stamps) == steps
    row["ok"] = row["handoff_ok"] and row["effect_ok"]
    del sd_model, before
    _free(device)
    return row


def forge_weights_after(row: dict, sd_model, before: dict, fp: dict) -> bool:
    """Forge's weights unchanged (fingerprint) and still the same inference tensors; the hand-off allocated no
    more than the copies it declares (the new bytes, and on CUDA the VRAM). True when all of that holds."""
    from forge_flux_standins import forge_tensors

    from lora_trainer.webui.common import tensor_fingerprint

    after = forge_tensors(sd_model)
    row["forge_weights_changed"] = sum(1 for k, h in tensor_fingerprint(after, like=fp).items() if fp.get(k) != h)
    row["same_tensor_objects"] = all(after[k] is before[k] and after[k].is_inference() for k in before)
    extra = row["handoff_extra_vram_bytes"]
    row["vram_ok"] = extra is None or extra <= row["handoff_copied_bytes"] + 64 * 2**20
    return bool(row["forge_weights_changed"] == 0 and row["same_tensor_objects"] and row["vram_ok"]
                and row["new_ok"])


def handoff_checks(row: dict, sd_model, handoff, before: dict, fp: dict, device: torch.device) -> dict:
    """--handoff-only: no run; the checks of forge_weights_after right after the hand-off."""
    del handoff
    row["ok"] = row["handoff_ok"] = forge_weights_after(row, sd_model, before, fp)
    del sd_model, before
    _free(device)
    return row


def lora_trainer_source() -> dict:
    """Which lora_trainer this run imported (the package may be another tree's: the before/after check)."""
    import subprocess

    import lora_trainer

    path = Path(lora_trainer.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], check=False,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"path": str(path), "commit": commit}


# ---------------------------------------------------------------- main
def install_backend(device: torch.device) -> None:
    """Forge's `backend.*` as the test stand-ins (dequantisers, memory manager, dynamic_args)."""
    from forge_flux_standins import backend_modules

    mods, _ = backend_modules()
    mm = mods["backend.memory_management"]
    mm.get_torch_device = lambda: device
    # record the room asked for, not the models (a list of them would keep each format's Forge model alive)
    mm.load_models_gpu = lambda models, memory_required=0, **kw: MAKE_ROOM.append(int(memory_required))
    sys.modules.update(mods)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny Flux of the tests (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--learning-rate", type=float, help="default: the preset's (1e-4; the tiny smoke test 5e-2)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after start: start no format after this")
    ap.add_argument("--blocks", help="D,S,T: D double + S single blocks, T T5 layers at full width (a check of the "
                    "full-size code path on a CPU; default: FLUX.1-dev's 19,38,24)")
    ap.add_argument("--handoff-only", action="store_true", help="the hand-off and its accounting only (no run, no "
                    "LoRA effect): at full width with --blocks on a CPU")
    ap.add_argument("--handoff-dtype", choices=("bf16", "fp16", "fp32"), help="the training dtype the hand-off "
                    "casts to (default: the engine's rule for the device: fp32 on a CPU, bf16 on a GPU with bf16)")
    ap.add_argument("--work", help="folder for data and LoRA files (default: a temporary one)")
    ap.add_argument("--out")
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        ap.error(f"unknown formats {unknown}; use {', '.join(FORMATS)}")
    device = torch.device(args.device)
    if args.blocks:
        models.BLOCKS = tuple(int(x) for x in args.blocks.split(","))
    install_backend(device)
    if args.handoff_dtype:  # e.g. the GPU's bf16 on a CPU: the same hand-off, the same copies
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.handoff_dtype]
        from lora_trainer.webui import forge_flux

        forge_flux.training_dtype = lambda config, device: dtype
    report: dict = {"command": " ".join(sys.argv), "tiny": args.tiny, "blocks": args.blocks, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch": torch.__version__, "steps": args.steps, "q8_0_matches_gguf": q8_0_matches_gguf(),
                    "handoff_only": args.handoff_only, "handoff_dtype": args.handoff_dtype,
                    "lora_trainer": lora_trainer_source(), "accounting_self_check": accounting.self_check(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": []}
    try:
        import bitsandbytes

        report["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:  # noqa: BLE001 - nf4 then fails and says why
        report["bitsandbytes"] = f"unavailable: {type(e).__name__}: {e}"[:200]

    def write() -> None:
        report["elapsed_s"] = round(time.time() - T_BEGIN, 1)
        text = json.dumps(report, indent=1)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        from train_support import make_dataset

        side = 64 if args.tiny or args.blocks else 1024
        data = make_dataset(work / "data", n=4, repeats=1, sizes=[(side, side)] * 4)  # 4 captioned pictures
        for fmt in formats:
            if time.time() - T_BEGIN > args.deadline:
                report["results"].append({"format": fmt, "skipped_for_deadline": True})
                write()
                continue
            t0 = time.time()
            try:
                row = run_format(fmt, device, args.tiny, args.steps, work, data, args.learning_rate,
                                 args.handoff_only)
            except Exception as e:  # noqa: BLE001 - recorded; the next format goes on
                traceback.print_exc()
                row = {"format": fmt, "error": f"{type(e).__name__}: {e}"[:800], "ok": False}
                _free(device)
            row["format_wall_s"] = round(time.time() - t0, 1)
            report["results"].append(row)
            write()
            print(f"{fmt}: " + json.dumps({k: row.get(k) for k in (
                "ok", "handoff_ok", "effect_ok", "error", "build_s", "handoff_s", "handoff_extra_vram_bytes", "handoff_copied_bytes",
                "handoff_new_bytes", "handoff_rss_delta_bytes",
                "train_to_first_step_s", "steady_it_s", "peak_reserved_gib", "forge_weights_changed",
                "same_tensor_objects", "effect_rel_error", "effect_tolerance", "format_wall_s")}), flush=True)
    write()
    print(json.dumps({r["format"]: {k: r.get(k) for k in ("ok", "handoff_ok", "effect_ok", "steady_it_s", "peak_reserved_gib",
                                                          "effect_rel_error", "error", "skipped_for_deadline")}
                      for r in report["results"]}, indent=1))
    return 0 if all(r.get("ok") for r in report["results"] if not r.get("skipped_for_deadline")) else 1


if __name__ == "__main__":
    sys.exit(main())
