"""GPU check of the Forge model hand-off (no Forge needed): zero-copy aliasing, training, bit-identity.

Builds a full-size random SD1.5 / SDXL model laid out as Forge 2.x holds it on a GPU (LDM-named
UNet and VAE, HF CLIP under clip_l/clip_g; every weight an inference tensor; UNet and CLIP fp16,
VAE bf16), using the Forge-shaped stand-ins of tests/test_webui_forge.py. Then measures what
`ForgeHost` does around a run: the fingerprint (hash) of Forge's weights, `bundle_from_forge`
(must allocate ~0 bytes of VRAM), a short real training run on the aliases (512 px / 1024 px,
mixed precision), and checks Forge's weights are bit-identical and still the same tensors.

    python bench/forge_handoff.py --family sd1 --family sdxl --out bench/results/forge_handoff.json
    python bench/forge_handoff.py --tiny --device cpu          # smoke test on the CPU (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from handoff_models import full_size_random_bundle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def run(family: str, device: str, tiny: bool, steps: int) -> dict:
    from test_webui_forge import GUESS_REAL, forge_tensors, make_forge_model
    from train_support import make_dataset, tiny_config

    from lora_trainer.models.bundle import Family
    from lora_trainer.train import run_training
    from lora_trainer.webui import forge_model
    from lora_trainer.webui.common import tensor_fingerprint

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    fam = Family(family)
    if tiny:
        sd_model, _ = make_forge_model(fam, device=device, unet_dtype=half, clip_dtype=half)
        resolution = 64
    else:
        ref = full_size_random_bundle(family)
        guess = GUESS_REAL["sdxl" if fam is Family.SDXL else "sd15"][1]
        sd_model, _ = make_forge_model(fam, ref=ref, guess=guess, device=device, unet_dtype=half, clip_dtype=half,
                                       vae_dtype=torch.bfloat16 if cuda else torch.float32)
        del ref
        resolution = 1024 if fam is Family.SDXL else 512
    before = forge_tensors(sd_model)
    if cuda:
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    fp = tensor_fingerprint(before)
    t_hash = time.perf_counter() - t0
    t0 = time.perf_counter()
    bundle = forge_model.bundle_from_forge(sd_model, device=dev, name=f"forge-{family}")
    t_bundle = time.perf_counter() - t0
    extra = (torch.cuda.memory_allocated(dev) - mem0) if cuda else None
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", n=4, repeats=1, sizes=[(resolution, resolution)] * 4)
        config = tiny_config(data, Path(tmp) / "out", resolution=resolution, max_steps=steps, rank=16, alpha=8.0,
                             device=device, mixed_precision="fp16" if cuda else "no", save_state=False,
                             train_text_encoder=fam is not Family.SDXL, save_precision="fp16")
        t0 = time.perf_counter()
        result = run_training(config, bundle=bundle)
        t_train = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if cuda else None
        losses = [float(x) for x in result.losses]
    after = forge_tensors(sd_model)
    changed = [k for k, h in tensor_fingerprint(after).items() if fp.get(k) != h]
    same_objects = all(after[k] is before[k] and after[k].is_inference() for k in before)
    shared = {t.untyped_storage().data_ptr() for t in after.values()}
    unet_shared = all(p.untyped_storage().data_ptr() in shared for p in bundle.unet.parameters()
                      if p.dtype == half)
    return {
        "family": family, "tiny": tiny, "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
        "torch": torch.__version__, "forge_weights": len(before),
        "hash_s": round(t_hash, 3), "bundle_s": round(t_bundle, 3),
        "bundle_extra_vram_bytes": extra, "train_steps": steps, "train_s": round(t_train, 2),
        "peak_vram_bytes": peak, "losses": losses,
        "forge_weights_changed": len(changed), "same_tensor_objects": same_objects,
        "unet_aliases_forge_storage": unet_shared,
        "ok": not changed and same_objects and (extra is None or extra < 64 * 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", action="append", choices=["sd1", "sdxl"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    results = [run(f, args.device, args.tiny, args.steps) for f in (args.family or ["sd1"])]
    text = json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    sys.exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
