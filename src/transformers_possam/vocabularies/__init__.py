"""Built-in vocabularies: COCO panoptic (133 classes) and ADE20K (150 classes), and the class-name rules they share.

Each class is one string whose comma-separated parts are synonyms (FC-CLIP / OpenSeg prompt-engineered
names), e.g. ``"person,child,girl,..."``. The first synonym is the display name.

Class-name rules (`normalize_class_name`): a name is a `str`; commas separate synonyms; the whitespace around each
synonym is stripped (FC-CLIP replaces ``", "`` by ``","`` before splitting, which is the same on every well-formed
name); an empty synonym (``"cat,,dog"``, ``"cat,"``) or a control character inside a synonym (a line break, a tab,
``"\\x00"``, a Unicode line separator) is a `ValueError`, because CLIP would read an empty prompt
(``"a photo of a ."``) or a garbage byte token where the user surely meant something else. A synonym may repeat
inside one class (ADE20K's stove does): the classifier takes each class's best synonym, so a repeat changes nothing.
"""

from __future__ import annotations

import csv
import numbers
import unicodedata
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

import numpy as np


__all__ = [
    "Vocabulary",
    "load_vocabulary",
    "VOCABULARY_PRESETS",
    "split_synonyms",
    "normalize_class_name",
    "thing_flag",
    "synonym_key",
    "shared_synonyms",
    "preview",
    "type_hint",
]

VOCABULARY_PRESETS = {"coco_panoptic_133": "coco_panoptic_133.tsv", "ade20k_150": "ade20k_150.tsv"}
# Longest repr an error message quotes: a hostile 10 000-character label must not flood the terminal.
PREVIEW_CHARS = 80


def preview(value: object, limit: int = PREVIEW_CHARS) -> str:
    """`repr(value)`; a longer string shows its first `limit` characters and its length."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters of repr)"


def type_hint(value: object) -> str:
    """What to do with a value of the wrong type where a class name belongs (empty when there is no hint)."""
    if isinstance(value, (bytes, bytearray)):
        return " Decode it first (value.decode('utf-8'))."
    if isinstance(value, (list, tuple)):
        return " To give synonyms, join them with commas in one string: 'cat,kitty'."
    return ""


def normalize_class_name(name: object, where: str = "class name") -> str:
    """
    The canonical form of one class name: its synonyms, each stripped, joined by `","`.

    `where` names the entry in error messages (e.g. `"candidate_labels[3]"`).

    Raises:
        TypeError: `name` is not a `str` (`numpy.str_` counts as one).
        ValueError: the name is blank (no synonym at all), has an empty synonym, or a synonym holds a control
            character. The message names `where`, the value and the fix.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"{where} = {preview(name)} has type {type(name).__name__}; a class name must be a str.{type_hint(name)}"
        )
    synonyms = [part.strip() for part in str(name).split(",")]
    if not any(synonyms):
        raise ValueError(
            f"{where} = {preview(name)} is blank: it has no synonym; every class needs a name such as 'cat'."
        )
    for position, synonym in enumerate(synonyms):
        if not synonym:
            raise ValueError(
                f"{where} = {preview(name)} has an empty synonym (part {position} between commas): remove the stray "
                "comma; commas separate synonyms, as in 'cat,kitty'."
            )
        # control characters (Cc) and Unicode line / paragraph separators (Zl, Zp): a pasted multi-line string
        control = next((char for char in synonym if unicodedata.category(char) in ("Cc", "Zl", "Zp")), None)
        if control is not None:
            raise ValueError(
                f"{where} = {preview(name)} holds the control character {control!r} in synonym {synonym!r}: give one "
                "class per entry, on one line (commas separate synonyms)."
            )
    return ",".join(synonyms)


def split_synonyms(class_name: str) -> list[str]:
    """``"person, people,child"`` -> ``["person", "people", "child"]`` (rules: `normalize_class_name`)."""
    return normalize_class_name(class_name).split(",")


def thing_flag(value: object, where: str = "isthing") -> bool:
    """
    A thing/stuff flag as a `bool`: `True` / `False` (Python or numpy) or the integers 1 / 0 (COCO's JSON convention).

    Raises:
        TypeError: any other type, e.g. the string `"false"` (which `bool()` would read as True), None or a float.
        ValueError: an integer other than 0 and 1.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        if value in (0, 1):
            return bool(value)
        raise ValueError(
            f"{where} = {value!r}: use True (thing) or False (stuff); as integers only 1 and 0 are allowed."
        )
    raise TypeError(f"{where} = {preview(value)} has type {type(value).__name__}; use True (thing) or False (stuff).")


def synonym_key(synonym: str) -> str:
    """A synonym as CLIP's tokenizer reads it (case, runs of whitespace and Unicode composition do not matter)."""
    return " ".join(unicodedata.normalize("NFC", synonym).lower().split())


