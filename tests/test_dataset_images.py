"""load_image / scan_images on every awkward kind of file (generated with real Pillow encoders)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.dataset.images import ImageLoadError, decode_image, load_image, scan_images
from lora_trainer.dataset.prepare import conversion_reasons
from lora_trainer.dataset.samples import gradient, write_awkward_images
from lora_trainer.errors import DatasetError


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("awkward")
    return folder, write_awkward_images(folder)


def test_scan_sorts_every_kind_as_expected(awkward: tuple[Path, dict[str, str]]) -> None:
    folder, expect = awkward
    result = scan_images(folder, min_size=64)
    for name, outcome in expect.items():
        path = folder / name
        if outcome.startswith("skip"):
            words = outcome.split(": ", 1)[1]
            assert path in result.skipped, name
            assert words.lower() in result.skipped[path].lower(), (name, result.skipped[path])
        else:
            assert path in result.images, (name, result.skipped.get(path))
            converts = bool(conversion_reasons(result.info[path]))
            assert converts == (outcome == "convert"), (name, conversion_reasons(result.info[path]))
    assert result.images == sorted(result.images)
    assert result.duplicates == {folder / "palette_copy.png": folder / "palette.png"}
    assert list(result.warnings) == [folder / "tiny.png"]  # 16 px < half of 64 px


def test_every_usable_image_decodes_to_rgb(awkward: tuple[Path, dict[str, str]]) -> None:
    folder, expect = awkward
    for name, outcome in expect.items():
        if not outcome.startswith("skip"):
            img = load_image(folder / name)
            assert img.mode == "RGB" and img.width > 0, name


def test_transparency_is_composited_on_white(awkward: tuple[Path, dict[str, str]]) -> None:
    folder, _ = awkward
    for name in ("transparent.png", "la.png"):
        img, info = decode_image(folder / name)
        assert info.transparent, name
        assert img.getpixel((0, 0)) == (255, 255, 255), name
    img, info = decode_image(folder / "palette_transparent.png")
    index = np.asarray(Image.open(folder / "palette_transparent.png"))
    assert info.transparent and (index == 0).any()
    assert (np.asarray(img)[index == 0] == 255).all()  # the transparent palette entry became white
    src = Image.open(folder / "transparent.png").convert("RGB")
    assert load_image(folder / "transparent.png").getpixel((20, 20)) == src.getpixel((20, 20))  # opaque part


def test_sixteen_bit_scaled_not_clipped(awkward: tuple[Path, dict[str, str]]) -> None:
    folder, _ = awkward
    img = np.asarray(load_image(folder / "gray16.png"))
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64)
    np.testing.assert_allclose(img[..., 0], levels / 257, atol=1.0)  # clipping would make it ~all 255
    assert (img[..., 0] == img[..., 2]).all()


def test_float_cmyk_animated(awkward: tuple[Path, dict[str, str]]) -> None:
    folder, _ = awkward
    flt = np.asarray(load_image(folder / "float.tif"))
    assert flt[0, 0, 0] == 0 and flt[-1, -1, 0] == 255
    r, g, b = load_image(folder / "cmyk.jpg").getpixel((10, 10))
    assert r > 200 and g < 60 and b < 60  # C=0 M=Y=255 K=0 is red
    img, info = decode_image(folder / "animated.gif")
    assert info.frames == 3 and info.animated
    assert img.getpixel((5, 5)) == (255, 0, 0)  # the first frame


def test_exif_orientation_applied(awkward: tuple[Path, dict[str, str]]) -> None:
    folder, _ = awkward
    img, info = decode_image(folder / "rotated.jpg")
    assert info.exif_rotated and img.size == (40, 80)  # stored 80x40, shown turned 90 degrees
    top, bottom = img.getpixel((20, 10)), img.getpixel((20, 70))
    assert top[0] > 200 and top[1] < 60  # the red half (stored left) is now on top
    assert bottom == pytest.approx((255, 255, 255), abs=8)


@pytest.mark.parametrize(("name", "words"), [
    ("truncated.jpg", "truncated"), ("truncated.png", "truncated"), ("empty.jpg", "empty"),
    ("notes.jpg", "not an image"), ("bomb.png", "decompression bomb"),
])
def test_bad_files_raise_with_reason(awkward: tuple[Path, dict[str, str]], name: str, words: str) -> None:
    folder, _ = awkward
    with pytest.raises(ImageLoadError) as err:
        load_image(folder / name)
    assert words in err.value.reason
    assert isinstance(err.value, DatasetError)
    assert name in str(err.value) and "remove it from the folder" in str(err.value)


def test_recursive_hidden_folders_and_missing_folder(tmp_path: Path) -> None:
    gradient(32, 32, seed=1).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    gradient(32, 32, seed=2).save(tmp_path / "sub" / "b.png")
    (tmp_path / ".cache").mkdir()
    gradient(32, 32, seed=3).save(tmp_path / ".cache" / "c.png")
    (tmp_path / "a.txt").write_text("caption", encoding="utf-8")  # side files are not problems
    flat = scan_images(tmp_path)
    assert flat.images == [tmp_path / "a.png"] and flat.skipped == {}
    deep = scan_images(tmp_path, recursive=True)
    assert deep.images == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    assert "hidden" in deep.skipped[tmp_path / ".cache"]
    with pytest.raises(DatasetError, match="does not exist"):
        scan_images(tmp_path / "nope")


def test_duplicates_by_pixels_across_formats(tmp_path: Path) -> None:
    pic = gradient(40, 30, seed=5)
    pic.save(tmp_path / "a.png")
    pic.save(tmp_path / "b.bmp")  # same picture, other container
    gradient(40, 30, seed=6).save(tmp_path / "c.png")
    result = scan_images(tmp_path)
    assert result.images == [tmp_path / "a.png", tmp_path / "c.png"]
    assert result.skipped[tmp_path / "b.bmp"] == "duplicate of a.png"
    assert scan_images(tmp_path, dedupe=False).images == [tmp_path / n for n in ("a.png", "b.bmp", "c.png")]


@pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")
def test_linked_folder_loop_is_not_followed(tmp_path: Path) -> None:
    gradient(16, 16).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "back").symlink_to(tmp_path, target_is_directory=True)
    result = scan_images(tmp_path, recursive=True)
    assert result.images == [tmp_path / "a.png"]
    assert "not followed" in result.skipped[tmp_path / "sub" / "back"]
