"""Caption files (`<image stem>.txt`, comma-separated tags) and tag helpers for the UI and the tagger.

Tags are compared in a normalised form (case, spaces vs underscores, `\\(` escapes) so
"long_hair", "Long hair" and "long hair" count as one tag; files keep what the user wrote.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_text_atomic

log = logging.getLogger(__name__)

CAPTION_EXTENSION = ".txt"

# Danbooru tags that are faces drawn with underscores: their underscores are not word separators.
KAOMOJIS = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})


def caption_path(image: str | os.PathLike[str]) -> Path:
    """The caption file that belongs to an image (same folder, same stem, `.txt`)."""
    return Path(image).with_suffix(CAPTION_EXTENSION)


# Code pages tried, in order, for captions that are not UTF-8. Windows' Western page first (what
# Notepad and most editors on Western Windows write; Latin-1 text reads the same in it); the CJK ones
# only when it cannot decode the bytes at all (Shift-JIS kanji and GBK text use bytes cp1252 lacks);
# Latin-1 last, which reads any bytes. Statistical guessing picked Urdu's cp1006 for "café, grey".
FALLBACK_ENCODINGS = ("cp1252", "cp932", "gb18030")
_LABELS = {"utf-8-sig": "UTF-8 with a BOM (removed)", "utf-16": "UTF-16", "utf-16-le": "UTF-16 without a BOM",
           "utf-16-be": "UTF-16 (big-endian) without a BOM", "cp1252": "Windows-1252 (Western)",
           "cp932": "Shift-JIS (cp932)", "gb18030": "GB18030 (Chinese)", "latin-1": "Latin-1",
           "utf-32": "UTF-32"}


def decode_caption(raw: bytes) -> tuple[str, str]:
    """(text, Python codec name used): "utf-8", "utf-8-sig", "utf-16"/"utf-32" (BOM), "utf-16-le"/
    "utf-16-be" (no BOM, recognised by its zero bytes), then FALLBACK_ENCODINGS, then "latin-1"."""
    if raw.startswith(codecs.BOM_UTF8):
        return raw[len(codecs.BOM_UTF8):].decode("utf-8", errors="replace"), "utf-8-sig"
    if raw.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return raw.decode("utf-32", errors="replace"), "utf-32"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace"), "utf-16"
    if len(raw) >= 4 and len(raw) % 2 == 0:  # mostly-ASCII UTF-16 has a zero in every other byte
        odd_zero, even_zero = raw[1::2].count(0), raw[0::2].count(0)
        for encoding, zeros in (("utf-16-le", odd_zero), ("utf-16-be", even_zero)):
            if zeros >= len(raw) // 4:
                try:
                    return raw.decode(encoding), encoding
                except UnicodeDecodeError:
                    pass
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    for encoding in FALLBACK_ENCODINGS:
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1"), "latin-1"


def encoding_label(encoding: str) -> str:
    return _LABELS.get(encoding, encoding)


def decode_caption_bytes(raw: bytes) -> tuple[str, str | None]:
    """Decode caption bytes; return (text, warning or None). UTF-8 (BOM stripped) needs no warning."""
    text, encoding = decode_caption(raw)
    if encoding in ("utf-8", "utf-8-sig"):
        return text, None
    return text, f"is {encoding_label(encoding)}, not UTF-8: read as such (save captions as UTF-8)"


def read_caption_checked(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(caption text stripped, warning about its encoding or None)."""
    text, warning = decode_caption_bytes(Path(path).read_bytes())
    return text.replace("\r\n", "\n").strip(), warning


