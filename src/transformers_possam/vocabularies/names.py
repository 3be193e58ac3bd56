"""
Class-name rules shared by every vocabulary.

Inside a `Vocabulary` (and in the shipped vocabulary files, FC-CLIP's category tables and a config's
`training_vocabulary`), each class is one string whose comma-separated parts are synonyms (FC-CLIP / OpenSeg
prompt-engineered names), e.g. ``"person,child,girl,..."``; the first synonym is the display name. How users write
classes and synonyms (a string of classes, a list of synonyms per class, dicts) is `vocabulary.resolve_vocabulary`'s.

`normalize_class_name`: a name is a `str`; commas separate synonyms; the whitespace around each synonym is stripped
(FC-CLIP replaces ``", "`` by ``","`` before splitting, which is the same on every well-formed name); an empty synonym
(``"cat,,dog"``, ``"cat,"``) or a control character inside a synonym (a line break, a tab, ``"\\x00"``, a Unicode line
separator) is a `ValueError`, because CLIP would read an empty prompt (``"a photo of a ."``) or a garbage byte token
where the user surely meant something else. A synonym may repeat inside one class (ADE20K's stove does): the
classifier takes each class's best synonym, so a repeat changes nothing.
"""

from __future__ import annotations

import numbers
import unicodedata
from collections.abc import Hashable, Sequence

import numpy as np


__all__ = [
    "normalize_class_name",
    "preview",
    "shared_synonyms",
    "split_synonyms",
    "synonym_key",
    "thing_flag",
    "type_hint",
]

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
        return (
            " Synonyms of one class go in one flat list (['cat', 'kitty']) or in a dict's 'synonyms' "
            "({'name': 'cat', 'synonyms': ['kitty']})."
        )
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
