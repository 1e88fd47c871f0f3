"""Caption files: encodings, atomic writes, tag helpers and bulk edits across a folder."""

from __future__ import annotations

import codecs
import logging
from pathlib import Path

import pytest

from lora_trainer.dataset import captions as cap
from lora_trainer.dataset.samples import gradient


def test_read_caption_utf8_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes(codecs.BOM_UTF8 + "1girl, café, 初音ミク\r\n".encode())
    assert cap.read_caption(p) == "1girl, café, 初音ミク"
    assert cap.read_caption_checked(p)[1] is None


@pytest.mark.parametrize(("text", "encoding"), [
    ("初音ミク, ロングヘア, 笑顔", "shift_jis"),
    ("café crème, naïve smile, façade", "cp1252"),
    ("1girl, sourire ☺", "utf-16"),
])
def test_read_caption_other_encodings_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           text: str, encoding: str) -> None:
    p = tmp_path / "a.txt"
    p.write_bytes(text.encode(encoding))
    with caplog.at_level(logging.WARNING):
        assert cap.read_caption(p) == text
    assert "a.txt" in caplog.text and "UTF-8" in caplog.text


def test_write_caption_atomic_utf8(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    cap.write_caption(p, "  hatsune miku (cosplay), ^_^ \n")
    assert p.read_bytes() == b"hatsune miku (cosplay), ^_^\n"
    cap.write_caption(p, "second")
    assert p.read_text(encoding="utf-8") == "second\n"
    assert [q.name for q in tmp_path.iterdir()] == ["x.txt"]  # no temp files left behind


def test_tag_helpers() -> None:
    assert cap.split_tags(" a, b ,,c\nd ") == ["a", "b", "c", "d"]
    assert cap.join_tags(["a", "b"]) == "a, b"
    assert cap.normalize_tag("Long_Hair") == cap.normalize_tag("long hair") == "long hair"
    assert cap.normalize_tag("^_^") == "^_^"  # kaomoji keep their underscores
    assert cap.normalize_tag("saber \\(fate\\)") == "saber (fate)"
    assert cap.unique_tags(["long hair", "Long_hair", "smile"]) == ["long hair", "smile"]
    assert cap.escape_prompt_tag("saber (fate)") == "saber \\(fate\\)"
    assert cap.escape_prompt_tag("saber \\(fate\\)") == "saber \\(fate\\)"  # not escaped twice


def test_tag_frequency() -> None:
    freq = cap.tag_frequency(["a, b, long_hair", "b, long hair, b", "c"])
    assert freq == {"b": 2, "long_hair": 2, "a": 1, "c": 1}
    assert list(freq) == ["b", "long_hair", "a", "c"]


def test_tag_list_edits() -> None:
    assert cap.add_tag(["a", "b"], "c") == ["a", "b", "c"]
    assert cap.add_tag(["a", "b"], "b") == ["a", "b"]
    assert cap.add_tag(["a", "b"], "b", first=True) == ["b", "a"]
    assert cap.remove_tag(["a", "long_hair", "b"], "long hair") == ["a", "b"]
    assert cap.replace_tag(["a", "b", "c"], "b", "x") == ["a", "x", "c"]
    assert cap.replace_tag(["a", "b", "x"], "b", "x") == ["a", "x"]  # no duplicate created


def test_bulk_edits_across_folder(tmp_path: Path) -> None:
    for i in range(3):
        gradient(8, 8, seed=i).save(tmp_path / f"{i}.png")
    (tmp_path / "0.txt").write_text("1girl, smile\n", encoding="utf-8")
    (tmp_path / "1.txt").write_text("smile, long_hair\n", encoding="utf-8")
    (tmp_path / "orphan.txt").write_text("not an image's caption\n", encoding="utf-8")
    added = cap.bulk_add_tag(tmp_path, "mychar", first=True)
    assert sorted(p.name for p in added.changed) == ["0.txt", "1.txt", "2.txt"]  # missing caption created
    assert (tmp_path / "2.txt").read_text(encoding="utf-8") == "mychar\n"
    assert cap.folder_tag_frequency(tmp_path) == {"mychar": 3, "smile": 2, "1girl": 1, "long_hair": 1}
    replaced = cap.bulk_replace_tag(tmp_path, "long hair", "short hair")
    assert [p.name for p in replaced.changed] == ["1.txt"]
    assert (tmp_path / "1.txt").read_text(encoding="utf-8") == "mychar, smile, short hair\n"
    removed = cap.bulk_remove_tag(tmp_path, "smile")
    assert sorted(p.name for p in removed.changed) == ["0.txt", "1.txt"]
    assert (tmp_path / "0.txt").read_text(encoding="utf-8") == "mychar, 1girl\n"
    assert (tmp_path / "orphan.txt").read_text(encoding="utf-8") == "not an image's caption\n"
