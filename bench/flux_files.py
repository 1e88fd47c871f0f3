"""The random full-size Flux.1-dev files and the data for bench/flux_vs_kohya.py (also bench/flux_forge_models.py).

`write_models` draws the weights on the GPU (or CPU) and writes them tensor by tensor: the transformer in BFL layout
with its block Linear weights in float8_e4m3fn, CLIP-L fp16, T5-XXL with fp8 Linear weights, the autoencoder in
bf16; `make_dataset` the captioned pictures; `write_kohya_tokenizers` the CLIP and T5 tokenizer folders sd-scripts
reads from --tokenizer_cache_dir. `SIZES`: full size, a CPU smoke size, and full widths with one block of each kind.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent

SIZES = {
    # transformer blocks/width, T5 layers/width/ff/heads, CLIP layers/width, image side, images, steps
    "full": {"depth": 19, "single": 38, "hidden": 3072, "heads": 24, "t5_layers": 24, "t5_width": 4096,
             "t5_ff": 10240, "t5_heads": 64, "clip_layers": 12, "clip_width": 768, "res": 1024, "images": 8},
    "smoke": {"depth": 1, "single": 2, "hidden": 128, "heads": 2, "t5_layers": 1, "t5_width": 64, "t5_ff": 128,
              "t5_heads": 2, "clip_layers": 1, "clip_width": 64, "res": 64, "images": 3},
    # full widths, one block of each kind and one T5 layer: checks the files against kohya's loaders on a CPU
    "keys": {"depth": 1, "single": 1, "hidden": 3072, "heads": 24, "t5_layers": 1, "t5_width": 4096, "t5_ff": 10240,
             "t5_heads": 64, "clip_layers": 12, "clip_width": 768, "res": 64, "images": 2},
}
_ST = {"F16": 2, "BF16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8}


# ------------------------------------------------------------------------------------ weights
def meta_files(size: dict) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> {key: meta tensor} in the layouts users have (BFL transformer, transformers CLIP-L,
    T5 `encoder.*`/`shared.weight`, LDM-style ae)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_trainer.models.bundle import FLOW, Family, ModelBundle
    from lora_trainer.models.flux import FLUX_DEV, FluxTransformer
    from lora_trainer.models.flux.tiny import component_state_dicts
    from lora_trainer.models.ldm_config import bundled_config

    head = size["hidden"] // size["heads"]
    first = head // 8
    rest = (head - first) // 2
    params = FLUX_DEV.replace(depth=size["depth"], depth_single_blocks=size["single"], hidden_size=size["hidden"],
                              num_heads=size["heads"], axes_dim=(first, rest, head - first - rest),
                              vec_in_dim=size["clip_width"], context_in_dim=size["t5_width"])
    if size["hidden"] == 3072:
        params = FLUX_DEV.replace(depth=size["depth"], depth_single_blocks=size["single"])
    clip_cfg = bundled_config("clip_vit_l14")
    clip_cfg.update(hidden_size=size["clip_width"], intermediate_size=4 * size["clip_width"],
                    num_hidden_layers=size["clip_layers"], num_attention_heads=max(1, size["clip_width"] // 64),
                    projection_dim=size["clip_width"])
    t5_cfg = bundled_config("t5_xxl")
    t5_cfg.update(d_model=size["t5_width"], d_ff=size["t5_ff"], num_layers=size["t5_layers"],
                  num_decoder_layers=size["t5_layers"], num_heads=size["t5_heads"],
                  d_kv=size["t5_width"] // size["t5_heads"])
    vae_cfg = bundled_config("flux_vae")
    with torch.device("meta"):
        transformer = FluxTransformer(params)
        clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in clip_cfg.items()
                                               if k not in ("architectures", "model_type")}))
        t5 = T5EncoderModel(T5Config(**{k: v for k, v in t5_cfg.items() if k != "architectures"}))
        vae = AutoencoderKL(**{k: v for k, v in vae_cfg.items() if not k.startswith("_")})
    bundle = ModelBundle(Family.FLUX1, FLOW, transformer, vae, [clip, t5], [])
    parts = component_state_dicts(bundle)
    parts["t5"]["shared.weight"] = t5.shared.weight
    return {"flux1-dev-random-fp8.safetensors": parts["transformer"], "clip_l.safetensors": parts["clip_l"],
            "t5xxl_fp8_e4m3fn.safetensors": parts["t5"], "ae.safetensors": parts["vae"]}


def _dtype_for(file: str, key: str, t) -> str:
    import torch

    if t.dtype == torch.int64:
        return "I64"
    linear = t.dim() == 2 and key.endswith(".weight")
    if file.startswith("flux1") and linear and "_blocks." in key:
        return "F8_E4M3"
    if file.startswith("t5xxl") and linear and key.startswith("encoder.block."):
        return "F8_E4M3"
    if file.startswith("ae"):
        return "BF16"
    return "F16" if file.startswith(("clip", "t5")) else "BF16"


def _values(key: str, shape: tuple[int, ...], g) -> torch.Tensor:
    """Bounded random weights: N(0, (0.5^2)/fan_in) for matrices and kernels, 1 + N(0, 0.02^2) for norm
    scales, N(0, 0.02^2) for biases and embeddings (tests/webui/random_checkpoint.py's recipe)."""
    import torch

    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if len(shape) <= 1:
        norm = any(s in key for s in ("norm", "ln_", "scale", "layer_norm")) and not key.endswith("bias")
        return (1.0 if norm else 0.0) + torch.randn(shape, generator=g, device=g.device) * 0.02
    if "embed" in key or key == "shared.weight" or "relative_attention_bias" in key:
        return torch.randn(shape, generator=g, device=g.device) * 0.02
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=g, device=g.device) * (0.5 / fan_in ** 0.5)


