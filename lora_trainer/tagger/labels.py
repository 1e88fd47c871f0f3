"""`selected_tags.csv` of a WD14 tagger: tag names and which outputs are ratings, general or characters."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..dataset.captions import KAOMOJIS
from ..errors import TaggerError

RATING, GENERAL, CHARACTER = 9, 0, 4  # the `category` column


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]  # exactly as in selected_tags.csv (underscores), one per model output
    categories: tuple[int, ...]

    def indexes(self, category: int) -> list[int]:
        return self._by_category.get(category, [])

    @cached_property  # asked several times per image; a tagger has ~10,000 outputs
    def _by_category(self) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(self.categories):
            groups.setdefault(c, []).append(i)
        return groups

    def __len__(self) -> int:
        return len(self.names)


def display_name(name: str) -> str:
    """Underscores to spaces as the reference tagger does, except in kaomoji (`^_^`, `>_<`, ...)."""
    return name if name in KAOMOJIS else name.replace("_", " ")


def load_labels(path: str | os.PathLike[str]) -> Labels:
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TaggerError(f"{path} cannot be read ({e}); download selected_tags.csv of the tagger again.") from e
    try:
        names = tuple(row["name"] for row in rows)
        categories = tuple(int(row["category"]) for row in rows)
    except (KeyError, TypeError, ValueError) as e:
        raise TaggerError(f"{path} is not a WD14 selected_tags.csv (needs name and category columns); "
                          "download it again from the tagger's model page.") from e
    if not names:
        raise TaggerError(f"{path} lists no tags; download selected_tags.csv of the tagger again.")
    return Labels(names, categories)
