"""Finding tagger files: local folders, the by-hand folder in the cache, and download failures.

No Hub here: downloads fail for real (offline mode from conftest, local_files_only, or a closed
localhost port as the endpoint); the test checks the one message users get.
"""

from __future__ import annotations

import time
from pathlib import Path

import huggingface_hub
import pytest

from lora_trainer.errors import TaggerError
from lora_trainer.tagger.demo_model import write_demo_tagger
from lora_trainer.tagger.registry import DEFAULT_MODEL, MODELS, manual_folder, resolve_model


def _assert_advice(err: TaggerError, folder: Path) -> None:
    text = str(err)
    assert "model.onnx" in text and "selected_tags.csv" in text and str(folder) in text
    assert "\n" not in text


def test_registry_names() -> None:
    assert DEFAULT_MODEL == "wd-swinv2-tagger-v3"
    assert MODELS["wd-swinv2-tagger-v3"] == "SmilingWolf/wd-swinv2-tagger-v3"
    assert {"wd-eva02-large-tagger-v3", "wd-v1-4-moat-tagger-v2", "wd-v1-4-vit-tagger-v2"} <= set(MODELS)
    assert len(MODELS) == 9


def test_local_folder(tmp_path: Path) -> None:
    folder = write_demo_tagger(tmp_path / "t")
    files = resolve_model(folder)
    assert files.model == folder / "model.onnx" and files.tags == folder / "selected_tags.csv"
    (folder / "selected_tags.csv").unlink()
    with pytest.raises(TaggerError) as err:
        resolve_model(folder)
    _assert_advice(err.value, folder)


def test_files_put_by_hand_in_cache_are_used(tmp_path: Path) -> None:
    by_hand = manual_folder("SmilingWolf/wd-vit-tagger-v3", tmp_path)
    write_demo_tagger(by_hand)
    assert resolve_model("wd-vit-tagger-v3", tmp_path).model == by_hand / "model.onnx"
    assert resolve_model("SmilingWolf/wd-vit-tagger-v3", tmp_path).tags == by_hand / "selected_tags.csv"


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(TaggerError, match="neither a known name"):
        resolve_model("not-a-tagger", tmp_path)


@pytest.mark.parametrize("how", ["offline_env", "local_only"])
def test_download_failure_message(tmp_path: Path, how: str) -> None:
    with pytest.raises(TaggerError) as err:
        resolve_model("wd-convnext-tagger-v3", tmp_path, local_only=how == "local_only")
    _assert_advice(err.value, tmp_path / "SmilingWolf_wd-convnext-tagger-v3")


@pytest.mark.skipif(int(huggingface_hub.__version__.split(".")[0]) >= 1,
                    reason="huggingface_hub 1.x retries a refused connection 5 times with backoff (~25 s)")
def test_download_failure_closed_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest turned it on
    start = time.monotonic()
    with pytest.raises(TaggerError) as err:
        resolve_model("SmilingWolf/wd-vit-tagger-v3", tmp_path, endpoint="http://127.0.0.1:9")
    _assert_advice(err.value, tmp_path / "SmilingWolf_wd-vit-tagger-v3")
    assert time.monotonic() - start < 60
