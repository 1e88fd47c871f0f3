"""Per-step caption processing in kohya's order.

1. whole-caption dropout (caption_dropout_rate) → ""
2. split on "," into tags; the first keep_tokens stay fixed in front
3. shuffle the other tags (shuffle_caption)
4. drop each of the other tags with caption_tag_dropout_rate
5. join with ", "
Uses Python's `random`, whose state is part of the resume state.
"""

from __future__ import annotations

import random


def process_caption(caption: str, *, shuffle: bool = False, keep_tokens: int = 0, caption_dropout_rate: float = 0.0,
                    tag_dropout_rate: float = 0.0, rng: random.Random | None = None) -> str:
    rng = rng or random._inst  # the module-level generator random.random() uses
    if caption_dropout_rate > 0 and rng.random() < caption_dropout_rate:
        return ""
    caption = caption.split("\n")[0]
    if not (shuffle or tag_dropout_rate > 0):
        return caption
    tokens = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = (tokens[:keep_tokens], tokens[keep_tokens:]) if keep_tokens > 0 else ([], tokens)
    if shuffle:
        rng.shuffle(flex)
    if tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= tag_dropout_rate]
    return ", ".join(fixed + flex)


def captions_are_static(shuffle: bool, caption_dropout_rate: float, tag_dropout_rate: float) -> bool:
    """True when every step sees the same caption for an image (text-encoder outputs can be cached)."""
    return not shuffle and caption_dropout_rate == 0 and tag_dropout_rate == 0
