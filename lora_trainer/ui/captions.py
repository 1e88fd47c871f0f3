"""What the user did to a folder's captions, so that running the tagger again never undoes it.

The tab remembers, per image folder, the caption the tagger last wrote for each image and the tags
taken out of every caption with "Edit every caption" (remove, or replace's old tag). From these it
knows which captions the user changed since (by hand or in bulk), which tags each caption lost (the
"append" mode does not add them back), and it says what each tagger mode would do before it runs.
The record lives in the trainer's run folder (`<work_dir>/caption-history/`), never in the user's
image folder. No Gradio here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..dataset import captions as cap
from ..dataset.atomic import write_text_atomic

log = logging.getLogger(__name__)

# The tagger's modes in the words the tab shows, and what they are called in the API/CLI.
TAG_MODES = {
    "Only images without a caption": "skip",
    "Add new tags to existing captions": "append",
    "Replace all captions": "overwrite",
}
DEFAULT_TAG_MODE = "Only images without a caption"


@dataclass
class History:
    folder: str
    tagger: dict[str, str] = field(default_factory=dict)  # image (relative, POSIX) -> caption the tagger wrote
    removed: list[str] = field(default_factory=list)  # tags removed from every caption in bulk


def _record_path(work_dir: Path, folder: str | Path) -> Path:
    key = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]
    return Path(work_dir) / "caption-history" / f"{key}.json"


def load(work_dir: Path, folder: str | Path) -> History:
    path = _record_path(work_dir, folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return History(str(folder), dict(data.get("tagger") or {}), list(data.get("removed") or []))
    except FileNotFoundError:
        return History(str(folder))
    except (OSError, ValueError, TypeError) as e:  # a damaged record only loses the memory, never captions
        log.warning("ignoring the caption history %s: %s", path, e)
        return History(str(folder))


def _save(work_dir: Path, history: History) -> None:
    try:
        write_text_atomic(_record_path(work_dir, history.folder), json.dumps(
            {"folder": str(Path(history.folder).resolve()), "tagger": history.tagger, "removed": history.removed},
            ensure_ascii=False))
    except OSError as e:
        log.warning("could not keep the caption history of %s: %s", history.folder, e)


def record_tagging(work_dir: Path, folder: str | Path, captions: dict[str, str], *,
                   users: set[str] = frozenset()) -> None:
    """The tagger wrote `captions` ({relative path: text}) into `folder`. `users`: captions that were
    the user's before ("append" added tags to them); they stay the user's, so a later "Replace all
    captions" still warns that their words would be lost."""
    history = load(work_dir, folder)
    history.tagger.update({rel: text for rel, text in captions.items() if rel not in users})
    _save(work_dir, history)


def record_bulk(work_dir: Path, folder: str | Path, *, removed: list[str] = (), added: list[str] = ()) -> None:
    """Tags were removed from (or added to) every caption: the last bulk edit of a tag decides
    whether the tagger may write it again."""
    history = load(work_dir, folder)
    gone = {cap.normalize_tag(t) for t in [*removed, *added]}
    history.removed = [t for t in history.removed if cap.normalize_tag(t) not in gone]
    history.removed += [t for t in removed if t.strip()]
    _save(work_dir, history)


@dataclass
class CaptionState:
    images: int
    captioned: int
    changed: list[str]  # captions that differ from what the tagger last wrote here
    foreign: list[str]  # captions the tagger did not write here (came with the images, or typed)
    keep_out: dict[str, set[str]]  # per image: tags taken out since the tagger wrote them, bulk removals
    removed: list[str]  # tags removed from every caption

    @property
    def yours(self) -> int:
        return len(self.changed) + len(self.foreign)


def caption_state(work_dir: Path, folder: str | Path, images: list[str]) -> CaptionState:
    """What is there now, compared with what the tagger wrote (`images`: the loaded image paths)."""
    history = load(work_dir, folder)
    root = Path(folder)
    bulk = {cap.normalize_tag(t): t for t in history.removed}
    captioned, changed, foreign, keep_out = 0, [], [], {}
    for image in images:
        path = cap.caption_path(image)
        try:
            rel = Path(image).relative_to(root).as_posix()
        except ValueError:
            rel = Path(image).name
        if not path.exists():
            continue
        captioned += 1
        try:
            now = cap.split_tags(cap.read_caption(path))
        except (OSError, ValueError) as e:
            log.debug("cannot read %s: %s", path, e)
            continue
        have = {cap.normalize_tag(t) for t in now}
        out = {t for k, t in bulk.items() if k not in have}
        wrote = history.tagger.get(rel)
        if wrote is None:
            foreign.append(rel)
        else:
            before = cap.split_tags(wrote)
            if [cap.normalize_tag(t) for t in before] != [cap.normalize_tag(t) for t in now]:
                changed.append(rel)
            out |= {t for t in before if cap.normalize_tag(t) not in have}
        if out:
            keep_out[rel] = out
    return CaptionState(len(images), captioned, changed, foreign, keep_out, list(history.removed))


def _some(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def mode_preview(state: CaptionState, mode_label: str) -> str:
    """Markdown: how many captions exist and what each mode will do to them (the chosen one in bold)."""
    if state.images == 0:
        return "Load an image folder to see what the tagger will do."
    missing = state.images - state.captioned
    if state.captioned == 0:
        return f"None of the {state.images} images has a caption yet: the tagger writes one for each."
    head = f"**{state.captioned} of {state.images} images already have a caption**"
    details = []
    if state.changed:
        details.append(f"{len(state.changed)} changed by you since the tagger wrote them")
    if state.foreign:
        details.append(f"{len(state.foreign)} not written by the tagger here")
    head += f" ({'; '.join(details)})." if details else " (as the tagger wrote them)."
    lost = sorted({t for tags in state.keep_out.values() for t in tags}, key=str.lower)
    lines = {
        "skip": f"tags the {missing} image(s) without a caption; the {state.captioned} caption(s) stay exactly "
                "as they are." if missing else "nothing to do: every image has a caption, and they stay as they are.",
        "append": f"keeps every tag of the {state.captioned} caption(s) and adds the new tags the tagger finds"
                  + (f"; tags you took out stay out ({_some(lost)})" if lost else "")
                  + (f", and tags the {missing} image(s) without one" if missing else "") + ".",
        "overwrite": f"rewrites all {state.images} caption(s) with the tagger's tags"
                     + (f": **your changes to {state.yours} caption(s) are lost**" if state.yours else "")
                     + (f" (tags you removed from every caption stay out: {_some(state.removed)})"
                        if state.removed else "") + ".",
    }
    chosen = TAG_MODES.get(mode_label, mode_label)
    out = [head]
    for label, mode in TAG_MODES.items():
        text = f"*{label}*: {lines[mode]}"
        out.append(f"- **→ {text}**" if mode == chosen else f"- {text}")
    return "\n".join(out)