def shared_synonyms(keys_per_class: Sequence[Sequence[Hashable]]) -> list[tuple[int, int, int, int]]:
    """
    `(class_a, synonym_a, class_b, synonym_b)` for every synonym key of `class_b` already held by an earlier
    `class_a` (first holder only); repeats inside one class are not reported.
    """
    first_holder: dict[Hashable, tuple[int, int]] = {}
    shared = []
    for class_index, keys in enumerate(keys_per_class):
        for synonym_index, key in enumerate(keys):
            holder = first_holder.setdefault(key, (class_index, synonym_index))
            if holder[0] != class_index:
                shared.append((*holder, class_index, synonym_index))
    return shared


@dataclass(frozen=True)
class Vocabulary:
    """
    A list of classes, each with synonyms, plus the thing/stuff flag of each class.

    Construction checks and canonicalizes: `names` becomes a tuple of `normalize_class_name` forms, `is_thing` a
    tuple of `bool` (`thing_flag` rules), one per name. Two classes that CLIP would read alike are a `ValueError`:
    the same synonyms (compared by `synonym_key`) or one synonym in both, since each class scores its best synonym
    and identical text gives identical embeddings.

    Raises:
        TypeError: `names` / `is_thing` not a list or tuple, or an entry of the wrong type.
        ValueError: no class, different lengths, a malformed name, or two classes sharing a synonym.
    """

    names: tuple[str, ...]  # comma-joined synonyms per class
    is_thing: tuple[bool, ...]

    def __post_init__(self) -> None:
        for field, value in (("names", self.names), ("is_thing", self.is_thing)):
            if not isinstance(value, (list, tuple)):
                raise TypeError(
                    f"Vocabulary.{field} must be a tuple or list, got a {type(value).__name__}: {preview(value)}."
                )
        if not self.names:
            raise ValueError("Vocabulary has no class: give at least one name.")
        if len(self.names) != len(self.is_thing):
            raise ValueError(
                f"Vocabulary has {len(self.names)} names but {len(self.is_thing)} is_thing flags: give one flag per name."
            )
        names = tuple(normalize_class_name(name, f"label {index}") for index, name in enumerate(self.names))
        flags = tuple(thing_flag(flag, f"is_thing[{index}]") for index, flag in enumerate(self.is_thing))
        # frozen dataclass: canonical values are stored once, here, so equal vocabularies compare and hash equal
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "is_thing", flags)
        check_distinct_classes(names)

    @property
    def synonyms(self) -> list[list[str]]:
        return [split_synonyms(name) for name in self.names]

    @property
    def display_names(self) -> list[str]:
        return [syns[0] for syns in self.synonyms]

    def __len__(self) -> int:
        return len(self.names)


def check_distinct_classes(names: Sequence[str]) -> None:
    """
    `ValueError` naming the first pair of identical labels (as CLIP reads them); a `UserWarning` naming the first pair
    of classes that share a synonym (see `Vocabulary`).
    """
    keys = [[synonym_key(synonym) for synonym in name.split(",")] for name in names]
    shared = shared_synonyms(keys)
    if not shared:
        return
    class_a, _, class_b, synonym_b = shared[0]
    first, second = f"label {class_a} ({preview(names[class_a])})", f"label {class_b} ({preview(names[class_b])})"
    if set(keys[class_a]) == set(keys[class_b]):
        raise ValueError(
            f"Duplicate label: {second} repeats {first} (CLIP ignores case, spacing and Unicode composition): labels "
            "must be unique."
        )
    more = f" ({len(shared) - 1} more shared synonyms)" if len(shared) > 1 else ""
    # a warning, not an error: large prompt-engineered vocabularies (FC-CLIP's ADE-847, PASCAL Context-459) do share
    # synonyms between classes, and FC-CLIP evaluates them as they are
    warnings.warn(
        f"Duplicate synonym {preview(names[class_b].split(',')[synonym_b])} in {first} and {second}{more}: each class "
        "scores its best synonym, so the two compete with the same text embedding; keep it in one class if you can.",
        UserWarning,
        stacklevel=3,
    )


@cache
def load_vocabulary(preset: str) -> Vocabulary:
    """Load a shipped vocabulary by preset name (``"coco_panoptic_133"`` or ``"ade20k_150"``)."""
    if preset not in VOCABULARY_PRESETS:
        raise ValueError(f"Unknown vocabulary preset {preset!r}; choose one of {sorted(VOCABULARY_PRESETS)}.")
    text = resources.files(__name__).joinpath(VOCABULARY_PRESETS[preset]).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    rows.sort(key=lambda row: int(row["id"]))
    if [int(row["id"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"Vocabulary file of {preset!r} does not hold contiguous ids 0..N-1.")
    return Vocabulary(names=tuple(row["names"] for row in rows), is_thing=tuple(row["isthing"] == "1" for row in rows))
