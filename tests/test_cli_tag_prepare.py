"""`python -m lora_trainer tag|prepare`: exit codes, one-line errors, printed provider and summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.cli import main
from lora_trainer.dataset.samples import gradient, write_images
from lora_trainer.tagger.demo_model import write_demo_tagger


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_tagger(tmp_path_factory.mktemp("tagger"))


def _photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_images(folder, 3, (48, 40), captions=False)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "sub").mkdir()
    gradient(30, 30, seed=9).save(folder / "sub" / "deep.png")
    return folder


def test_tag_command(tagger_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _photos(tmp_path)
    report = tmp_path / "r.json"
    code = main(["tag", str(folder), "--model", str(tagger_dir), "--trigger", "mychar", "--exclude", "solo,smile",
                 "--batch-size", "2", "--recursive", "--report", str(report), "--mode", "overwrite",
                 "--replace", "1girl=1woman", "--general-threshold", "0.3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "on CPUExecutionProvider" in out and "batch 2" in out
    assert "Tagged 4 image(s), skipped 1." in out and "skipped broken.png:" in out
    data = json.loads(report.read_text(encoding="utf-8"))
    assert sorted(data["images"]) == ["img_0000.png", "img_0001.png", "img_0002.png", "sub/deep.png"]
    for entry in data["images"].values():
        tags = entry["caption"].split(", ")
        assert tags[0] == "mychar" and "solo" not in tags and "smile" not in tags and "1girl" not in tags
    assert (folder / "sub" / "deep.txt").read_text(encoding="utf-8").startswith("mychar, ")


def test_prepare_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _photos(tmp_path)
    reg = tmp_path / "reg"
    write_images(reg, 2, (32, 32), captions=False, seed=50)
    out = tmp_path / "dataset"
    code = main(["prepare", str(folder), "--out", str(out), "--concept", "mychar woman", "--repeats", "4",
                 "--class-images", str(reg), "--class-name", "woman", "--class-repeats", "1", "--recursive",
                 "--resolution", "64"])
    text = capsys.readouterr().out
    assert code == 0
    assert "img/4_mychar woman: 4 image(s)" in text and "reg/1_woman: 2 image(s)" in text
    assert "Steps: 4 images x 4 repeats x 2 (regularisation images) = 32 per epoch" in text
    assert "img:broken.png" in text
    assert sorted(p.name for p in (out / "img" / "4_mychar woman").iterdir()) == [
        "deep.png", "img_0000.png", "img_0001.png", "img_0002.png"]  # no captions in the source
    assert main(["prepare", str(folder), "--out", str(out), "--concept", "mychar woman", "--repeats", "4",
                 "--class-images", str(reg), "--class-name", "woman", "--recursive", "--resolution", "64"]) == 0
    assert "0 file(s) written" in capsys.readouterr().out


@pytest.mark.parametrize("argv_tail", [
    ["tag", "{missing}", "--model", "{tagger}"],
    ["tag", "{empty}", "--model", "{tagger}"],
    ["tag", "{photos}", "--model", "not-a-tagger"],
    ["tag", "{photos}", "--model", "wd-vit-tagger-v3", "--offline", "--cache-dir", "{tmp}/cache"],
    ["tag", "{photos}", "--model", "{tagger}", "--general-threshold", "1.5"],
    ["prepare", "{missing}", "--out", "{tmp}/o", "--concept", "x"],
    ["prepare", "{empty}", "--out", "{tmp}/o", "--concept", "x"],
    ["prepare", "{photos}", "--out", "{tmp}/o", "--concept", "../evil"],
    ["prepare", "{photos}", "--out", "{tmp}/o", "--concept", "x", "--class-images", "{photos}"],
])
def test_bad_input_exits_2_with_one_line(argv_tail: list[str], tagger_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    write_images(photos, 1, (16, 16), captions=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x", encoding="utf-8")
    subst = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "photos": str(photos),
             "tagger": str(tagger_dir), "tmp": str(tmp_path)}
    argv = [a.format(**subst) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if "wd-vit-tagger-v3" in argv:
        assert "model.onnx" in err and "selected_tags.csv" in err and "SmilingWolf_wd-vit-tagger-v3" in err


def test_real_process_exit_codes(tagger_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    bad = subprocess.run([sys.executable, "-m", "lora_trainer", "prepare", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "o"), "--concept", "x"], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
    write_images(tmp_path / "p", 2, (16, 16), captions=False)
    ok = subprocess.run([sys.executable, "-m", "lora_trainer", "tag", str(tmp_path / "p"), "--model", str(tagger_dir)],
                        check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "CPUExecutionProvider" in ok.stdout and "Tagged 2 image(s)" in ok.stdout
