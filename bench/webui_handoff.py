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
import time

import torch
from handoff_models import full_size_random_bundle


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a dry run of the code)")
    p.add_argument("--out")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --device cpu for a dry run)")
    results = [run(f, a.device) for f in a.family or ["sd1", "sdxl"]]
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
