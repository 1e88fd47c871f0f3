"""GPU benchmark of the WebUI model hand-off (A1111 path, no WebUI needed).

Builds a full-size random SD1.5 / SDXL model, lays its tensors out on the GPU in the LDM/SGM
checkpoint layout (what A1111 holds in memory, fp16), then measures what `A1111Host` does around
a run: the weight fingerprint (hash) it takes before and checks after, `bundle_from_ldm_state_dict`
(must allocate ~0 bytes of VRAM: every weight is the host's storage), and the release.

    python bench/webui_handoff.py --family sd1 [--family sdxl] [--out bench/results/webui_handoff.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from handoff_models import full_size_random_bundle, host_generation


def _full_size_state(family: str, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from lora_trainer.models.ldm_writer import bundle_to_ldm_state_dict

    sd = bundle_to_ldm_state_dict(full_size_random_bundle(family))
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in sd.items()}


def run(family: str, device: str = "cuda") -> dict:
    from lora_trainer.models.loader import bundle_from_ldm_state_dict
    from lora_trainer.webui.common import tensor_fingerprint

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    host = _full_size_state(family, dev, torch.float16 if cuda else torch.float32)
    if cuda:
        torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev) if cuda else sum(t.numel() * t.element_size() for t in host.values())
    t0 = time.perf_counter()
    fp = tensor_fingerprint(host)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle = bundle_from_ldm_state_dict(host, name=f"random-{family}")
    if cuda:
        torch.cuda.synchronize()
    t_handoff = time.perf_counter() - t0
    extra = torch.cuda.memory_allocated(dev) - base if cuda else None
    ptrs = {t.data_ptr() for t in host.values()}
    params = [p for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters()]
    shared = sum(p.numel() for p in params if p.data_ptr() in ptrs) / max(1, sum(p.numel() for p in params))
    del bundle, params
    if cuda:
        torch.cuda.empty_cache()
    after_release = torch.cuda.memory_allocated(dev) - base if cuda else None
    same = tensor_fingerprint(host) == fp
    return {"family": family, "host_weights_gib": round(base / 2**30, 3), "hash_s": round(t_hash, 2),
            "handoff_s": round(t_handoff, 2), "handoff_extra_vram_mib": None if extra is None else round(extra / 2**20, 1),
            "shared_fraction": round(shared, 4), "after_release_extra_mib": None if after_release is None else round(after_release / 2**20, 1),
            "bit_identical": same, "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__}


def train_to_first_step(family: str, device: str = "cuda", images: int = 32, steps: int = 20,
                        host_dtype: torch.dtype = torch.float16) -> dict:
    """What pressing Train costs inside A1111 with the model in memory: the weights' fingerprint,
    the hand-off, then `run_training` (latent + text caching, LoRA, first step). The model has
    generated once before (a WebUI has), so CUDA's lazy loading of inference kernels is not counted."""
    import shutil
    import tempfile
    from pathlib import Path

    from train_speed import make_dataset

    from lora_trainer.config import TrainConfig
    from lora_trainer.models.loader import bundle_from_ldm_state_dict
    from lora_trainer.train import run_training
    from lora_trainer.webui.common import tensor_fingerprint

    dev = torch.device(device)
    host = _full_size_state(family, dev, host_dtype if dev.type == "cuda" else torch.float32)
    size = 1024 if family == "sdxl" else 512
    warm = bundle_from_ldm_state_dict(host, name=f"random-{family}")
    host_generation(warm.unet, warm.vae, size)  # the WebUI has generated with its model
    del warm
    work = Path(tempfile.mkdtemp(prefix="handoff-train-"))
    try:
        data = make_dataset(work / "data", size, images)
        config = TrainConfig().with_preset("sdxl" if family == "sdxl" else "sd15")
        config.data, config.output_dir, config.name = str(data), str(work / "out"), "handoff"
        config.resolution, config.max_steps, config.epochs = size, steps, 0
        config.save_state, config.device = False, device
        first: list[float] = []
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fp = tensor_fingerprint(host)
        t_fp = time.perf_counter() - t0
        bundle = bundle_from_ldm_state_dict(host, name=f"random-{family}")

        phases = {"fingerprint": round(t_fp, 2)}

        def on_event(e) -> None:
            if e.kind == "step" and not first:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                first.append(time.perf_counter() - t0)
            elif e.kind != "step":
                phases.setdefault(f"{e.kind}: {(e.message or '')[:30]}", round(time.perf_counter() - t0, 2))

        result = run_training(config, bundle=bundle, on_event=on_event)
        del bundle
        same = tensor_fingerprint(host) == fp
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"family": family, "images": images, "resolution": size, "host_dtype": str(next(iter(host.values())).dtype),
            "fingerprint_s": round(t_fp, 2), "train_to_first_step_s": round(first[0], 2) if first else None,
            "steps": result.steps, "host_weights_bit_identical": same,
            "phases_s": phases}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run of the code)")
    p.add_argument("--out")
    p.add_argument("--train", action="store_true",
                   help="also time Train -> first step (fingerprint + hand-off + run_training, 32 images)")
    p.add_argument("--host-dtype", choices=["fp16", "bf16"], default="fp16",
                   help="how the WebUI holds the weights (A1111: fp16 unless --no-half / bf16 settings)")
    p.add_argument("--skip-handoff", action="store_true", help="only the --train measurement")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu for a dry run)")
    results = [] if a.skip_handoff else [run(f, a.device) for f in a.family or ["sd1", "sdxl"]]
    if a.train:
        logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
        logging.getLogger("lora_trainer").setLevel(logging.INFO)  # phases, graph capture times
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[a.host_dtype]
        results += [train_to_first_step(f, a.device, host_dtype=dtype) for f in a.family or ["sd1", "sdxl"]]
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
