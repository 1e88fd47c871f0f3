"""Prompt conditioning as each family's UNet was trained on it.

SD1/SD2: the last hidden state, or with clip skip N the N-th from last passed through the final
layer norm (A1111/kohya). SDXL: penultimate hidden states of both encoders concatenated, plus the
second encoder's pooled projection; size/crop conditioning goes in `time_ids`.
"""

from __future__ import annotations

import torch

from ..models.bundle import ModelBundle


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _final_layer_norm(encoder) -> torch.nn.Module:
    # transformers < 5 nests the layers under .text_model; 5.x puts them on the model itself.
    return getattr(encoder, "text_model", encoder).final_layer_norm


def encode_captions(bundle: ModelBundle, captions: list[str], *, clip_skip: int = 1,
                    device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled or None) for a batch of captions, on the encoders' device."""
    ids = [tokenize(tok, captions).to(device or next(enc.parameters()).device)
           for tok, enc in zip(bundle.tokenizers, bundle.text_encoders)]
    return encode_ids(bundle, ids, clip_skip=clip_skip)


def encode_ids(bundle: ModelBundle, input_ids: list[torch.Tensor], *,
               clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As encode_captions, from token ids already on the encoders' device (one tensor per encoder)."""
    if bundle.is_sdxl:
        hidden, pooled = [], None
        for i, (encoder, ids) in enumerate(zip(bundle.text_encoders, input_ids)):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if i == 1:
                pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        return torch.cat(hidden, dim=-1), pooled
    encoder = bundle.text_encoders[0]
    out = encoder(input_ids[0], output_hidden_states=clip_skip > 1)
    if clip_skip > 1:
        return _final_layer_norm(encoder)(out.hidden_states[-clip_skip]), None
    return out.last_hidden_state, None


def sdxl_time_ids(original_hw: tuple[int, int], crop_top_left: tuple[int, int],
                  target_hw: tuple[int, int]) -> torch.Tensor:
    """SDXL micro-conditioning vector: original size, crop offsets, target size (all (h, w))."""
    return torch.tensor([*original_hw, *crop_top_left, *target_hw], dtype=torch.float32)
