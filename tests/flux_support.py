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
