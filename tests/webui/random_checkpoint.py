"""Write a random, full-size SD1.5 / SDXL checkpoint in the LDM/SGM single-file layout, tensor by tensor.

For the live WebUI suites (Forge and Neo recognise models by their real shapes, so a tiny model will
not do): `python tests/webui/random_checkpoint.py sdxl <webui>/models/Stable-diffusion/sdxl-random.safetensors`.
Names and shapes come from our own bundled configs, built on the meta device and renamed by
`models.ldm_writer.bundle_to_ldm_state_dict` (the same layout A1111/Forge/Civitai files use); the values
are written straight into the safetensors file one tensor at a time, so an SDXL (3.5 B parameters,
6.9 GB in fp16) needs well under 1 GB of memory to write. Seeded and deterministic.

Initialisation: weights ~ N(0, gain^2/fan_in) (gain 0.5: bounded activations), biases and embeddings
~ N(0, 0.02^2), norm weights 1 + N(0, 0.02^2); nothing zero-initialised (that would hide LoRA effects);
the final LayerNorm biases get +0.1, since the WebUI's prompt emphasis divides by the embedding's mean.
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

_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def meta_state_dict(family: str) -> dict[str, torch.Tensor]:
    """The checkpoint's keys with meta tensors of the right shapes (no memory)."""
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
    # model parts only: the DDPM schedule buffers some SD1 files carry at the top level are not weights
    return {k: v for k, v in bundle_to_ldm_state_dict(bundle).items() if "." in k}


def _values(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if name.endswith("logit_scale"):
        return torch.tensor(4.6052)
    leaf = name.rsplit(".", 2)
    is_norm = any(s in name for s in ("norm", "ln_")) and not name.endswith("proj.weight")
    if len(shape) <= 1:
        if is_norm and name.endswith("weight"):
            return 1.0 + _randn(shape, g) * 0.02
        offset = 0.1 if name.endswith(("final_layer_norm.bias", "ln_final.bias")) else 0.0
        return _randn(shape, g) * 0.02 + offset
    if "embedding" in leaf[-2] or name.endswith(("positional_embedding", "token_embedding.weight")):
        return _randn(shape, g) * 0.02
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return _randn(shape, g) * (0.5 / fan_in**0.5)


def _randn(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device)


def write_random_checkpoint(family: str, path: str | os.PathLike, *, seed: int = 1234,
                            dtype: torch.dtype = torch.float16, device: str = "cpu") -> dict[str, int]:
    """Write the file atomically; returns {"tensors", "params", "bytes"}. `device="cuda"` draws the
    numbers on the GPU (seconds instead of minutes for SDXL; other values than the CPU's)."""
    meta = meta_state_dict(family)
    names = sorted(meta)
    header: dict[str, object] = {"__metadata__": {"format": "pt", "lora_trainer_random": f"{family} seed {seed}"}}
    offset = params = 0
    dtypes = {}
    for k in names:
        t = meta[k]
        dt = t.dtype if not t.is_floating_point() else dtype
        dtypes[k] = dt
        size = t.numel() * torch.empty(0, dtype=dt).element_size()
        header[k] = {"dtype": _ST[dt], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
        params += t.numel() if t.is_floating_point() else 0
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    g = torch.Generator(device=device).manual_seed(seed)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k in names:
            value = _values(k, tuple(meta[k].shape), g).to("cpu", dtypes[k]).contiguous()
            f.write(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    os.replace(tmp, path)
    return {"tensors": len(names), "params": params, "bytes": path.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", choices=["sd1", "sdxl"])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: much faster)")
    a = ap.parse_args(argv)
    t0 = time.time()
    facts = write_random_checkpoint(a.family, a.out, seed=a.seed, device=a.device)
    print(f"{a.out}: {facts['tensors']} tensors, {facts['params'] / 1e9:.2f} B params, "
          f"{facts['bytes'] / 2**30:.2f} GiB fp16, seed {a.seed}, {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
