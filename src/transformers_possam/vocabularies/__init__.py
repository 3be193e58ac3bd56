"""Built-in vocabularies: COCO panoptic (133 classes) and ADE20K (150 classes).

Each class is one string whose comma-separated parts are synonyms (FC-CLIP / OpenSeg prompt-engineered
names), e.g. ``"person,child,girl,..."``. The first synonym is the display name.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = ["Vocabulary", "load_vocabulary", "VOCABULARY_PRESETS", "split_synonyms"]

VOCABULARY_PRESETS = {"coco_panoptic_133": "coco_panoptic_133.tsv", "ade20k_150": "ade20k_150.tsv"}


def split_synonyms(class_name: str) -> list[str]:
    """``"person, people,child"`` -> ``["person", "people", "child"]`` (FC-CLIP's rule: split on commas, strip)."""
    synonyms = [part.strip() for part in class_name.split(",")]
    synonyms = [s for s in synonyms if s]
    if not synonyms:
        raise ValueError(f"Class name {class_name!r} has no synonym: give at least one non-empty name.")
    return synonyms


@dataclass(frozen=True)
class Vocabulary:
    """A list of classes, each with synonyms, plus the thing/stuff flag of each class."""

    names: tuple[str, ...]  # comma-joined synonyms per class
    is_thing: tuple[bool, ...]

    @property
    def synonyms(self) -> list[list[str]]:
        return [split_synonyms(name) for name in self.names]

    @property
    def display_names(self) -> list[str]:
        return [syns[0] for syns in self.synonyms]

    def __len__(self) -> int:
        return len(self.names)


@lru_cache(maxsize=None)
def load_vocabulary(preset: str) -> Vocabulary:
    """Load a shipped vocabulary by preset name (``"coco_panoptic_133"`` or ``"ade20k_150"``)."""
    if preset not in VOCABULARY_PRESETS:
        raise ValueError(f"Unknown vocabulary preset {preset!r}; choose one of {sorted(VOCABULARY_PRESETS)}.")
    text = resources.files(__name__).joinpath(VOCABULARY_PRESETS[preset]).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    rows.sort(key=lambda row: int(row["id"]))
    if [int(row["id"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"Vocabulary file of {preset!r} does not hold contiguous ids 0..N-1.")
    return Vocabulary(
        names=tuple(row["names"] for row in rows), is_thing=tuple(row["isthing"] == "1" for row in rows)
    )
