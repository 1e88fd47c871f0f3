"""FLUX.1 (dev, schnell): the BFL-layout transformer, loading, detection, tokenizers, tiny models."""

from .model import (
           FLUX_DEV,
           FLUX_SCHNELL,
           FluxParams,
           FluxTransformer,
           image_ids,
           pack_latents,
           text_ids,
           unpack_latents,
)

__all__ = ["FLUX_DEV", "FLUX_SCHNELL", "FluxParams", "FluxTransformer", "image_ids", "pack_latents", "text_ids",
           "unpack_latents"]
