"""Which WD14 tagger to use: short name, Hugging Face repo id or local folder -> model files on disk.

A local folder (or the per-repo folder inside the cache, where users put files by hand) needs
`model.onnx` and `selected_tags.csv`. Otherwise both are fetched once with huggingface_hub into
the explicit tagger cache folder and found there offline afterwards.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import TaggerError

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_MODEL = "wd-swinv2-tagger-v3"

# Short names -> SmilingWolf's repos (dataset v3 first; v2 exports have a fixed batch of 1).
MODELS: dict[str, str] = {
    name: f"SmilingWolf/{name}"
    for name in (
        "wd-swinv2-tagger-v3", "wd-vit-tagger-v3", "wd-convnext-tagger-v3", "wd-vit-large-tagger-v3",
        "wd-eva02-large-tagger-v3", "wd-v1-4-moat-tagger-v2", "wd-v1-4-swinv2-tagger-v2",
        "wd-v1-4-convnextv2-tagger-v2", "wd-v1-4-vit-tagger-v2",
    )
}


@dataclass(frozen=True)
class ModelFiles:
    model: Path  # model.onnx
    tags: Path  # selected_tags.csv
    name: str  # what to show: the repo id or the folder


def default_cache_dir() -> Path:
    """Per-user cache folder (the WebUI extension passes its own instead)."""
    env = os.environ.get("LORA_TRAINER_TAGGER_CACHE")
    if env:
        return Path(env)
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lora_trainer" / "taggers"


def manual_folder(repo_id: str, cache_dir: Path) -> Path:
    """Where a user can put the two files by hand for `repo_id` (kohya's `owner_name` layout)."""
    return cache_dir / repo_id.replace("/", "_")


def _folder_files(folder: Path) -> ModelFiles | None:
    model, tags = folder / MODEL_FILE, folder / TAGS_FILE
    return ModelFiles(model, tags, str(folder)) if model.is_file() and tags.is_file() else None


def resolve_model(model: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                  *, endpoint: str | None = None, local_only: bool = False) -> ModelFiles:
    """Find or download the tagger's `model.onnx` and `selected_tags.csv`.

    `model`: a short name from MODELS, a Hub repo id (`owner/name`) or a local folder. Raise
    TaggerError naming both files and the folder to put them in when they cannot be had.
    """
    spec = str(model or DEFAULT_MODEL)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = Path(spec).expanduser()
    if folder.is_dir():
        files = _folder_files(folder)
        if files is None:
            raise TaggerError(f"Folder {folder} must hold {MODEL_FILE} and {TAGS_FILE}; "
                              "put both files of a WD14 tagger there or choose another --model.")
        return files
    repo_id = MODELS.get(spec, spec)
    if repo_id.count("/") != 1 or any(part in ("", ".", "..") for part in repo_id.split("/")):
        raise TaggerError(f"Tagger '{spec}' is neither a known name, a Hugging Face repo id nor an existing "
                          f"folder; use one of {', '.join(MODELS)} or a folder holding {MODEL_FILE} and {TAGS_FILE}.")
    by_hand = manual_folder(repo_id, cache)
    files = _folder_files(by_hand)
    if files is not None:
        return files
    return _download(repo_id, cache, by_hand, endpoint=endpoint, local_only=local_only)


def _download(repo_id: str, cache: Path, by_hand: Path, *, endpoint: str | None, local_only: bool) -> ModelFiles:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:  # a hard dependency, but the WebUI's environment could lack it
        raise _unavailable(repo_id, by_hand, "huggingface_hub is not installed") from e
    paths: dict[str, Path] = {}
    for filename in (MODEL_FILE, TAGS_FILE):
        try:  # the cached copy first: no network round trip once downloaded
            paths[filename] = Path(hf_hub_download(repo_id, filename, cache_dir=str(cache), local_files_only=True))
            continue
        except Exception:  # noqa: BLE001 - any miss means "not cached yet"
            if local_only:
                raise _unavailable(repo_id, by_hand, "not downloaded yet and downloads are off") from None
        log.info("downloading %s of %s into %s", filename, repo_id, cache)
        try:
            paths[filename] = Path(hf_hub_download(repo_id, filename, cache_dir=str(cache), endpoint=endpoint))
        except Exception as e:  # offline, DNS, HTTP, disk: all end in the same advice
            log.debug("download failed", exc_info=True)
            raise _unavailable(repo_id, by_hand, _short(e)) from e
    return ModelFiles(paths[MODEL_FILE], paths[TAGS_FILE], repo_id)


def _short(e: Exception) -> str:
    text = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _unavailable(repo_id: str, folder: Path, why: str) -> TaggerError:
    return TaggerError(
        f"The tagger {repo_id} could not be downloaded ({why}); download {MODEL_FILE} and {TAGS_FILE} "
        f"from https://huggingface.co/{repo_id} and put them in {folder} (or pass --model <folder with both files>)."
    )
