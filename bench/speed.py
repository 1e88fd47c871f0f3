#!/usr/bin/env python3
"""Training-step speed and memory: plain diffusers+peft loop vs lora_trainer.accel, lever by lever.

Random-weight SD1.5 / SDXL UNets (the package's bundled configs), LoRA on kohya's default
target set (every Linear/Conv inside the transformer blocks: 192 modules for SD1.5, 722 for
SDXL), bf16 autocast, SDPA, fused AdamW, latents and text embeddings already on the GPU (cached),
text encoders and VAE not on the GPU. Timed loops call `loss.item()` every step, as a trainer's
progress display does.

Sections (--sections, comma separated):
  env      GPU, versions
  sd15     SD1.5 512 px, r32/a16, batch 1 and 8: peft eager (reference), then each lever
  equiv    same init, same batches: losses and LoRA weights of eager peft vs fused+graphs
  sdxl     SDXL 1024 px batch 1, r32/a16, no checkpointing: peft eager vs fused+graphs
  lowvram  the low-VRAM presets (sd15-lowvram r16, sdxl-lowvram r8): checkpointing, fp8 base
  profile  where the time of the fastest step goes (kernel categories, GPU busy): --profile-cases
  compile  per-transformer-block torch.compile on top (compile time reported)

Usage: python bench/speed.py [--sections ...] [--tiny] [--out FILE]
(--tiny: CPU smoke test with tiny configs; numbers mean nothing.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from lora_trainer import accel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_models
from kernel_categories import classify

T0 = time.time()
p = argparse.ArgumentParser()
p.add_argument("--sections", default="env,sd15,equiv,sdxl,lowvram,profile,compile")
p.add_argument("--tiny", action="store_true")
p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "speed.json"))
p.add_argument("--deadline", type=float, default=420.0, help="seconds; later work is skipped past it")
p.add_argument("--seconds", type=float, default=2.0, help="target seconds per timed variant")
p.add_argument("--profile-cases", default="sd15:1,sd15:8",
               help="the profile section's MODEL:BATCH cases (sd15, sdxl), e.g. sdxl:1,sd15:8")
p.add_argument("--profile-variants", default="default,cl",
               help="the profile section's variants: default (fused LoRA, graphs, bf16 norms), cl (+ channels_last), "
                    "nolean (default without the lean Linear product, accel's lean_lora_product), noalpha / clnoalpha (the LoRA "
                    "scale multiplied into B instead of the GEMMs' alpha), cltorchgn (cl with "
                    "torch's GroupNorm instead of the NHWC one), geglu (cl with accel's fused GEGLU, "
                    "fused_geglu, instead of diffusers' own)")
args = p.parse_args()
speed_models.configure(args.tiny)
from speed_models import (
    DEV,
    TINY,
    Lora,
    alphas,
    batches,
    drop_base,
    free,
    has_base,
    make_inputs,
    make_loss_fn,
    mem,
    sync,
)

RES: dict = {"env": {}, "runs": [], "equiv": {}, "profile": {}, "errors": []}



def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def save():
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RES, f, indent=1, default=str)
    os.replace(tmp, args.out)


def remaining():
    return args.deadline - (time.time() - T0)


# ------------------------------------------------------------------ one measured variant
def run_variant(label: str, kind: str, bs: int, latent: int, *, rank=32, alpha=16.0, fused=False, graphs=False,
                channels_last=False, gc_on=False, fp8=False, clip=1.0, compile_blocks=False, norms=False,
                nhwc_gn=True, extra=None):
    rec = {"label": label, "model": kind, "bs": bs, "px": latent * 8, "rank": rank, "fused_lora": fused, "cuda_graphs": graphs,
               "channels_last": channels_last, "grad_ckpt": gc_on, "fp8_base": fp8, "lowp_norms": norms, "max_grad_norm": clip,
               "compile_blocks": compile_blocks, "nhwc_group_norm": nhwc_gn}
    rec.update(extra or {})
    net = None
    try:
        if fp8 and has_base(kind):
            drop_base()  # fp8 replaces the shared UNet's Linear modules: build a fresh one after
        free()
        net = Lora(kind, rank, alpha)
        unet = net.unet
        rec["lora_modules"] = net.n_modules
        rec["lora_params_M"] = round(sum(p_.numel() for p_ in net.params) / 1e6, 3)
        if gc_on:
            unet.enable_gradient_checkpointing()
        opts = accel.AccelOptions(enabled=fused or graphs or channels_last or fp8 or norms, fused_lora=fused,
                                  cuda_graphs=graphs, channels_last=channels_last, fp8_base=fp8, lowp_norms=norms,
                                  nhwc_group_norm=nhwc_gn)
        if opts.enabled:
            rec["prepared"] = accel.prepare_model(unet, opts, device=DEV)
        if compile_blocks:
            t = time.time()
            for m in unet.modules():
                if type(m).__name__ == "BasicTransformerBlock":
                    m.compile()
            rec["compile_setup_s"] = round(time.time() - t, 2)
        lat, enc, added = make_inputs(unet, kind, bs, latent)
        if channels_last:
            lat = lat.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.params, lr=1e-4, weight_decay=1e-2, **accel.optimizer_kwargs(DEV))
        runner = accel.StepRunner(make_loss_fn(unet, alphas(DEV), added), net.params, opt,
                                  opts if opts.enabled else accel.AccelOptions.off(), max_grad_norm=clip,
                                  device=DEV)
        it = batches(lat, enc)
        free()
        t = time.perf_counter()
        warm = 1 if TINY else (opts.graph_warmup + 2 if graphs else 3)
        for _ in range(warm):
            loss = runner.step(next(it)).item()
        rec["first_steps_s"] = round(time.perf_counter() - t, 2)
        rec["warmup_mem"] = mem()  # cuDNN autotune and the eager warm-up steps included
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()  # from here on: the steady state of training
        t = time.perf_counter()
        runner.step(next(it)).item()
        est = max(time.perf_counter() - t, 1e-4)
        n = 2 if TINY else int(min(max(args.seconds / est, 5), 200))
        sync()
        t = time.perf_counter()
        for _ in range(n):
            loss = runner.step(next(it)).item()
        dt = (time.perf_counter() - t) / n
        rec.update(step_ms=round(dt * 1e3, 2), it_per_s=round(1 / dt, 3), img_per_s=round(bs / dt, 2), n_timed=n,
                   loss=loss, loss_finite=math.isfinite(loss), runner=dict(runner.stats),
                   graphs_off_reason=runner.disabled_reason)
        rec["runner"]["capture_s"] = round(rec["runner"]["capture_s"], 2)
        rec.update(mem())
        del runner, opt, it
    except torch.OutOfMemoryError as e:
        rec["error"] = "OOM"
        log("OOM", str(e)[:200])
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:600]
        traceback.print_exc()
    finally:
        if net is not None:
            net.close()
        if fp8:
            drop_base()
        free()
    RES["runs"].append(rec)
    save()
    log(f"{label:28s} {kind} bs={bs} {rec.get('it_per_s')} it/s {rec.get('img_per_s')} img/s "
        f"alloc {rec.get('peak_alloc_GiB')} reserved {rec.get('peak_reserved_GiB')} GiB {rec.get('error', '')}")
    return rec


LEVERS = [  # (label, kwargs); run 1 (results/speed_h100_run1.json) also has peft_graphs, fused_eager
    ("peft_eager", {"clip": 0.0}),
    ("fused_graphs", {"fused": True, "graphs": True}),
    ("fused_graphs_norms", {"fused": True, "graphs": True, "norms": True}),
    ("fused_graphs_norms_cl", {"fused": True, "graphs": True, "norms": True, "channels_last": True}),
    # channels_last with torch's GroupNorm (NCHW copies) instead of the NHWC one (accel/group_norm_nhwc.py)
    ("fused_graphs_norms_cl_torchgn", {"fused": True, "graphs": True, "norms": True, "channels_last": True,
                                       "nhwc_gn": False}),
]


def sec_env():
    import diffusers
    import peft
    import transformers
    e = RES["env"]
    e.update(python=sys.version.split()[0], torch=torch.__version__, cuda=torch.version.cuda,
             cudnn=torch.backends.cudnn.version(), diffusers=diffusers.__version__, peft=peft.__version__,
             transformers=transformers.__version__, platform=platform.platform(), command=" ".join(sys.argv))
    if DEV == "cuda":
        pr = torch.cuda.get_device_properties(0)
        e.update(gpu=pr.name, sm_count=pr.multi_processor_count, mem_GiB=round(pr.total_memory / 2**30, 2))
    log("env", json.dumps(e))


def sec_sd15():
    lat = 8 if TINY else 64
    for bs in ((1, 2) if TINY else (1, 8)):
        for label, kw in LEVERS:
            if remaining() < 20:
                return
            run_variant(label, "sd15", bs, lat, **kw)


def sec_sdxl():
    lat = 16 if TINY else 128
    for label, kw in (("peft_eager_clip", {}), ("fused_graphs_norms", {"fused": True, "graphs": True, "norms": True})):
        if remaining() < 30:
            return
        run_variant(label, "sdxl", 1, lat, **kw)


def sec_lowvram():
    # The presets in lora_trainer/config.py: sd15-lowvram r16/a8, sdxl-lowvram r8/a4, both with
    # gradient checkpointing; VAE and text encoders are off the GPU after caching.
    for kind, lat, rank, alpha in (("sd15", 8 if TINY else 64, 16, 8.0), ("sdxl", 16 if TINY else 128, 8, 4.0)):
        for label, kw in (("lowvram_fused_graphs_gc_norms", {"gc_on": True, "fused": True, "graphs": True,
                                                              "norms": True}),
                          ("lowvram_fused_graphs_gc_norms_fp8", {"gc_on": True, "fused": True, "graphs": True,
                                                                  "norms": True, "fp8": True})):
            if remaining() < 30:
                return
            run_variant(label, kind, 1, lat, rank=rank, alpha=alpha, **kw)


def sec_equiv():
    """Eager peft (reference) vs fused LoRA + CUDA graphs: same init, same batch sequence."""
    lat = 8 if TINY else 64
    bs, steps = 2, (4 if TINY else 30)
    out = {}
    finals = {}
    for label, fused, graphs in (("peft_eager", False, False), ("peft_eager_repeat", False, False),
                                 ("fused_eager", True, False), ("fused_graphs", True, True)):
        net = Lora("sd15", 32, 16.0, seed=3)
        unet = net.unet
        # fused_graphs = the engine's defaults (AccelOptions()): fused LoRA, graphs, norms in bf16
        opts = accel.AccelOptions(fused_lora=fused, cuda_graphs=graphs, lowp_norms=graphs) if (fused or graphs) \
            else accel.AccelOptions.off()
        accel.prepare_model(unet, opts, device=DEV)
        lat_, enc, added = make_inputs(unet, "sd15", bs, lat)
        opt = torch.optim.AdamW(net.params, lr=1e-3, weight_decay=1e-2, **accel.optimizer_kwargs(DEV))
        runner = accel.StepRunner(make_loss_fn(unet, alphas(DEV), added), net.params, opt, opts, max_grad_norm=1.0,
                                  device=DEV)
        it = batches(lat_, enc, seed=9)
        out[label] = [runner.step(next(it)).item() for _ in range(steps)]
        out[label + "_stats"] = dict(runner.stats)
        from peft.utils import get_peft_model_state_dict
        finals[label] = {k: v.detach().float().cpu() for k, v in
                         get_peft_model_state_dict(unet, adapter_name="bench").items()}
        del runner, opt
        net.close()
    ref = out["peft_eager"]
    for label in ("peft_eager_repeat", "fused_eager", "fused_graphs"):
        d = [abs(a - b) / max(abs(a), 1e-8) for a, b in zip(out[label], ref)]
        wa = torch.cat([v.flatten() for _, v in sorted(finals[label].items())])
        wr = torch.cat([v.flatten() for _, v in sorted(finals["peft_eager"].items())])
        out[f"{label}_vs_peft"] = {"max_rel_loss_diff": float(f"{max(d):.3g}"),
                                       "mean_rel_loss_diff": float(f"{sum(d) / len(d):.3g}"),
                                       "final_lora_weights_rel_diff": float(f"{float((wa - wr).norm() / wr.norm()):.3g}"),
                                       "same_keys": sorted(finals[label]) == sorted(finals["peft_eager"])}
    g, e = out["fused_graphs"], out["fused_eager"]
    out["graphs_vs_fused_eager_max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(g, e))
    out["mean_loss_first_last_5"] = {k: [round(sum(out[k][:5]) / 5, 5), round(sum(out[k][-5:]) / 5, 5)]
                                     for k in ("peft_eager", "peft_eager_repeat", "fused_eager", "fused_graphs")} \
        if not TINY else None
    RES["equiv"] = out
    save()
    log("equiv", json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}))


def sec_profile():
    from torch.profiler import ProfilerActivity, profile
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.profile_cases.split(",") if c]
    base = {"fused": True, "graphs": True, "norms": True}
    known = {"default": ("fused_graphs_norms", base), "cl": ("fused_graphs_norms_cl", {**base, "cl": True}),
             "nolean": ("fused_graphs_norms_nolean", {**base, "lean": False}),
             "cltorchgn": ("fused_graphs_norms_cl_torchgn", {**base, "cl": True, "nhwc_gn": False}),
             "noalpha": ("fused_graphs_norms_noalpha", {**base, "noalpha": True}),
             "clnoalpha": ("fused_graphs_norms_cl_noalpha", {**base, "cl": True, "noalpha": True}),
             "geglu": ("fused_graphs_norms_cl_geglu", {**base, "cl": True, "geglu": True})}
    variants = [known[v] for v in args.profile_variants.split(",") if v]
    from lora_trainer.accel import lora_fast
    with_alpha = lora_fast._lora_weights

    def scaled_b(layer, name, x):  # noalpha: B multiplied by the LoRA scale, as before the GEMMs took it as alpha
        return (*lora_fast._scaled_lora_weights(layer, name, x), 1.0)

    for kind, bs in cases:
        lat = (8 if TINY else 64) * (2 if kind == "sdxl" else 1)
        bs = 2 if TINY else bs
        for label, kw in variants:
            if remaining() < 25:
                return
            lora_fast._lora_weights = scaled_b if kw.get("noalpha") else with_alpha
            net = Lora(kind, 32, 16.0)
            unet = net.unet
            opts = accel.AccelOptions(fused_lora=kw.get("fused", False), cuda_graphs=kw.get("graphs", False),
                                      lowp_norms=kw.get("norms", False), channels_last=kw.get("cl", False),
                                      lean_lora_product=kw.get("lean", True), nhwc_group_norm=kw.get("nhwc_gn", True),
                                      fused_geglu=kw.get("geglu", False))
            prepared = accel.prepare_model(unet, opts, device=DEV)
            lat_, enc, added = make_inputs(unet, kind, bs, lat)
            if opts.channels_last:
                lat_ = lat_.contiguous(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(net.params, lr=1e-4, **accel.optimizer_kwargs(DEV))
            runner = accel.StepRunner(make_loss_fn(unet, alphas(DEV), added), net.params, opt, opts,
                                      max_grad_norm=kw.get("clip", 1.0), device=DEV)
            it = batches(lat_, enc)
            for _ in range(5):
                runner.step(next(it)).item()
            steps = 5
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
            with profile(activities=acts) as prof:
                sync()
                t = time.perf_counter()
                for _ in range(steps):
                    runner.step(next(it)).item()
                sync()
                wall = time.perf_counter() - t
            cats: dict = {}
            total, nk = 0.0, 0
            top: dict = {}
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    d = ev.device_time_total
                    total += d
                    nk += 1
                    c = classify(ev.name)
                    cats[c] = cats.get(c, 0.0) + d
                    top[ev.name] = top.get(ev.name, 0.0) + d
            rec = {"bs": bs, "wall_ms_per_step": round(wall / steps * 1e3, 2),
                       "gpu_kernel_ms_per_step": round(total / steps / 1e3, 2),
                       "gpu_busy": round(total / 1e6 / wall, 3) if wall else None, "kernels_per_step": nk // steps,
                       "by_category_ms": {k: round(v / steps / 1e3, 2) for k, v in sorted(cats.items(), key=lambda x: -x[1])},
                       "top_kernels_ms": [(k[:110], round(v / steps / 1e3, 3))
                                       for k, v in sorted(top.items(), key=lambda x: -x[1])[:15]],
                       "prepared": {k: v for k, v in prepared.items() if v}}  # which levers took which modules
            key = f"{kind}_{label}_bs{bs}"
            RES["profile"][key + ("_again" if key in RES["profile"] else "")] = rec
            save()
            log("profile", kind, label, bs, json.dumps({k: v for k, v in rec.items() if k != "top_kernels_ms"}))
            del runner, opt, prof
            net.close()


def sec_compile():
    if DEV != "cuda" and not TINY:
        return
    if remaining() < 150:
        log("compile: skipped (deadline)")
        return
    run_variant("fused_graphs_norms_compile", "sd15", 8 if not TINY else 2, 64 if not TINY else 8, fused=True,
                graphs=True, norms=True, compile_blocks=True)


SECTIONS = {"env": sec_env, "sd15": sec_sd15, "equiv": sec_equiv, "sdxl": sec_sdxl, "lowvram": sec_lowvram,
                "profile": sec_profile, "compile": sec_compile}

for name in args.sections.split(","):
    if remaining() < 15:
        log("deadline: skipping", name)
        continue
    log(f"=== {name} (remaining {remaining():.0f}s)")
    try:
        SECTIONS[name]()
    except Exception as ex:  # noqa: BLE001
        traceback.print_exc()
        RES["errors"].append(f"{name}: {type(ex).__name__}: {ex}"[:800])
    save()
    free()

print("\n==== speed.py summary ====")
print("env", json.dumps({k: RES["env"].get(k) for k in ("gpu", "torch", "diffusers", "peft")}))
for r in RES["runs"]:
    print(f"{r['label']:28s} {r['model']:4s} bs={r['bs']} r{r['rank']}: {r.get('it_per_s')} it/s "
          f"{r.get('img_per_s')} img/s alloc {r.get('peak_alloc_GiB')} res {r.get('peak_reserved_GiB')} "
          f"(warm-up incl. res {r.get('warmup_mem', {}).get('peak_reserved_GiB')}) "
          f"first {r.get('first_steps_s')}s {r.get('error', '')}")
for k, v in RES["equiv"].items():
    if not isinstance(v, list):
        print("equiv", k, v)
for k, v in RES["profile"].items():
    print("profile", k, {kk: vv for kk, vv in v.items() if kk != "top_kernels_ms"})
print("errors", RES["errors"])
print(f"total {time.time() - T0:.0f}s")