def read_caption_encoding(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(caption text stripped, codec it was read with; see decode_caption)."""
    text, encoding = decode_caption(Path(path).read_bytes())
    return text.replace("\r\n", "\n").strip(), encoding


def read_caption(path: str | os.PathLike[str]) -> str:
    """Read a caption file: UTF-8 with a BOM stripped; other encodings decoded with a logged warning."""
    text, warning = read_caption_checked(path)
    if warning:
        log.warning("caption %s %s", Path(path).name, warning)
    return text


def write_caption(path: str | os.PathLike[str], text: str) -> None:
    """Write a caption as UTF-8 without BOM, one trailing newline, atomically."""
    write_text_atomic(path, text.strip() + "\n")


def split_tags(text: str) -> list[str]:
    """Comma (or newline) separated tags, stripped, empty ones dropped, order kept."""
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def normalize_tag(tag: str) -> str:
    """The comparison key of a tag: lower case, `\\(` unescaped, underscores as spaces (kaomoji kept)."""
    tag = " ".join(tag.strip().replace("\\(", "(").replace("\\)", ")").split())
    if tag in KAOMOJIS:
        return tag
    return tag.replace("_", " ").lower()


def unique_tags(tags: Iterable[str]) -> list[str]:
    """Drop later duplicates (by normalised form), keep the first spelling and the order."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = normalize_tag(tag)
        if key and key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def escape_prompt_tag(tag: str) -> str:
    """Escape parentheses for a WebUI prompt (where `(x)` means emphasis); caption files stay unescaped."""
    return tag.replace("\\(", "(").replace("\\)", ")").replace("(", "\\(").replace(")", "\\)")


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions contain each tag (first spelling seen), most frequent first, then by name."""
    counts: Counter[str] = Counter()
    spelling: dict[str, str] = {}
    for caption in captions:
        for tag in unique_tags(split_tags(caption)):
            key = normalize_tag(tag)
            spelling.setdefault(key, tag)
            counts[key] += 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], spelling[kv[0]]))
    return {spelling[key]: n for key, n in ordered}


# ---- bulk edits across a folder's captions (the UI's tag editor) -------------------------------

@dataclass
class CaptionEdit:
    """What a bulk edit did: caption files changed, and files it could not read."""

    changed: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)


def add_tag(tags: list[str], tag: str, *, first: bool = False) -> list[str]:
    key = normalize_tag(tag)
    rest = [t for t in tags if normalize_tag(t) != key]
    if not first and len(rest) < len(tags):
        return tags  # already there: keep its position
    return [tag, *rest] if first else [*rest, tag]


def remove_tag(tags: list[str], tag: str) -> list[str]:
    key = normalize_tag(tag)
    return [t for t in tags if normalize_tag(t) != key]


def replace_tag(tags: list[str], old: str, new: str) -> list[str]:
    old_key = normalize_tag(old)
    return unique_tags(new if normalize_tag(t) == old_key else t for t in tags)


def folder_captions(folder: str | os.PathLike[str], recursive: bool = False) -> dict[Path, Path]:
    """{image: caption file} for every image in `folder` (the caption file may not exist yet)."""
    from .images import iter_candidates

    return {img: caption_path(img) for img in iter_candidates(Path(folder), recursive, {})}


def edit_folder_captions(folder: str | os.PathLike[str], edit: Callable[[list[str]], list[str]], *,
                         recursive: bool = False, create_missing: bool = False) -> CaptionEdit:
    """Apply `edit` to the tag list of every image's caption; write only captions that change."""
    result = CaptionEdit()
    for cap in folder_captions(folder, recursive).values():
        if cap.exists():
            try:
                tags = split_tags(read_caption(cap))
            except OSError as e:
                result.failed[cap] = str(e)
                continue
        elif create_missing:
            tags = []
        else:
            continue
        new = edit(tags)
        if new != tags:
            write_caption(cap, join_tags(new))
            result.changed.append(cap)
    return result


def bulk_add_tag(folder: str | os.PathLike[str], tag: str, *, first: bool = False,
                 recursive: bool = False) -> CaptionEdit:
    """Add `tag` to every image's caption (creating missing captions); `first` moves it to the front."""
    return edit_folder_captions(folder, lambda tags: add_tag(tags, tag, first=first),
                                recursive=recursive, create_missing=True)


def bulk_remove_tag(folder: str | os.PathLike[str], tag: str, *, recursive: bool = False) -> CaptionEdit:
    return edit_folder_captions(folder, lambda tags: remove_tag(tags, tag), recursive=recursive)


def bulk_replace_tag(folder: str | os.PathLike[str], old: str, new: str, *,
                     recursive: bool = False) -> CaptionEdit:
    return edit_folder_captions(folder, lambda tags: replace_tag(tags, old, new), recursive=recursive)


def folder_tag_frequency(folder: str | os.PathLike[str], recursive: bool = False) -> dict[str, int]:
    """Tag frequency table over the captions of the images in `folder`."""
    caps = [c for c in folder_captions(folder, recursive).values() if c.exists()]
    return tag_frequency(read_caption(c) for c in caps)
