"""Move a VAE between the shipped demo checkpoint and `demo_pretrain.py`'s parts.

    python bench/demo_vae_swap.py export CHECKPOINT PARTS_DIR        # its VAE -> PARTS_DIR/vae.safetensors
        [--variant NAME]     # and its UNet and text encoder -> PARTS_DIR/NAME-{unet,te}.safetensors
    python bench/demo_vae_swap.py swap CHECKPOINT VAE OUT_DIR         # CHECKPOINT with VAE's weights -> OUT_DIR

`export` gives `demo_pretrain.py --stage decoder --init PARTS_DIR` the shipped VAE to continue from
(with `--variant`, `--stage denoisers --init PARTS_DIR` the shipped denoiser too);
`swap` writes the checkpoint again (same UNet, text encoder, yaml and metadata) with the fine-tuned
decoder. The latent scale must stay the same: a decoder fine-tune leaves the encoder, hence the
latents the denoisers learned, as they were.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    from demo_assemble import write_checkpoint
    from demo_vae import VAE_CONFIG, load_part, save_part
    from safetensors import safe_open

    from lora_trainer.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("checkpoint")
    e.add_argument("parts")
    e.add_argument("--variant", help="also export the UNet and text encoder under this name (demo_pretrain.VARIANTS)")
    s = sub.add_parser("swap")
    s.add_argument("checkpoint")
    s.add_argument("vae")
    s.add_argument("out")
    args = p.parse_args(argv)
    bundle = load_model(Path(args.checkpoint), dtype=torch.float32)
    scale = float(bundle.scaling_factor)
    if args.cmd == "export":
        Path(args.parts).mkdir(parents=True, exist_ok=True)
        save_part(Path(args.parts) / "vae.safetensors", bundle.vae, {**VAE_CONFIG, "scaling_factor": scale}, "vae")
        if args.variant:
            from demo_pretrain import VARIANTS

            spec = VARIANTS[args.variant]
            save_part(Path(args.parts) / f"{args.variant}-unet.safetensors", bundle.unet, spec["unet"], "unet")
            save_part(Path(args.parts) / f"{args.variant}-te.safetensors", bundle.text_encoders[0], spec["text"], "text")
        return 0
    sd, cfg = load_part(Path(args.vae))
    if abs(float(cfg["scaling_factor"]) - scale) > 1e-9:
        p.error(f"the VAE's latent scale {cfg['scaling_factor']} is not the checkpoint's {scale}")
    bundle.vae.load_state_dict(sd)
    with safe_open(args.checkpoint, "pt") as f:
        metadata = f.metadata() or {}
    stem = Path(args.checkpoint).stem
    print(write_checkpoint(bundle, Path(args.out), stem, metadata=metadata))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
