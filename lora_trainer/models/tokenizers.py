"""CLIP tokenizers built from the BPE files shipped in this package (no Hub access).

vocab.json/merges.txt are derived from OpenAI's bpe_simple_vocab_16e6 (the file open-clip-torch
ships); SD1's CLIP-L and the OpenCLIP encoders of SD2/SDXL share that vocabulary and differ only in
the padding token.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from importlib import resources
from typing import Any

from transformers import CLIPTokenizerFast

# SD1 / SDXL text_encoder pad with <|endoftext|>; OpenCLIP (SD2, SDXL text_encoder_2) pads with "!".
PAD_ENDOFTEXT = "<|endoftext|>"
PAD_EXCLAMATION = "!"


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = PAD_ENDOFTEXT) -> Any:
    """The fast (tokenizers-backed) CLIP tokenizer.

    Fast on purpose: its ids equal open_clip's SimpleTokenizer and A1111's slow tokenizer with ftfy
    on every transformers version, while the slow one without ftfy splits punctuation and strips
    accents differently. transformers 5 renamed the file arguments (vocab/merges) and ignores
    vocab_file/merges_file, which would leave an empty vocabulary.
    """
    folder = resources.files("lora_trainer.models") / "tokenizer"
    with resources.as_file(folder) as path:
        params = inspect.signature(CLIPTokenizerFast.__init__).parameters
        if "vocab" in params:
            files = {"vocab": str(path / "vocab.json"), "merges": str(path / "merges.txt")}
        else:
            files = {"vocab_file": str(path / "vocab.json"), "merges_file": str(path / "merges.txt")}
        return CLIPTokenizerFast(**files, pad_token=pad_token, model_max_length=77)
