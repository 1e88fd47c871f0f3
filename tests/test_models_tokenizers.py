"""The bundled CLIP tokenizer gives the real CLIP ids on every transformers version."""

from __future__ import annotations

import pytest

from lora_trainer.models.tokenizers import PAD_ENDOFTEXT, PAD_EXCLAMATION, clip_tokenizer

# Ids of openai/clip-vit-large-patch14 / open_clip's SimpleTokenizer (and A1111's tokenizer).
KNOWN = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "masterpiece, best quality, 1girl, (red hair:1.2), <lora:x:0.8>": [
        49406, 12066, 267, 949, 3027, 267, 272, 1611, 267, 263, 736, 2225, 281, 272, 269, 273, 2361, 283, 2179,
        320, 281, 343, 281, 271, 269, 279, 285, 49407],
    "Ünïcödé naïve café — 東京 🚀": [
        49406, 6522, 77, 35689, 66, 7255, 67, 4166, 1097, 35689, 563, 15304, 2005, 48338, 21078, 361, 13542, 49407],
    "A PHOTO, OF\nA CAT's   dog": [49406, 320, 1125, 267, 539, 320, 2368, 568, 1929, 49407],
}


@pytest.mark.parametrize("pad", [PAD_ENDOFTEXT, PAD_EXCLAMATION])
@pytest.mark.parametrize("text", list(KNOWN))
def test_known_ids(text, pad):
    assert clip_tokenizer(pad)(text)["input_ids"] == KNOWN[text]


def test_padding_tokens():
    assert clip_tokenizer(PAD_ENDOFTEXT)("a cat", padding="max_length", max_length=6)["input_ids"] == [
        49406, 320, 2368, 49407, 49407, 49407]
    assert clip_tokenizer(PAD_EXCLAMATION)("a cat", padding="max_length", max_length=6)["input_ids"] == [
        49406, 320, 2368, 49407, 0, 0]
    assert clip_tokenizer().model_max_length == 77 and len(clip_tokenizer()) == 49408
