"""Bad paths for `tag` and `prepare`: one line, exit 2, no traceback, and nothing written or lost.
(`train`'s output paths: test_outputs.py.) Read-only folders run as real processes under
`unprivileged_prefix()`, because root ignores permission bits."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest
from process_support import run_cli, unprivileged_prefix

from lora_trainer.cli import main
from lora_trainer.dataset.prepare import MANIFEST
from lora_trainer.dataset.samples import gradient


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(3):
        gradient(64, 64, seed=i).save(src / f"p{i}.png")
    return src


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    from lora_trainer.tagger.demo_model import write_demo_tagger

    return write_demo_tagger(tmp_path_factory.mktemp("tagger"))


def _refused(argv, words, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_prepare_out_is_a_file_or_under_one(photos, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    _refused(["prepare", str(photos), "--out", str(a_file), "--concept", "x"], "is a file, not a folder", capsys)
    _refused(["prepare", str(photos), "--out", str(a_file / "ds"), "--concept", "x"],
             f"cannot be created because {a_file} is a file", capsys)
    assert a_file.read_text() == "mine"


def test_prepare_keeps_the_users_dataset_json_and_files(photos, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / MANIFEST).write_text('{"my": "notes"}\n')
    _refused(["prepare", str(photos), "--out", str(out), "--concept", "x", "--repeats", "2"],
             "dataset.json exists and was not written by prepare", capsys)
    assert (out / MANIFEST).read_text() == '{"my": "notes"}\n' and not (out / "img").exists()
    assert main(["prepare", str(photos), "--out", str(out), "--concept", "x", "--repeats", "2", "--overwrite"]) == 0
    assert json.loads((out / MANIFEST).read_text())["generator"] == "lora_trainer prepare"
    # a file of the user's own where a copy would go (not listed by our dataset.json) is kept
    other = tmp_path / "ds2"
    (other / "img" / "2_x").mkdir(parents=True)
    gradient(64, 64, seed=99).save(other / "img" / "2_x" / "p1.png")
    before = (other / "img" / "2_x" / "p1.png").read_bytes()
    _refused(["prepare", str(photos), "--out", str(other), "--concept", "x", "--repeats", "2"],
             "p1.png exists and was not written by prepare", capsys)
    assert (other / "img" / "2_x" / "p1.png").read_bytes() == before
    assert sorted(p.name for p in (other / "img" / "2_x").iterdir()) == ["p1.png"]  # nothing half-written
    # the same bytes already there: nothing to protect, so no refusal
    (other / "img" / "2_x" / "p1.png").write_bytes((photos / "p1.png").read_bytes())
    assert main(["prepare", str(photos), "--out", str(other), "--concept", "x", "--repeats", "2"]) == 0


def test_tag_report_paths(photos, tagger, tmp_path, capsys):
    argv = ["tag", str(photos), "--model", str(tagger), "--offline", "--report"]
    _refused([*argv, str(tmp_path)], "is a folder; give a file name", capsys)
    missing = tmp_path / "missing" / "dir" / "x.json"
    _refused([*argv, str(missing)], "does not exist; create it first", capsys)
    assert not (tmp_path / "missing").exists()  # no folders made behind the user's back
    assert not list(photos.glob("*.txt"))  # refused before any caption was written
    assert main([*argv, str(tmp_path / "report.json")]) == 0
    assert len(list(photos.glob("*.txt"))) == 3 and (tmp_path / "report.json").is_file()


@pytest.mark.slow
def test_read_only_folders_for_tag_and_prepare(photos, tagger, tmp_path):
    prefix = unprivileged_prefix()
    if prefix is None:
        pytest.skip("no way to make a folder read-only for this user here")
    ro = tmp_path / "ro"
    ro.mkdir()
    photos.chmod(0o555)
    ro.chmod(0o555)
    try:
        cases = [
            (["tag", str(photos), "--model", str(tagger), "--offline"], "Cannot write into the image folder"),
            (["prepare", str(photos), "--out", str(ro), "--concept", "x"], "Cannot write into the dataset folder"),
            (["prepare", str(photos), "--out", str(ro / "ds"), "--concept", "x"], "to create the dataset folder"),
        ]
        for argv, words in cases:
            proc = run_cli(argv, prefix=prefix)
            assert proc.returncode == 2, proc.stderr
            assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        photos.chmod(0o755)
        ro.chmod(0o755)
    assert not list(photos.glob("*.txt")) and not list(ro.iterdir())


@pytest.mark.parametrize("raw, encoding, text", [
    ("café, grey".encode("latin-1"), "cp1252", "café, grey"),
    ("crème brûlée, naïve".encode("cp1252"), "cp1252", "crème brûlée, naïve"),
    ("1girl, sourire ☺".encode("utf-16"), "utf-16", "1girl, sourire ☺"),
    ("1girl, smile".encode("utf-16-le"), "utf-16-le", "1girl, smile"),
    (codecs.BOM_UTF8 + "1girl, café".encode(), "utf-8-sig", "1girl, café"),
    ("初音ミク, ロングヘア, 笑顔".encode("shift_jis"), "cp932", "初音ミク, ロングヘア, 笑顔"),
])
def test_caption_encodings_through_prepare(tmp_path, raw, encoding, text, capsys):
    src = tmp_path / "src"
    src.mkdir()
    gradient(64, 64, seed=1).save(src / "a.png")
    gradient(64, 64, seed=2).save(src / "b.png")
    (src / "a.txt").write_bytes(raw)
    (src / "b.txt").write_text("plain, utf8", encoding="utf-8")
    assert main(["prepare", str(src), "--out", str(tmp_path / "ds"), "--concept", "x", "--repeats", "1"]) == 0
    assert "not in plain UTF-8" in capsys.readouterr().out
    copied = tmp_path / "ds" / "img" / "1_x" / "a.txt"
    assert copied.read_bytes() == (text + "\n").encode("utf-8")  # UTF-8, no BOM, what the user meant
    manifest = json.loads((tmp_path / "ds" / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["caption_encodings"] == {"img:a.txt": encoding}  # b.txt (UTF-8) is not listed
    problems = manifest["problems"].get("img:a.png", [])
    assert any("not UTF-8" in p for p in problems) == (encoding != "utf-8-sig")
    assert manifest["tag_frequency"] == {t: 1 for t in ("plain", "utf8", *text.split(", "))}
