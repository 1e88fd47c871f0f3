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


def decode_caption_bytes(raw: bytes) -> tuple[str, str | None]:
    """Decode caption bytes; return (text, warning or None). UTF-8 (BOM stripped) needs no warning."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16"), "is UTF-16, read as such (save captions as UTF-8)"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    encoding = _guess_encoding(raw)
    return raw.decode(encoding, errors="replace"), f"is not UTF-8, decoded as {encoding} (save captions as UTF-8)"


def _guess_encoding(raw: bytes) -> str:
    try:  # charset_normalizer ships with requests, so it is nearly always there
        from charset_normalizer import from_bytes

        matches = from_bytes(raw)
        best = matches.best()
        if best is not None and best.encoding:
            # Short Latin text fits several code pages equally well; Windows' Western one is the likeliest.
            tied = {m.encoding for m in matches if m.chaos <= best.chaos}
            return "cp1252" if "cp1252" in tied else str(best.encoding)
    except ImportError:
        pass
    for encoding in ("cp932", "gb18030", "cp1252"):  # common non-UTF-8 editors' defaults
        try:
            raw.decode(encoding)
            return encoding
        except UnicodeDecodeError:
            continue
    return "latin-1"


def read_caption_checked(path: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(caption text stripped, warning about its encoding or None)."""
    text, warning = decode_caption_bytes(Path(path).read_bytes())
    return text.replace("\r\n", "\n").strip(), warning


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
