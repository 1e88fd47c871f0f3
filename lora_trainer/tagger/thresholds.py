"""From scores to a caption: thresholds (fixed or MCut), ordering, exclusions and caption modes.

Matches SmilingWolf's reference: strict `>` thresholds, MCut = midpoint of the largest gap
between sorted probabilities (character MCut floored at 0.15), the rating is the top-scoring
rating output, underscores become spaces except in kaomoji, tags sorted by confidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..dataset.captions import normalize_tag, unique_tags
from ..errors import ConfigError
from .labels import CHARACTER, GENERAL, RATING, Labels, display_name

CHARACTER_MCUT_FLOOR = 0.15
MODES = ("append", "overwrite", "skip")


def mcut_threshold(probs: np.ndarray | Sequence[float]) -> float:
    """Maximum Cut Thresholding: the midpoint of the largest gap between sorted probabilities."""
    p = np.sort(np.asarray(probs, dtype=np.float64))[::-1]
    if p.size < 2:
        return float(p[0]) if p.size else 1.0  # nothing to split: keep nothing under strict ">"
    gaps = p[:-1] - p[1:]
    t = int(gaps.argmax())
    return float((p[t] + p[t + 1]) / 2)


@dataclass
class TagOptions:
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    general_mcut: bool = False
    character_mcut: bool = False
    include_characters: bool = True
    include_rating: bool = False
    replace_underscores: bool = True
    trigger: str | None = None  # always the first tag
    exclude: Sequence[str] = ()  # never written (matched with or without underscores, any case)
    always_first: Sequence[str] = ()  # moved to the front when predicted, in this order
    replacements: Mapping[str, str] = field(default_factory=dict)  # tag -> new text ("" drops it)

    def validate(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name.replace('_', ' ').capitalize()} {value} is outside 0..1; "
                                  "use a probability such as 0.35.")
        if self.trigger is not None and ("," in self.trigger or not self.trigger.strip()):
            raise ConfigError(f"Trigger word '{self.trigger}' is empty or holds a comma; use one tag, e.g. 'mychar'.")


def thresholds_for(scores: np.ndarray, labels: Labels, options: TagOptions) -> tuple[float, float]:
    """(general, character) thresholds used for this image's scores."""
    general = options.general_threshold
    character = options.character_threshold
    if options.general_mcut:
        general = mcut_threshold(scores[labels.indexes(GENERAL)])
    if options.character_mcut:
        character = max(CHARACTER_MCUT_FLOOR, mcut_threshold(scores[labels.indexes(CHARACTER)]))
    return general, character


def select_tags(scores: np.ndarray, labels: Labels, options: TagOptions) -> list[str]:
    """Predicted tags for one image, most confident first, exclusions and replacements applied."""
    scores = np.asarray(scores, dtype=np.float64)
    general_t, character_t = thresholds_for(scores, labels, options)
    picked = [i for i in labels.indexes(GENERAL) if scores[i] > general_t]
    if options.include_characters:
        picked += [i for i in labels.indexes(CHARACTER) if scores[i] > character_t]
    picked.sort(key=lambda i: -scores[i])  # stable: equal scores keep the CSV's order
    rename = _Renamer(options)
    tags = [rename(labels.names[i]) for i in picked]
    if options.include_rating:
        ratings = labels.indexes(RATING)
        if ratings:
            best = max(ratings, key=lambda i: scores[i])
            tags.insert(0, rename(labels.names[best]))
    return [t for t in tags if t]


class _Renamer:
    """A tag name as written in captions: display form, exclusions dropped (""), replacements applied."""

    def __init__(self, options: TagOptions):
        self.underscores = options.replace_underscores
        self.excluded = {normalize_tag(t) for t in options.exclude}
        self.replacements = {normalize_tag(k): v.strip() for k, v in options.replacements.items()}

    def __call__(self, name: str) -> str:
        shown = display_name(name) if self.underscores else name
        if self.excluded and (normalize_tag(name) in self.excluded or normalize_tag(shown) in self.excluded):
            return ""
        return self.replacements.get(normalize_tag(shown), shown) if self.replacements else shown


def compose_caption(predicted: Sequence[str], options: TagOptions, existing: Sequence[str] | None = None,
                    mode: str = "overwrite") -> list[str]:
    """The tags to write: trigger first, always-first tags next, then predicted (or existing + new)."""
    if mode not in MODES:
        raise ConfigError(f"Caption mode '{mode}' is unknown; use one of {', '.join(MODES)}.")
    tags = list(predicted)
    for wanted in reversed(list(options.always_first)):
        key = normalize_tag(wanted)
        found = [t for t in tags if normalize_tag(t) == key]
        if found:
            tags = [found[0], *[t for t in tags if normalize_tag(t) != key]]
    if mode == "append" and existing:
        tags = [*existing, *tags]  # the user's tags keep their order; only new ones are added
    if options.trigger:
        trigger = options.trigger.strip()
        tags = [trigger, *[t for t in tags if normalize_tag(t) != normalize_tag(trigger)]]
    return unique_tags(tags)
