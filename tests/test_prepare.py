"""Kohya dataset preparer: layout, conversions, captions, manifest, idempotence, originals untouched."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset.images import load_image
from lora_trainer.dataset.names import validate_name
from lora_trainer.dataset.prepare import MANIFEST, prepare_dataset, steps_plan, suggest_repeats
from lora_trainer.dataset.samples import gradient, write_awkward_images
from lora_trainer.errors import DatasetError


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and modification time (ns)."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            out[p.relative_to(folder).as_posix()] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    src = tmp_path / "my photos"
    expect = write_awkward_images(src)
    (src / "plain.txt").write_bytes(codecs.BOM_UTF8 + b"mychar, smile, long_hair\n")
    (src / "cmyk.txt").write_bytes("mychar, café crème\n".encode("cp1252"))
    (src / "animated.txt").write_text("mychar, smile\n", encoding="utf-8")
    (src / "tiny.txt").write_text("  \n", encoding="utf-8")
    return src, expect


def test_layout_conversions_captions_and_originals(source: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    src, expect = source
    before = snapshot(src)
    out = tmp_path / "dataset"
    result = prepare_dataset(src, out, "mychar woman", repeats=10, resolution=64)
    assert snapshot(src) == before  # originals: same bytes, same mtimes, nothing added or removed
    folder = out / "img" / "10_mychar woman"
    usable = {n: o for n, o in expect.items() if not o.startswith("skip")}
    for name, outcome in usable.items():
        stem = Path(name).stem
        if outcome == "copy":
            dst = folder / name
            assert dst.read_bytes() == (src / name).read_bytes(), name
            assert dst.stat().st_mtime_ns == (src / name).stat().st_mtime_ns  # photo date kept
        else:
            dst = folder / f"{stem}.png"
            with Image.open(dst) as im:
                assert im.format == "PNG" and im.mode == "RGB", name
            np.testing.assert_array_equal(np.asarray(load_image(dst)), np.asarray(load_image(src / name)))
    images = {p.name for p in folder.iterdir() if p.suffix != ".txt"}
    assert len(images) == len(usable)
    assert not any(n.startswith(".") for n in os.listdir(folder))  # no temp files left
    # captions: UTF-8 without BOM, other encodings decoded, beside the image with its new name
    assert (folder / "plain.txt").read_bytes() == b"mychar, smile, long_hair\n"
    assert (folder / "cmyk.txt").read_text(encoding="utf-8") == "mychar, café crème\n"
    assert (folder / "animated.txt").read_text(encoding="utf-8") == "mychar, smile\n"
    m = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    assert m == result.manifest
    c = m["counts"]
    assert c["usable"] == len(usable) and c["skipped"] == len(expect) - len(usable)
    assert c["copied"] + c["converted"] == c["usable"] and c["converted"] == list(usable.values()).count("convert")
    assert c["captioned"] == 4 and c["duplicates"] == 1 and c["small"] == 1
    problems = m["problems"]
    assert "truncated" in problems["img:truncated.jpg"][0] and "duplicate of palette.png" in problems["img:palette_copy.png"]
    assert any("not UTF-8" in p for p in problems["img:cmyk.jpg"])
    assert any("is empty" in p for p in problems["img:tiny.png"]) and any("small" in p for p in problems["img:tiny.png"])
    assert any("no caption" in p for p in problems["img:bitmap.bmp"])
    assert m["tag_frequency"] == {"mychar": 3, "smile": 2, "café crème": 1, "long_hair": 1}
    assert m["training"]["total_steps"] == len(usable) * 10 * 10
    assert m["training"]["summary"].startswith(f"{len(usable)} images x 10 repeats")


def test_rerun_is_idempotent_and_repeats_change_moves_folder(source: tuple[Path, dict[str, str]],
                                                            tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "dataset"
    first = prepare_dataset(src, out, "mychar", repeats=5)
    tree = snapshot(out)
    (out / "notes.md").write_text("mine\n", encoding="utf-8")  # the user's own file in the output folder
    again = prepare_dataset(src, out, "mychar", repeats=5)
    assert again.written == [] and again.removed == [] and again.unchanged == len(first.written)
    assert {k: v for k, v in snapshot(out).items() if k != "notes.md"} == tree
    moved = prepare_dataset(src, out, "mychar", repeats=7)
    assert [p.name for p in (out / "img").iterdir()] == ["7_mychar"]  # old 5_mychar gone: no duplicates
    assert len(moved.removed) == len([k for k in tree if k.startswith("img/")])
    assert (out / "notes.md").read_text(encoding="utf-8") == "mine\n"
    assert sorted(p.name for p in (out / "img" / "7_mychar").iterdir()) == sorted(
        Path(k).name for k in tree if k.startswith("img/"))


def test_regularisation_images_and_steps(tmp_path: Path) -> None:
    src, reg = tmp_path / "src", tmp_path / "reg"
    src.mkdir()
    reg.mkdir()
    for i in range(4):
        gradient(64, 64, seed=i).save(src / f"s{i}.png")
    for i in range(6):
        gradient(64, 64, seed=100 + i).save(reg / f"r{i}.jpg")
    result = prepare_dataset(src, tmp_path / "out", "sks dog", class_images=reg, class_name="dog",
                             class_repeats=2, resolution=64)
    assert len(list((tmp_path / "out" / "reg" / "2_dog").glob("*.jpg"))) == 6
    m = result.manifest
    assert m["training"]["repeats"] == suggest_repeats(4) == 50  # 200 views per epoch / 4 images
    assert m["training"]["steps_per_epoch"] == 4 * 50 * 2  # each step pairs a regularisation image
    assert m["counts"]["class_images"] == 6 and [s["folder"] for s in m["subsets"]] == ["img/50_sks dog", "reg/2_dog"]


def test_name_clashes_renamed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gradient(32, 32, seed=1).save(src / "a.jpg")
    gradient(32, 32, seed=2).save(src / "a.gif")  # converted to a.png: would share a.txt with a.jpg
    gradient(32, 32, seed=3).save(src / "B.png")
    gradient(32, 32, seed=4).save(src / "b.webp")  # same stem ignoring case (Windows, macOS)
    result = prepare_dataset(src, tmp_path / "out", "x", repeats=1)
    names = sorted(p.name for p in (tmp_path / "out" / "img" / "1_x").iterdir())
    assert names == ["B.png", "a.png", "a_2.jpg", "b_2.webp"]  # name order: a.gif comes first
    assert any("renamed to a_2.jpg" in p for p in result.manifest["problems"]["img:a.jpg"])


def test_steps_arithmetic() -> None:
    plan = steps_plan(20, 10, batch_size=2, epochs=10)
    assert (plan["steps_per_epoch"], plan["total_steps"]) == (100, 1000)
    assert plan["summary"] == ("20 images x 10 repeats = 200 per epoch; / batch size 2 = 100 steps per epoch; "
                               "x 10 epochs = 1000 steps")
    assert [suggest_repeats(n) for n in (1, 5, 20, 50, 200, 1000)] == [100, 40, 10, 4, 1, 1]


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", "x..y", "CON", "lpt1.txt", "a:b", "what?", " lead",
                                  "trail.", "tab\there"])
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(DatasetError):
        validate_name(name)


def test_good_names_pass() -> None:
    for name in ("mychar woman", "sks_dog", "初音ミク", "a.b", "console"):
        assert validate_name(name) == name


def test_bad_input_errors(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.jpg").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_dataset(tmp_path / "missing", tmp_path / "out", "x")
    with pytest.raises(DatasetError, match="no usable image.*broken.jpg"):
        prepare_dataset(src, tmp_path / "out", "x")
    gradient(32, 32).save(src / "ok.png")
    with pytest.raises(DatasetError, match="path separator"):
        prepare_dataset(src, tmp_path / "out", "../x")
    with pytest.raises(DatasetError, match="Repeats"):
        prepare_dataset(src, tmp_path / "out", "x", repeats=0)
    with pytest.raises(DatasetError, match="class images"):
        prepare_dataset(src, tmp_path / "out", "x", class_name="dog")
    before = snapshot(src)
    with pytest.raises(DatasetError, match="overlaps"):
        prepare_dataset(src, src / "out", "x", recursive=True)
    assert snapshot(src) == before and not (tmp_path / "out").exists()


def test_output_overlapping_source_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = out / "img" / "photos"
    src.mkdir(parents=True)
    gradient(32, 32).save(src / "a.png")
    with pytest.raises(DatasetError, match="overlaps"):
        prepare_dataset(src, out, "x")
    assert [p.name for p in src.iterdir()] == ["a.png"]
    raw = tmp_path / "project" / "raw"  # photos kept inside the project folder that becomes the dataset
    raw.mkdir(parents=True)
    gradient(32, 32).save(raw / "a.png")
    prepare_dataset(raw, tmp_path / "project", "x", repeats=1)
    assert (tmp_path / "project" / "img" / "1_x" / "a.png").is_file() and [p.name for p in raw.iterdir()] == ["a.png"]