def write_models(folder: Path, size: dict, device: str, seed: int = 1234) -> dict[str, str]:
    """The four files, written once (skipped when present with the same description)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    stamp = json.dumps({"size": size, "seed": seed}, sort_keys=True)
    paths = {}
    g = torch.Generator(device=device).manual_seed(seed)
    torch_dt = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64,
                "F8_E4M3": getattr(torch, "float8_e4m3fn", None)}
    for name, meta in meta_files(size).items():
        path = folder / name
        paths[name.split(".")[0]] = str(path)
        if path.is_file() and (folder / f"{name}.stamp").is_file() and (folder / f"{name}.stamp").read_text() == stamp:
            continue
        names = sorted(meta)
        header: dict = {"__metadata__": {"format": "pt", "lora_trainer_random": f"flux bench seed {seed}"}}
        offset = 0
        for k in names:
            dt = _dtype_for(name, k, meta[k])
            n = meta[k].numel() * _ST[dt]
            header[k] = {"dtype": dt, "shape": list(meta[k].shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for k in names:
                dt = torch_dt[header[k]["dtype"]]
                v = _values(k, tuple(meta[k].shape), g)
                if dt in (torch.float16, torch.bfloat16) or str(dt).startswith("torch.float8"):
                    v = v.clamp(-448, 448)
                v = v.to(dt).to("cpu").contiguous()
                f.write(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        os.replace(tmp, path)
        (folder / f"{name}.stamp").write_text(stamp)
    return paths


# ------------------------------------------------------------------------------------ data
def make_dataset(root: Path, side: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / "img" / "1_bench"
    if folder.is_dir() and len(list(folder.glob("*.png"))) == count:
        return root
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        yy, xx = np.mgrid[0:side, 0:side]
        img = (np.stack([xx * 255 // side, yy * 255 // side, np.full_like(xx, 40 * i)], -1)
               + rng.integers(0, 30, (side, side, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:03d}.png", compress_level=1)
        (folder / f"{i:03d}.txt").write_text(f"bench, a gradient picture number {i}", encoding="utf-8")
    return root


def write_kohya_tokenizers(folder: Path) -> None:
    """The CLIP and T5 tokenizer folders sd-scripts looks for in --tokenizer_cache_dir (no Hub)."""
    sys.path.insert(0, str(HERE))
    import gzip

    from e2e_vs_kohya import write_kohya_tokenizers as clip_folders

    from lora_trainer.models.flux.tokenizers import bundled_t5_tokenizer_file

    clip_folders(folder)
    # T5TokenizerFast files any transformers reads (save_pretrained of transformers 5 writes a config 4.x
    # cannot parse): the bundled tokenizer.json and the plain special tokens.
    t5 = folder / "google_t5-v1_1-xxl"
    t5.mkdir(parents=True, exist_ok=True)
    src = bundled_t5_tokenizer_file()
    data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
    (t5 / "tokenizer.json").write_bytes(data)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (t5 / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    (t5 / "tokenizer_config.json").write_text(json.dumps(dict(special, tokenizer_class="T5TokenizerFast",
                                                              model_max_length=512, extra_ids=100)), encoding="utf-8")
