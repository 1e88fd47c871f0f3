"""CLIP tokenizers built from the BPE files shipped in this package (no Hub access).

vocab.json/merges.txt are derived from OpenAI's bpe_simple_vocab_16e6 (the file open-clip-torch
ships); SD1's CLIP-L and the OpenCLIP encoders of SD2/SDXL share that vocabulary and differ only in
the padding token.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

# SD1 / SDXL text_encoder pad with <|endoftext|>; OpenCLIP (SD2, SDXL text_encoder_2) pads with "!".
PAD_ENDOFTEXT = "<|endoftext|>"
PAD_EXCLAMATION = "!"


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = PAD_ENDOFTEXT) -> CLIPTokenizer:
    folder = resources.files("lora_trainer.models") / "tokenizer"
    with resources.as_file(folder) as path:
        return CLIPTokenizer(
            vocab_file=str(path / "vocab.json"),
            merges_file=str(path / "merges.txt"),
            pad_token=pad_token,
            model_max_length=77,
        )
