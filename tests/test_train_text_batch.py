"""Text-encoder outputs are cached in batches (train/text_cache.py): each caption's conditioning must not
depend on the others in its batch (fixed-length padding, causal mask), so batching changes nothing."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.models.tiny import build_tiny_bundle
from lora_trainer.train.text import encode_captions


@pytest.mark.parametrize(("family", "clip_skip"), [("sd1", 1), ("sd1", 2), ("sdxl", 1)])
def test_batched_caption_encoding_equals_one_by_one(family, clip_skip):
    bundle = build_tiny_bundle(family)
    captions = ["a red circle", "shape, square, colour 3, a much longer caption with many more tags in it", ""]
    with torch.no_grad():
        hidden, pooled = encode_captions(bundle, captions, clip_skip=clip_skip)
        for k, caption in enumerate(captions):
            h1, p1 = encode_captions(bundle, [caption], clip_skip=clip_skip)
            torch.testing.assert_close(hidden[k], h1[0], rtol=1e-5, atol=1e-6)
            if pooled is not None:
                torch.testing.assert_close(pooled[k], p1[0], rtol=1e-5, atol=1e-6)
