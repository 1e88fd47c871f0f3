#!/usr/bin/env python3
"""Write stored-format variants of a Flux transformer file, as users download them, for the live suites:

    python tests/webui/flux_variants.py SRC.safetensors --gguf Q8_0 [--fp8-scaled] [--chroma] [--out-dir DIR]

- `--gguf Q8_0|Q5_1|Q5_0|Q4_1|Q4_0`: `<stem>-<type>.gguf`, city96's layout (ComfyUI-GGUF, what Forge and Neo read):
  the BFL keys, every 2-D weight quantised to that type with the `gguf` package, 1-D tensors as F32,
  architecture "flux".
- `--fp8-scaled`: `<stem>-fp8_scaled.safetensors`, ComfyUI's scaled fp8: every Linear weight in
  float8_e4m3fn with a per-tensor `scale_weight`, plus the `scaled_fp8` marker.
- `--fp8`: `<stem>-fp8_e4m3fn.safetensors`, a plain cast of the Linear weights (the common fp8 download).
- `--nf4`: `<stem>-nf4.safetensors`, bitsandbytes nf4 as lllyasviel's flux1-dev-bnb-nf4-v2 stores it: every
  Linear weight quantised in blocks of 64 with fp32 absmax (no second-stage compression), its QuantState packed
  beside it (`.absmax`, `.quant_map`, `.quant_state.bitsandbytes__nf4`), what Forge and Neo detect as "nf4".
  Neo (huggingface_guess/detection.py) takes a file with `double_blocks.0.img_attn.proj.weight.quant_state.
  bitsandbytes__nf4` for the full flux1-dev-bnb-nf4 (19 + 38 blocks, no counting); otherwise it counts the blocks
  and reads the widths from the shapes of `img_in`, `txt_in` and `vector_in.in_layer` (packed nf4 shapes would
  read as 1). A model with fewer blocks (the live suites' 1 + 1) therefore keeps those four weights in their
  source dtype (4 of its 24 Linears). Neo does not quantise them when it reads the file:
  `ForgeLoader4Bit._load_from_state_dict` (backend/operations_bnb.py) holds each one as a `ForgeParams4bit` with
  `bnb_quantized=False`, in the computation dtype (fp32 on the CPU). `ForgeParams4bit.to` quantises it to nf4 only
  when Neo moves the model to CUDA (`ModelPatcher.load`, backend/patcher/base.py, at the first image), or a layer
  left offloaded at its first forward. On the CPU, Neo keeps them fp32, and a 4-bit forward of those layers fails.
  The live suite's test shim (tests/webui/neo_cpu_bnb.py) quantises them on the move to the CPU instead, so there too
  every Linear is nf4 from the first image on. Neo's "loaded completely; ... MB loaded" figure is taken before that
  move, so it counts them at their fp32 size. A Chroma file (`distilled_guidance_layer`) keeps the
  same weights unquantised at any depth: that nf4 marker sends it down the full FLUX.1-dev path whatever its keys,
  and the general path, which calls it Chroma, reads its widths from `img_in` and `txt_in` (`<stem>-nf4`, e.g.
  `chroma-random-nf4.safetensors` from the --chroma file).
- `--chroma`: `chroma-random.safetensors`, a random Chroma-architecture transformer (lodestones/Chroma's BFL keys) from
  a FLUX.1 file: its blocks and img_in/txt_in/final_layer.linear kept, the FLUX.1-only parts dropped (the per-block
  modulation Linears `*_mod.lin` / `modulation.lin`, `final_layer.adaLN_modulation`, `time_in`, `vector_in`,
  `guidance_in`) and Chroma's `distilled_guidance_layer` added, at the size Neo and Forge build it whatever the file
  (huggingface_guess: in 64, hidden 5120, 5 layers, out = the model width): random, N(0, gain^2/fan_in) weights
  (gain 0.5 on the residual outputs), N(0, 0.02^2) biases, RMSNorm `scale` 1 + N(0, 0.02^2), seed 0; in the
  source's dtype. Neo's detector calls it Chroma (`distilled_guidance_layer.norms.0.scale`).

Tensors are read and written one at a time (the source stays memory-mapped). Needs `gguf` for --gguf and
bitsandbytes (0.48 or later quantises on the CPU) for --nf4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _tensors(src: Path):
    with safe_open(str(src), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            yield key, f.get_tensor(key)


def _is_matrix(key: str, value: torch.Tensor) -> bool:
    return key.endswith(".weight") and value.dim() == 2


def write_gguf(src: Path, out: Path, qtype_name: str) -> Path:
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    writer = gguf.GGUFWriter(str(out), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in _tensors(src):
        data = value.float().numpy()
        if _is_matrix(key, value) and data.shape[-1] % block == 0:
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)  # shape from the bytes
        else:
            writer.add_tensor(key, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_fp8(src: Path, out: Path, *, scaled: bool) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _tensors(src):
        if _is_matrix(key, value):
            w = value.float()
            if scaled:
                scale = (w.abs().max() / 448.0).clamp(min=1e-12)
                tensors[key] = (w / scale).to(torch.float8_e4m3fn)
                tensors[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
            else:
                tensors[key] = w.clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            tensors[key] = value
    if scaled:
        tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out)
    return out


# the weights Neo's Flux detection reads (see the module docstring), kept unquantised in a model with < 19 blocks
NF4_READ_BY_NEO = ("double_blocks.0.img_attn.proj.weight", "img_in.weight", "txt_in.weight",
                   "vector_in.in_layer.weight")


def write_nf4(src: Path, out: Path) -> Path:
    from bitsandbytes.functional import quantize_4bit

    with safe_open(str(src), framework="pt", device="cpu") as f:
        keys = list(f.keys())
    doubles = {k.split(".")[1] for k in keys if k.startswith("double_blocks.")}
    chroma = any(k.startswith("distilled_guidance_layer.") for k in keys)
    keep = NF4_READ_BY_NEO if len(doubles) < 19 or chroma else ()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _tensors(src):
        if _is_matrix(key, value) and key not in keep:
            packed, state = quantize_4bit(value.contiguous(), blocksize=64, quant_type="nf4",
                                          compress_statistics=False)
            tensors[key] = packed
            tensors.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
        else:
            tensors[key] = value
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out)
    return out


FLUX_ONLY = ("time_in.", "vector_in.", "guidance_in.", "final_layer.adaLN_modulation.")
APPROXIMATOR = {"in_dim": 64, "hidden": 5120, "layers": 5}  # what Neo's and Forge's Chroma build (huggingface_guess)


def write_chroma(src: Path, out: Path, *, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _tensors(src):
        if key.startswith(FLUX_ONLY) or "_mod.lin." in key or ".modulation.lin." in key:
            continue
        tensors[key] = value
    dtype, width = tensors["img_in.weight"].dtype, tensors["img_in.weight"].shape[0]
    hidden, prefix = APPROXIMATOR["hidden"], "distilled_guidance_layer."

    def linear(name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        tensors[f"{prefix}{name}.weight"] = (torch.randn(n_out, n_in, generator=g) * gain / n_in**0.5).to(dtype)
        tensors[f"{prefix}{name}.bias"] = (torch.randn(n_out, generator=g) * 0.02).to(dtype)

    linear("in_proj", hidden, APPROXIMATOR["in_dim"])
    for i in range(APPROXIMATOR["layers"]):
        linear(f"layers.{i}.in_layer", hidden, hidden)
        linear(f"layers.{i}.out_layer", hidden, hidden, gain=0.5)
        tensors[f"{prefix}norms.{i}.scale"] = (1 + torch.randn(hidden, generator=g) * 0.02).to(dtype)
    linear("out_proj", width, hidden, gain=0.5)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out-dir", type=Path)
    ap.add_argument("--gguf", action="append", default=[], choices=["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"])
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--fp8-scaled", action="store_true")
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--chroma", action="store_true")
    a = ap.parse_args(argv)
    out_dir = a.out_dir or a.src.parent
    stem = a.src.stem
    for qtype in a.gguf:
        print(write_gguf(a.src, out_dir / f"{stem}-{qtype}.gguf", qtype))
    if a.fp8:
        print(write_fp8(a.src, out_dir / f"{stem}-fp8_e4m3fn.safetensors", scaled=False))
    if a.fp8_scaled:
        print(write_fp8(a.src, out_dir / f"{stem}-fp8_scaled.safetensors", scaled=True))
    if a.nf4:
        print(write_nf4(a.src, out_dir / f"{stem}-nf4.safetensors"))
    if a.chroma:
        print(write_chroma(a.src, out_dir / "chroma-random.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
