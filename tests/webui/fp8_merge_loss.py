#!/usr/bin/env python3
"""How much of a Flux LoRA's transformer change is left when Forge merges it into fp8 weights:

    python tests/webui/fp8_merge_loss.py BASE_bf16.safetensors BASE-fp8_scaled.safetensors LORA.safetensors

Forge main and Neo (`backend/patcher/lora.py`, `merge_lora_to_weight`) apply a LoRA to weights stored in fp8
(with "Diffusion in Low Bits" not "(fp16 LoRA)") by widening the stored weight to fp32, adding the change
up @ down * alpha / rank and casting the sum back to fp8. For fp8 e4m3fn storage of a bf16 file that is
fp8(fp8(W) + dW); for an fp8_scaled file the change is added to the unscaled fp8 values q, which Forge
multiplies by `scale_weight` s at use: s * (fp8(q + dW) - q). Printed per module and over all of them:
|dW| / |W| and the merged change's error |merged - dW| / |dW| (0% = exact, 100% = nothing of the LoRA left).
The base files are those of the live Flux suite (shared/harness/neo/make_flux_random.py, flux_variants.py);
LORA is one of ours in kohya format (`lora_unet_<BFL module path with _>`).
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors import safe_open


def merge_errors(base: str, scaled: str, lora: str) -> list[tuple[str, float, float, float]]:
    """[(module, |dW|/|W|, fp8 merge error, fp8_scaled merge error)] for the LoRA's transformer modules."""
    rows = []
    with safe_open(lora, "pt") as fl, safe_open(base, "pt") as fb, safe_open(scaled, "pt") as fs:
        by_name = {k[: -len(".weight")].replace(".", "_"): k for k in fb.keys() if k.endswith(".weight")}  # noqa: SIM118 - safe_open is not iterable
        lora_keys = set(fl.keys())
        for m in sorted({k.split(".")[0] for k in lora_keys if k.startswith("lora_unet_")}):
            key = by_name[m[len("lora_unet_"):]]
            up, down = fl.get_tensor(f"{m}.lora_up.weight").float(), fl.get_tensor(f"{m}.lora_down.weight").float()
            rank = down.shape[0]
            alpha = fl.get_tensor(f"{m}.alpha").float().item() if f"{m}.alpha" in lora_keys else rank
            dw = (up @ down) * (alpha / rank)
            w = fb.get_tensor(key)
            q = w.to(torch.float8_e4m3fn).float()  # Forge's fp8 storage of the bf16 file
            merged = (q + dw).to(torch.float8_e4m3fn).float() - q
            qs, s = fs.get_tensor(key).float(), fs.get_tensor(key[: -len("weight")] + "scale_weight").float()
            merged_s = s * ((qs + dw).to(torch.float8_e4m3fn).float() - qs)
            norm = dw.norm()
            rows.append((key, float(norm / w.float().norm()), float((merged - dw).norm() / norm),
                         float((merged_s - dw).norm() / norm)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base")
    ap.add_argument("scaled")
    ap.add_argument("lora")
    a = ap.parse_args(argv)
    rows = merge_errors(a.base, a.scaled, a.lora)
    for key, rel, err, err_s in rows:
        print(f"{key}: |dW|/|W| {rel:.2%}; merged into fp8 {err:.1%} off; into fp8_scaled {err_s:.1%} off")
    rels = sorted(r[1] for r in rows)
    print(f"{len(rows)} transformer modules: |dW|/|W| median {rels[len(rels) // 2]:.2%}; merged change off by "
          f"{sum(r[2] for r in rows) / len(rows):.1%} (fp8) and {sum(r[3] for r in rows) / len(rows):.1%} "
          "(fp8_scaled), mean over modules")
    return 0


if __name__ == "__main__":
    sys.exit(main())
