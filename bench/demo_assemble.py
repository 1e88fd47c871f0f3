"""Turn the parts `pretrain.py` writes into a single-file SD1 checkpoint in the A1111/LDM layout.

    python -m lora_trainer.demo.assemble PARTS_DIR VARIANT OUT_DIR

Writes `OUT_DIR/VARIANT.safetensors` (fp16), the same-named `.yaml` (sizes, `scale_factor`, SD1's
schedule) and `OUT_DIR/VARIANT-text/text_encoder/config.json`, which the yaml names by a path
relative to itself, so the folder can move (it ships inside the package).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lora_trainer.models.bundle import ModelBundle


def load_parts(parts: Path, variant: str) -> ModelBundle:
    from demo_pretrain import bundle_of
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    def read(name: str) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(str(parts / name), "pt") as f:
            config = json.loads(f.metadata()["config"])
            return {k: f.get_tensor(k).float() for k in f.keys()}, config  # noqa: SIM118 (no dict)

    vae_sd, vae_cfg = read("vae.safetensors")
    scale = float(vae_cfg.pop("scaling_factor"))
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(vae_sd)
    unet_sd, unet_cfg = read(f"{variant}-unet.safetensors")
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(unet_sd)
    te_sd, te_cfg = read(f"{variant}-te.safetensors")
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    missing, unexpected = te.load_state_dict(te_sd, strict=False)
    if [k for k in missing if "position_ids" not in k] or unexpected:
        raise ValueError(f"text encoder keys do not match: missing {missing}, unexpected {unexpected}")
    for m in (vae, unet, te):
        m.eval().requires_grad_(False)
    bundle = bundle_of(unet, vae, te, scale)
    bundle.name = variant
    return bundle


def write_checkpoint(bundle: ModelBundle, out: Path, name: str, *, metadata: dict[str, str] | None = None) -> Path:
    import yaml

    from lora_trainer.models.ldm_writer import (
        _text_folder_config,
        atomic_write_text,
        bundle_to_ldm_state_dict,
        ldm_yaml,
        save_state_dict,
    )

    out.mkdir(parents=True, exist_ok=True)
    text_dir = out / f"{name}-text" / "text_encoder"
    text_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(text_dir / "config.json",
                      json.dumps(_text_folder_config(bundle.text_encoders[0]), indent=2) + "\n")
    sd = {k: (v.to(torch.float16) if v.is_floating_point() else v)
          for k, v in bundle_to_ldm_state_dict(bundle).items()}
    path = out / f"{name}.safetensors"
    save_state_dict(sd, path, "safetensors", metadata=metadata or {})
    config = ldm_yaml(bundle, [text_dir])
    # relative to the yaml, so the model folder can live anywhere (the loader looks beside the yaml)
    config["model"]["params"]["cond_stage_config"]["params"]["version"] = f"{name}-text/text_encoder"
    atomic_write_text(path.with_suffix(".yaml"), yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts")
    p.add_argument("variant")
    p.add_argument("out")
    args = p.parse_args(argv)
    bundle = load_parts(Path(args.parts), args.variant)
    path = write_checkpoint(bundle, Path(args.out), args.variant, metadata={
        "lora_trainer": f"{args.variant}: SD1-architecture model pretrained from scratch on synthetic shapes "
                        "(lora_trainer.demo.pretrain)", "license": "CC0-1.0"})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
