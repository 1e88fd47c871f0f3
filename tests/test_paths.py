"""paths.py: typed paths stay inside allowed roots, LoRA names stay inside the Lora folder."""

from __future__ import annotations

import os

import pytest

from lora_trainer.errors import LoraTrainerError
from lora_trainer.paths import (
    InvalidNameError,
    PathNotAllowedError,
    UserPathError,
    fresh_stem,
    lora_subdir,
    resolve_user_path,
    validate_lora_name,
    write_new_file,
)


def test_resolve_inside_root(tmp_path):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    got = resolve_user_path(f"{tmp_path}/data/./imgs/", [tmp_path / "data"])
    assert got == (tmp_path / "data" / "imgs").resolve()


def test_resolve_rejects_dotdot_escape(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").mkdir()
    with pytest.raises(PathNotAllowedError, match="outside the folders"):
        resolve_user_path(f"{tmp_path}/data/../secret", [tmp_path / "data"])


def test_resolve_rejects_symlink_escape(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", tmp_path / "data" / "link")
    with pytest.raises(PathNotAllowedError):
        resolve_user_path(tmp_path / "data" / "link", [tmp_path / "data"])


def test_resolve_prefix_is_not_inside(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    with pytest.raises(PathNotAllowedError):
        resolve_user_path(tmp_path / "data2", [tmp_path / "data"])


def test_resolve_no_roots_allows_anything_but_checks_existence(tmp_path):
    assert resolve_user_path(tmp_path, None) == tmp_path.resolve()
    with pytest.raises(UserPathError, match="does not exist"):
        resolve_user_path(tmp_path / "nope", None, what="dataset folder")
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(UserPathError, match="not a folder"):
        resolve_user_path(f, None, kind="dir")
    assert resolve_user_path(tmp_path / "new", None, must_exist=False) == (tmp_path / "new").resolve()
    with pytest.raises(UserPathError, match="empty"):
        resolve_user_path("  ", None)


@pytest.mark.parametrize("name", ["my lora", "alice_v2", "Style-1.5", "名前"])
def test_valid_names(name):
    assert validate_lora_name(name) == name


def test_name_drops_extension():
    assert validate_lora_name("alice.safetensors") == "alice"


@pytest.mark.parametrize("name", ["", "..", ".hidden", "a/b", "a\\b", "../x", "CON", "nul.txt", "lpt1",
                                  "a\x00b", "a\nb", "trailing.", "x" * 200, "a:b", "a*b"])
def test_invalid_names(name):
    with pytest.raises(InvalidNameError) as e:
        validate_lora_name(name)
    assert isinstance(e.value, LoraTrainerError)
    assert ";" in str(e.value)  # cause; remedy


def test_lora_subdir(tmp_path):
    lora = tmp_path / "Lora"
    lora.mkdir()
    assert lora_subdir(lora, "") == lora.resolve()
    assert lora_subdir(lora, "people/alice") == (lora / "people" / "alice").resolve()
    # A leading slash cannot escape: the sub-folder is always taken relative to the Lora folder.
    assert lora_subdir(lora, "/etc") == (lora / "etc").resolve()
    for bad in ("..", "../x", "a/../../x", "a\\..\\..\\x"):
        with pytest.raises(InvalidNameError):
            lora_subdir(lora, bad)
    os.symlink(tmp_path, lora / "out")
    with pytest.raises(PathNotAllowedError):
        lora_subdir(lora, "out")


def test_fresh_stem_and_write_new_file(tmp_path):
    assert fresh_stem(tmp_path, "a", [".safetensors", ".json"]) == "a"
    write_new_file(tmp_path / "a.safetensors", b"1")
    assert fresh_stem(tmp_path, "a", [".safetensors", ".json"]) == "a_2"
    (tmp_path / "a_2.json").write_text("{}")
    assert fresh_stem(tmp_path, "a", [".safetensors", ".json"]) == "a_3"
    with pytest.raises(FileExistsError):
        write_new_file(tmp_path / "a.safetensors", b"2")
    assert (tmp_path / "a.safetensors").read_bytes() == b"1"
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    write_new_file(tmp_path / "sub" / "b.bin", src=src)
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"abc"
    assert not [p for p in tmp_path.rglob("*.tmp")]
