"""Flux's tokenizers without network access: CLIP-L (the package's BPE files, see
models/tokenizers.py) and T5-XXL.

The T5 tokenizer ships with the package (`tokenizer_t5/tokenizer.json.gz`): google/t5-v1_1-xxl's
SentencePiece unigram vocabulary (Apache-2.0) as FLUX.1's `tokenizer_2`, taken from the
`diffsynth` 1.1.9 wheel on PyPI (diffsynth/tokenizer_configs/flux/tokenizer_2/tokenizer.json) and
written in the tokenizers format every supported `tokenizers` version reads. When that file is
missing, a host's or the Hugging Face cache's copy is used; the error lists every place tried.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ...errors import UnsupportedModelError
from ..tokenizers import PAD_ENDOFTEXT, clip_tokenizer

log = logging.getLogger(__name__)

T5_MAX_LENGTH = 512  # dev; kohya trains schnell with 256
CLIP_MAX_LENGTH = 77

# Where hosts and the HF cache keep FLUX.1's T5 tokenizer (relative to their roots).
_HOST_DIRS = (
    "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2",  # Forge, Forge Neo
    "backend/huggingface/black-forest-labs/FLUX.1-schnell/tokenizer_2",
    "comfy/text_encoders/t5_tokenizer",  # ComfyUI
)
_HUB_REPOS = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell", "google/t5-v1_1-xxl")


def flux_clip_tokenizer() -> Any:
    return clip_tokenizer(PAD_ENDOFTEXT)


def bundled_t5_tokenizer_file() -> Path:
    """The package's copy of FLUX.1's T5 tokenizer (tokenizers JSON, gzip)."""
    return Path(str(resources.files("lora_trainer.models.flux") / "tokenizer_t5" / "tokenizer.json.gz"))


def _candidates(folder: str | os.PathLike | None, host_roots: Iterable[str | os.PathLike]) -> list[Path]:
    places: list[Path] = []
    if folder is not None:
        places.append(Path(folder))
    places.append(bundled_t5_tokenizer_file().parent)
    for root in host_roots:
        places += [Path(root) / d for d in _HOST_DIRS]
    places += _hub_cache_dirs()
    return places


def _hub_cache_dirs() -> list[Path]:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # very old hub
        from huggingface_hub.constants import HUGGINGFACE_HUB_CACHE as HF_HUB_CACHE
    out = []
    for repo in _HUB_REPOS:
        snapshots = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
        sub = "" if repo.startswith("google/") else "tokenizer_2"
        out += [p / sub for p in sorted(snapshots.glob("*"))] if snapshots.is_dir() else [snapshots / "*" / sub]
    return out


def _read(place: Path) -> Any | None:
    """A tokenizers.Tokenizer from a folder or file holding tokenizer.json(.gz) or spiece.model."""
    import tokenizers

    files = [place] if place.is_file() else [place / "tokenizer.json.gz", place / "tokenizer.json",
                                               place / "spiece.model"]
    for f in files:
        if not f.is_file():
            continue
        if f.name.endswith(".gz"):
            return tokenizers.Tokenizer.from_str(gzip.decompress(f.read_bytes()).decode("utf-8"))
        if f.suffix == ".json":
            return tokenizers.Tokenizer.from_file(str(f))
        return _from_spiece(f)
    return None


def _from_spiece(path: Path) -> Any | None:
    """spiece.model through transformers' converter (needs sentencepiece and protobuf)."""
    try:
        from transformers import T5Tokenizer
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        return convert_slow_tokenizer(T5Tokenizer(str(path), legacy=True))
    except Exception as exc:  # noqa: BLE001 - ImportError (sentencepiece) or the converter's own errors
        log.warning("Cannot read %s (%s); looking further.", path, exc)
        return None


@lru_cache(maxsize=8)
def _t5_tokenizer(folder: str | None, host_roots: tuple[str, ...], max_length: int) -> Any:
    from transformers import T5TokenizerFast

    places = _candidates(folder, host_roots)
    for place in places:
        tok = _read(place) if place.exists() else None
        if tok is not None:
            log.debug("T5 tokenizer from %s", place)
            # transformers 5's T5TokenizerFast is T5Tokenizer (tokenizers-backed); both take the object.
            return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   extra_ids=100, model_max_length=max_length)
    raise UnsupportedModelError(
        "No T5-XXL tokenizer was found (looked in: " + ", ".join(str(p) for p in places) + "); reinstall LoRA "
        "Trainer, or put FLUX.1's tokenizer_2 files (tokenizer.json or spiece.model) in a folder and pass it "
        "as the T5 tokenizer.")


def t5_tokenizer(folder: str | os.PathLike | None = None, *, host_roots: Iterable[str | os.PathLike] = (),
                 max_length: int = T5_MAX_LENGTH) -> Any:
    """The T5-XXL tokenizer (fast). Looked for in `folder` (tokenizer.json or spiece.model), the
    package, `host_roots` (a Forge or ComfyUI install), then the Hugging Face cache."""
    return _t5_tokenizer(None if folder is None else str(folder), tuple(str(r) for r in host_roots), max_length)
