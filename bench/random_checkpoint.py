#!/usr/bin/env python3
"""Write a full-size random SD1.5 / SDXL checkpoint (A1111/Civitai LDM or SGM layout, fp16
`.safetensors`) one tensor at a time, so even SDXL (6.9 GB) needs only a few MB of memory.

The key names and shapes are those `models.ldm_writer.bundle_to_ldm_state_dict` gives for the
bundled config (modules built on the meta device, so nothing full-size is ever materialised);
values ~ N(0, 0.02) as in `handoff_models.full_size_random_bundle` (norm weights 1, so activations
stay in range for training), position ids 0..n-1. Both our loader and kohya's read the file.

    python bench/random_checkpoint.py sd1 /tmp/random-sd15.safetensors [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_ST = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}


def meta_state_dict(family: str) -> dict[str, torch.Tensor]:
    """LDM/SGM key -> tensor; meta tensors stand for random weights, real ones are real (schedules, ids)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.models.bundle import Family, ModelBundle
    from lora_trainer.models.ldm_config import ModelConfig
    from lora_trainer.models.ldm_writer import bundle_to_ldm_state_dict

    fam = Family(family)
    cfg = ModelConfig.bundled(fam)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg.unet)
        vae = AutoencoderKL(**cfg.vae)
        tes = []
        for i, spec in enumerate(cfg.text_encoders):
            tcfg = CLIPTextConfig(**{k: v for k, v in spec.config.items() if k not in ("architectures", "model_type")})
            tes.append((CLIPTextModelWithProjection if fam is Family.SDXL and i == 1 else CLIPTextModel)(tcfg))
    bundle = ModelBundle(fam, cfg.prediction_type, unet, vae, tes, [], cfg.schedule, cfg.scaling_factor)
    return bundle_to_ldm_state_dict(bundle)


def _value(key: str, t: torch.Tensor, device: str, gen: torch.Generator) -> torch.Tensor:
    if not t.is_meta:
        return t.to(torch.float16) if t.is_floating_point() else t
    if key.endswith("position_ids"):
        return torch.arange(t.shape[-1]).expand(t.shape).contiguous()
    if t.dim() == 1 and key.endswith(".weight"):  # every 1-D weight is a norm's scale
        return torch.ones(t.shape, dtype=torch.float16)
    x = torch.empty(t.shape, dtype=torch.float16, device=device)
    x.normal_(0.0, 0.02, generator=gen)
    return x.cpu()


def write_random_checkpoint(family: str, path: str | os.PathLike, *, device: str = "cpu", seed: int = 0) -> Path:
    """Stream a random full-size checkpoint of `family` ("sd1" or "sdxl") to `path` (atomic)."""
    path = Path(path)
    sd = meta_state_dict(family)
    header: dict[str, dict] = {}
    offset = 0
    for key, t in sd.items():
        dtype = torch.float16 if t.is_floating_point() else t.dtype
        n = t.numel() * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    gen = torch.Generator(device=device).manual_seed(seed)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key, t in sd.items():
            value = _value(key, t, device, gen)
            f.write(value.contiguous().view(torch.uint8).numpy().tobytes()
                    if value.dtype == torch.bfloat16 else value.contiguous().numpy().tobytes())
    os.replace(tmp, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", choices=["sd1", "sdxl"])
    p.add_argument("path")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is faster)")
    a = p.parse_args()
    t = time.perf_counter()
    out = write_random_checkpoint(a.family, a.path, device=a.device)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
