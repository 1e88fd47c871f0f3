"""Shared helpers for the Flux tests: skip reasons, a fixed set of inputs, running the transformer."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.models.flux import image_ids, text_ids


def diffusers_has_flux() -> bool:
    import diffusers

    return tuple(int(p) for p in diffusers.__version__.split(".")[:2]) >= (0, 30)


requires_flux_diffusers = pytest.mark.skipif(
    not diffusers_has_flux(), reason="Flux needs diffusers >= 0.30; this stack (A1111's 0.29.2) refuses Flux")


def inputs(params, seed: int = 1, tokens: int = 5, latent: int = 8, batch: int = 1) -> dict[str, torch.Tensor]:
    """Inputs of FluxTransformer.forward for a latent of latent x latent (packed to (latent/2)^2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = (latent // 2) ** 2
    return {
        "img": torch.randn(batch, n, params.in_channels, generator=g),
        "img_ids": image_ids(batch, latent, latent),
        "txt": torch.randn(batch, tokens, params.context_in_dim, generator=g),
        "txt_ids": text_ids(batch, tokens),
        "timesteps": torch.rand(batch, generator=g),
        "y": torch.randn(batch, params.vec_in_dim, generator=g),
        "guidance": torch.full((batch,), 3.5) if params.guidance_embed else None,
    }


def run(transformer, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**x)


def run_diffusers(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same inputs through diffusers' FluxTransformer2DModel (2-d ids, as diffusers >= 0.31 takes them)."""
    with torch.no_grad():
        return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                     timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                     guidance=x["guidance"], return_dict=False)[0]


# ---------------------------------------------------------------- training on tiny Flux-family models
# Settings of the tiny Flux/Chroma training tests: 64 px in 32 px buckets, a short T5.
TINY_TRAIN = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
              "learning_rate": 2e-3, "t5_max_token_length": 32}


def flux_config(data, out, **kw):
    """`tiny_config` with the tiny Flux-family settings (`kw` wins)."""
    from train_support import tiny_config

    return tiny_config(data, out, **{**TINY_TRAIN, **kw})


def two_bucket_data(tmp_path_factory, name: str):
    """Two captioned pictures in two buckets (64x64, 96x64), 2 repeats."""
    from train_support import make_dataset

    return make_dataset(tmp_path_factory.mktemp(name), n=2, repeats=2, sizes=[(64, 64), (96, 64)])


def check_lora_learns(tmp_path, variant: str, config_fn, encode, eval_loss) -> None:
    """A rank-8 LoRA trained 2 epochs on 2 pictures x 10 repeats lowers the model's loss on them by 20%:
    `encode(bundle, config, dataset)` gives each picture's text conditioning, `eval_loss(bundle, latents,
    conds)` the loss with the weights the bundle has (before training, then with the LoRA loaded back)."""
    from train_support import make_dataset

    from lora_trainer.lora import LoraSpec, inject_lora, load_kohya_file
    from lora_trainer.models.flux.tiny import build_tiny_flux_bundle
    from lora_trainer.train import run_training
    from lora_trainer.train.cache import cache_latents
    from lora_trainer.train.engine import prepare_dataset

    data = make_dataset(tmp_path / "d", n=2, repeats=10)
    bundle = build_tiny_flux_bundle(variant, seed=4)
    config = config_fn(data, tmp_path / "o", rank=8, alpha=8.0, learning_rate=4e-3, epochs=2, batch_size=2,
                       timestep_sampling="uniform")
    dataset, _ = prepare_dataset(config)
    latents = [c.latent for c in cache_latents(dataset, bundle.vae, bundle.scaling_factor, flip=False, seed=1,
                                               shift_factor=bundle.shift_factor)]
    conds = encode(bundle, config, dataset)
    before = eval_loss(bundle, latents, conds)
    result = run_training(config, bundle=bundle)
    assert result.steps == 20
    tensors, _ = load_kohya_file(result.lora_path)
    network = inject_lora(bundle, LoraSpec.from_kohya_state_dict(tensors))
    network.load_kohya_state_dict(tensors, strict=True)
    after = eval_loss(bundle, latents, conds)
    network.remove()
    assert after < 0.8 * before, (before, after)
