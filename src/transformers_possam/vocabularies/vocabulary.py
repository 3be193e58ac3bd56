"""
`Vocabulary`: the one place that knows a vocabulary's classes, their thing/stuff flags, their dataset category ids
and which of them a model saw in training.

Every part of the package takes its vocabulary facts from here: the processor and the pipeline (`resolve_vocabulary`
for user labels, `thing_ids` / `stuff_ids` for post-processing, `seen_mask` for MASE), training and evaluation
(`Vocabulary.from_categories` for a dataset's category table, `label_map` for its annotations), the data preparation
script (`to_categories`) and the demos.

Class ids (class indices) are positions in the vocabulary, `0..K-1`; category ids are a dataset's own ids (COCO
panoptic's 1..200), which `label_map` translates.
"""

from __future__ import annotations

import csv
import difflib
import numbers
import re
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TypeAlias

import numpy as np
import torch

from .names import normalize_class_name, preview, shared_synonyms, split_synonyms, synonym_key, thing_flag, type_hint


__all__ = [
    "CandidateLabels",
    "PRESET_ALIASES",
    "VOCABULARY_PRESETS",
    "Vocabulary",
    "load_vocabulary",
    "resolve_vocabulary",
    "seen_class_mask",
]

# Shipped vocabularies: preset name -> file in this folder (columns: id, coco_category_id_or_empty, isthing, names).
VOCABULARY_PRESETS = {"coco_panoptic_133": "coco_panoptic_133.tsv", "ade20k_150": "ade20k_150.tsv"}
# What `candidate_labels` may name (case and surrounding spaces ignored).
PRESET_ALIASES = {
    "coco": "coco_panoptic_133",
    "coco_panoptic": "coco_panoptic_133",
    "coco_panoptic_133": "coco_panoptic_133",
    "ade20k": "ade20k_150",
    "ade20k_150": "ade20k_150",
    "ade": "ade20k_150",
}
# Keys a dict label may hold; anything else (`is_thing`, `isThing`, `label`) is an error, not ignored.
LABEL_KEYS = ("name", "synonyms", "isthing")
# Keys of COCO / detectron2 category dicts, accepted so their category lists can be passed as they are. A label list
# ignores them (class ids are positions in the list); `Vocabulary.from_categories` keeps `id` as the category id.
IGNORED_CATEGORY_KEYS = ("id", "color", "supercategory")


@dataclass(frozen=True)
class Vocabulary:
    """
    A list of classes, each with synonyms, its thing/stuff flag and its dataset category id.

    Construction checks and canonicalizes: `names` becomes a tuple of `normalize_class_name` forms, `is_thing` a
    tuple of `bool` (`thing_flag` rules), one per name, `category_ids` a tuple of distinct `int`s, one per name
    (left empty: the class indices `0..K-1`). Two classes that CLIP would read alike are a `ValueError`: the same
    synonyms (compared by `synonym_key`) or one synonym in both, since each class scores its best synonym and identical
    text gives identical embeddings.

    Build one with `resolve_vocabulary` (user labels or a preset name), `load_vocabulary` (a shipped preset) or
    `Vocabulary.from_categories` (a dataset's COCO-style category table).

    Raises:
        TypeError: `names` / `is_thing` / `category_ids` not a list or tuple, or an entry of the wrong type.
        ValueError: no class, different lengths, a malformed name, two classes sharing a synonym, or a category id
            given twice.
    """

    names: tuple[str, ...]  # comma-joined synonyms per class
    is_thing: tuple[bool, ...]
    category_ids: tuple[int, ...] = ()  # the dataset's id of each class; () means the class indices

    def __post_init__(self) -> None:
        for field, value in (("names", self.names), ("is_thing", self.is_thing), ("category_ids", self.category_ids)):
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
        if self.category_ids and len(self.category_ids) != len(self.names):
            raise ValueError(
                f"Vocabulary has {len(self.names)} names but {len(self.category_ids)} category_ids: give one id per name "
                "(or none, for ids equal to the class indices)."
            )
        names = tuple(normalize_class_name(name, f"label {index}") for index, name in enumerate(self.names))
        flags = tuple(thing_flag(flag, f"is_thing[{index}]") for index, flag in enumerate(self.is_thing))
        category_ids = (
            tuple(category_id(value, f"category_ids[{index}]") for index, value in enumerate(self.category_ids))
            if self.category_ids
            else tuple(range(len(names)))
        )
        # frozen dataclass: canonical values are stored once, here, so equal vocabularies compare and hash equal
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "is_thing", flags)
        object.__setattr__(self, "category_ids", category_ids)
        check_distinct_categories(category_ids)
        check_distinct_classes(names)

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping[str, object]], argument: str = "categories") -> Vocabulary:
        """
        The vocabulary of a COCO-style category table: a list of `{"id": int, "name": str, "isthing": bool or 0 / 1}`
        in class-index order (COCO's `color` / `supercategory` are accepted and ignored; a missing `isthing` counts as
        a thing, as for labels). Class index i is `categories[i]`; its `id` becomes `category_ids[i]`.

        `argument` names the table in error messages (`categories[3]['id'] = ...`).

        Raises:
            TypeError: not an ordered collection, an entry that is not a dict, an id that is not an integer, a name or
                flag of the wrong type (the label rules of `resolve_vocabulary`).
            ValueError: an empty table, an entry without `id` or `name` or with another key, an id given twice, a
                malformed name, two classes CLIP reads alike.
        """
        entries = label_entries(categories, argument)
        names, flags, ids = [], [], []
        for index, category in enumerate(entries):
            where = f"{argument}[{index}]"
            if not isinstance(category, Mapping):
                raise TypeError(
                    f"{where} = {preview(category)} has type {type(category).__name__}; a category is a dict "
                    "{'id': int, 'name': str, 'isthing': bool}."
                )
            if "id" not in category:
                raise ValueError(
                    f"{where} = {preview(category)} has no 'id': a category is {{'id': int, 'name': str, 'isthing': bool}}."
                )
            name, flag = parse_label(category, where)
            names.append(name)
            flags.append(True if flag is None else flag)
            ids.append(category_id(category["id"], f"{where}['id']"))
        duplicate = first_repeat(ids)
        if duplicate is not None:
            first, second = duplicate
            raise ValueError(
                f"{argument}[{second}]['id'] = {ids[second]} repeats {argument}[{first}]['id']: every category needs its "
                "own id."
            )
        return cls(names=tuple(names), is_thing=tuple(flags), category_ids=tuple(ids))

    def to_categories(self) -> list[dict]:
        """The category table of this vocabulary: `[{"id", "name", "isthing": 1 or 0}]` (COCO's JSON convention)."""
        return [
            {"id": identifier, "name": name, "isthing": int(thing)}
            for identifier, name, thing in zip(self.category_ids, self.names, self.is_thing)
        ]

    @property
    def synonyms(self) -> list[list[str]]:
        return [split_synonyms(name) for name in self.names]

    @property
    def display_names(self) -> list[str]:
        """The first synonym of each class."""
        return [syns[0] for syns in self.synonyms]

    @property
    def thing_ids(self) -> list[int]:
        """Class indices of the thing classes (instance post-processing's `thing_label_ids`)."""
        return [index for index, thing in enumerate(self.is_thing) if thing]

    @property
    def stuff_ids(self) -> list[int]:
        """Class indices of the stuff classes (panoptic post-processing's `label_ids_to_fuse`)."""
        return [index for index, thing in enumerate(self.is_thing) if not thing]

    @property
    def label_map(self) -> dict[int, int]:
        """Dataset category id -> class index (the image processor's `label_map`, Mask2Former's id map)."""
        return {identifier: index for index, identifier in enumerate(self.category_ids)}

    def seen_mask(self, training_vocabulary: CandidateLabels) -> torch.Tensor:
        """
        FC-CLIP's category-overlap rule: class c is seen when any of its synonyms equals (exact string) any synonym of
        any training class. ADE20K-150 against COCO-133 gives 64 seen / 86 unseen. Returns `(K,)` bool.

        `training_vocabulary` is a `Vocabulary`, a preset name or a list of class names / `{"name", "isthing"}` dicts
        (a model config's `training_vocabulary`); its entries follow the label rules of `resolve_vocabulary`
        (`TypeError` / `ValueError` naming `training_vocabulary[index]`), but a synonym shared by training classes is
        allowed (it only widens the seen set).
        """
        training = training_synonyms(training_vocabulary)
        return torch.tensor(
            [any(synonym in training for synonym in synonyms) for synonyms in self.synonyms], dtype=torch.bool
        )

    def __len__(self) -> int:
        return len(self.names)


# What `candidate_labels` may be (resolve_vocabulary checks the rest at run time): a preset name or a string of
# comma-separated classes, a Vocabulary, or an ordered collection of labels (a str, a list of synonyms, a dict).
CandidateLabels: TypeAlias = str | Vocabulary | Iterable[str | Sequence[str] | Mapping[str, object]]


def category_id(value: object, where: str) -> int:
    """A dataset category id as an `int` (Python or numpy integers; not a bool, float or string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} = {preview(value)} has type {type(value).__name__}; a category id is an integer.")
    return int(value)


def first_repeat(values: Sequence[Hashable]) -> tuple[int, int] | None:
    """`(first position, repeating position)` of the first value that occurs twice, or None."""
    position: dict = {}
    for index, value in enumerate(values):
        if value in position:
            return position[value], index
        position[value] = index
    return None


def check_distinct_categories(category_ids: Sequence[int]) -> None:
    duplicate = first_repeat(category_ids)
    if duplicate is not None:
        first, second = duplicate
        raise ValueError(
            f"Vocabulary.category_ids[{second}] = {category_ids[second]} repeats category_ids[{first}]: every class "
            "needs its own category id."
        )


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
    """
    Load a shipped vocabulary by preset name (``"coco_panoptic_133"`` or ``"ade20k_150"``). Its category ids are the
    dataset's: COCO panoptic's 1..200 for COCO-133; for ADE20K-150, the class indices 0..149 (the ids of ADE20K's
    panoptic categories, as `training/prepare_panoptic_parquet.py --vocabulary ade20k` reads them).
    """
    if preset not in VOCABULARY_PRESETS:
        raise ValueError(f"Unknown vocabulary preset {preset!r}; choose one of {sorted(VOCABULARY_PRESETS)}.")
    text = (
        resources.files(__name__.rpartition(".")[0]).joinpath(VOCABULARY_PRESETS[preset]).read_text(encoding="utf-8")
    )
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    rows.sort(key=lambda row: int(row["id"]))
    if [int(row["id"]) for row in rows] != list(range(len(rows))):
        raise ValueError(f"Vocabulary file of {preset!r} does not hold contiguous ids 0..N-1.")
    coco_ids = [row["coco_category_id_or_empty"] for row in rows]
    if any(coco_ids) and not all(coco_ids):
        raise ValueError(f"Vocabulary file of {preset!r} gives a COCO category id to some classes only.")
    return Vocabulary(
        names=tuple(row["names"] for row in rows),
        is_thing=tuple(row["isthing"] == "1" for row in rows),
        category_ids=tuple(int(identifier) for identifier in coco_ids) if all(coco_ids) else (),
    )


def resolve_vocabulary(candidate_labels: CandidateLabels, is_thing: Sequence[bool] | None = None) -> Vocabulary:
    """
    The `Vocabulary` that `candidate_labels` describes; class ids are positions in it.

    Accepted forms (the reasons are in docs/design.md, "Zero-shot label forms"):

    - a `str`:
      - a preset name (case and surrounding spaces ignored): `"coco"`, `"coco_panoptic"`, `"coco_panoptic_133"`,
        `"ade20k"`, `"ade"`, `"ade20k_150"`;
      - otherwise comma-separated **classes**, as transformers' zero-shot pipelines read `candidate_labels`
        (`"cat, dog"` -> 2 classes `["cat", "dog"]`; `"cat"` -> 1 class). An empty class (`"cat,,dog"`, `"cat,"`)
        is a `ValueError` (transformers' zero-shot-classification drops it silently). A single name that looks like
        a misspelt preset (`"coco133"`, `"ade_20k"`: a preset's letters, or digits / underscores close to a preset
        name) is a `ValueError` naming both writings (the preset, or `["coco133"]` for a class of that name).
    - a `Vocabulary` (returned as is).
    - an ordered collection of labels, one per class: a list, tuple, 1-D numpy array, generator or other iterator (read
      once). Each label is
      - a `str`: one class. A comma inside it keeps FC-CLIP's meaning, synonyms of one class
        (`"person,people"`), with a `UserWarning` saying how to write each meaning, because transformers' users
        expect separate classes there;
      - a list / tuple of `str`: the synonyms of one class, the first one its display name (`["cat", "kitty"]`); a
        synonym holding a comma is a `ValueError`;
      - a dict `{"name": str, "synonyms": [str, ...], "isthing": bool}` (`synonyms`, `isthing` optional). Its `name`
        may hold comma-joined synonyms, the form of FC-CLIP's and COCO's category tables (no warning: a dict is one
        class); COCO's `id`, `color`, `supercategory` are accepted and ignored.
      Unmarked classes count as things (never fused).

    Label rules: synonyms are stripped of surrounding whitespace (`" cat , kitty "` -> `"cat,kitty"`, FC-CLIP's
    `", "` rule generalized); a synonym may repeat inside one class (harmless: each class scores its best synonym).
    Any other text is kept as written: Unicode, emoji, right-to-left scripts, braces (`"{x}"` never reaches a format
    field, see `fill_templates`). Token-level problems (the 77-token cut) are checked by
    `PosSAMProcessor.encode_vocabulary`, which has the tokenizer.
    `isthing` / `is_thing` entries must be `True` / `False` (numpy bools too) or the integers 1 / 0 (COCO's JSON).

    Args:
        candidate_labels: see above.
        is_thing: optional thing/stuff flag per class, for labels without `isthing` keys.

    Raises:
        TypeError: a wrong type: `None`, a bare dict (wrap it in a list), a set (unordered: class ids would be
            arbitrary), bytes, a multi-dimensional array, a non-iterable; a label that is neither `str`, list / tuple
            of `str` nor dict (None, a number, bytes, a list nested twice); a non-`str` `name` or synonym; `synonyms`
            not a list; an `isthing` that is not a bool or 0/1 (e.g. `"false"`, None, 1.0); `is_thing` not a list.
        ValueError: an unknown-looking preset; an empty vocabulary; a dict without `name` or with another key (e.g.
            `is_thing`); a blank name (`""`, `"  "`, `",,"`); an empty synonym (`"cat,,dog"`, `"cat,"`) or class; a
            comma inside a synonym of a synonym list; a control character inside a synonym (line break, tab); two
            labels CLIP reads alike (case, spacing and Unicode composition ignored: `"cat"` / `"Cat"`) or one synonym
            in two labels (`"cat"` / `"cat,kitty"`), whose message contains "Duplicate"; an integer flag other than
            0 / 1; `is_thing` of the wrong length or given with a preset, a `Vocabulary` or labels that already hold
            `isthing`.
    Every message names the entry (`candidate_labels[index] = value`) and says what to pass instead.
    """
    if isinstance(candidate_labels, Vocabulary):
        if is_thing is not None:
            raise ValueError("is_thing cannot be combined with a Vocabulary, which already holds its flags.")
        return candidate_labels
    if isinstance(candidate_labels, str):
        preset = PRESET_ALIASES.get(candidate_labels.strip().lower())
        if preset is not None:
            if is_thing is not None:
                raise ValueError(
                    f"is_thing cannot be combined with the preset {candidate_labels!r}, which fixes its flags."
                )
            return load_vocabulary(preset)
        labels: list = split_class_string(candidate_labels, "candidate_labels")
    else:
        labels = label_entries(candidate_labels, "candidate_labels")
    names: list[str] = []
    flags: list[bool | None] = []
    for index, label in enumerate(labels):
        name, flag = parse_label(label, f"candidate_labels[{index}]", warn_commas=True)
        names.append(name)
        flags.append(flag)
    if is_thing is not None:
        return Vocabulary(names=tuple(names), is_thing=tuple(override_thing_flags(flags, is_thing, labels)))
    return Vocabulary(names=tuple(names), is_thing=tuple(True if flag is None else flag for flag in flags))


def split_class_string(text: str, argument: str) -> list[str]:
    """
    A string of comma-separated classes -> one name per class, each stripped (transformers' zero-shot reading:
    `ZeroShotClassificationArgumentHandler._parse_labels`, `ZeroShotObjectDetectionPipeline.preprocess`). An empty
    class and a single name that looks like a misspelt preset are `ValueError`s (see `resolve_vocabulary`).
    """
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ValueError(
            f"{argument}={preview(text)} names no class: pass classes separated by commas ('cat,dog'), a list "
            "(['cat', 'dog']) or a preset such as 'coco' or 'ade20k'."
        )
    if len(parts) == 1:
        close = misspelt_presets(text)
        if close:
            raise ValueError(
                f"{argument}={preview(text)} is not a preset ({sorted(PRESET_ALIASES)}) but looks like one: for the "
                f"preset, write {' or '.join(repr(name) for name in close)}; for one class named {text.strip()!r}, "
                f"pass a list: [{text.strip()!r}]."
            )
    for position, part in enumerate(parts):
        if not part:
            raise ValueError(
                f"{argument}={preview(text)} has an empty class (part {position} between commas): in a string, commas "
                "separate classes ('cat,dog' is 2 classes, as in transformers' zero-shot pipelines); remove the stray "
                "comma."
            )
    return parts


def misspelt_presets(text: str) -> list[str]:
    """
    The preset aliases a single class name probably misspells: the same letters (`"coco133"`, `"COCO-panoptic"`), or
    a name with digits or underscores close to an alias (`"ade_20k"`). Plain words (`"made"`, `"cocoa"`) are classes.
    """
    key = text.strip().lower()
    letters = re.sub(r"[^a-z]", "", key)
    same_letters = [alias for alias in PRESET_ALIASES if re.sub(r"[^a-z]", "", alias) == letters]
    if same_letters:
        return same_letters[:3]
    if re.search(r"[\d_]", key):
        return difflib.get_close_matches(key, PRESET_ALIASES, n=3, cutoff=0.6)
    return []


def seen_class_mask(vocabulary: CandidateLabels, training_vocabulary: CandidateLabels) -> torch.Tensor:
    """`resolve_vocabulary(vocabulary).seen_mask(training_vocabulary)`: `(K,)` bool (see `Vocabulary.seen_mask`)."""
    return resolve_vocabulary(vocabulary).seen_mask(training_vocabulary)


def preset_vocabulary(preset: str, argument: str) -> Vocabulary:
    """The shipped vocabulary of a preset alias (case and surrounding spaces ignored); `ValueError` otherwise."""
    key = preset.strip().lower()
    if key in PRESET_ALIASES:
        return load_vocabulary(PRESET_ALIASES[key])
    close = difflib.get_close_matches(key, PRESET_ALIASES, n=3, cutoff=0.6)
    suggestion = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    raise ValueError(
        f"{argument}={preview(preset)} is not a preset ({sorted(PRESET_ALIASES)}).{suggestion} For your own "
        "classes pass a list of class names: ['person', 'car'] (synonyms of a class as a list: [['person', 'people'], "
        "'car'])."
    )


def label_entries(candidate_labels: object, argument: str) -> list:
    """The labels of an ordered collection as a list; `TypeError` / `ValueError` for any other form (see above)."""
    if candidate_labels is None:
        raise TypeError(f"{argument} is None: pass a list of labels or a preset name such as 'coco' or 'ade20k'.")
    if isinstance(candidate_labels, (bytes, bytearray)):
        raise TypeError(f"{argument} is {type(candidate_labels).__name__}: decode it, or pass a list of str labels.")
    if isinstance(candidate_labels, Mapping):
        raise TypeError(
            f"{argument} is a single dict {preview(candidate_labels)}: pass a list of labels, e.g. "
            "[{'name': 'sky', 'isthing': False}, 'car']."
        )
    if isinstance(candidate_labels, AbstractSet):
        raise TypeError(
            f"{argument} is a {type(candidate_labels).__name__}, which has no order, so class ids would be arbitrary: "
            "pass a list (e.g. sorted(labels))."
        )
    if isinstance(candidate_labels, np.ndarray) and candidate_labels.ndim != 1:
        raise TypeError(
            f"{argument} is a {candidate_labels.ndim}-D array of shape {candidate_labels.shape}: pass a 1-D list of labels."
        )
    if not isinstance(candidate_labels, Iterable):
        raise TypeError(
            f"{argument} = {preview(candidate_labels)} has type {type(candidate_labels).__name__}: pass a list of labels "
            "or a preset name such as 'coco'."
        )
    labels = list(candidate_labels)
    if not labels:
        once = " (an exhausted generator or iterator?)" if isinstance(candidate_labels, Iterator) else ""
        raise ValueError(
            f"{argument} is empty{once}: give at least one label (or a preset such as 'coco' or 'ade20k')."
        )
    return labels


def parse_label(label: object, where: str, warn_commas: bool = False) -> tuple[str, bool | None]:
    """
    `(canonical name, isthing or None when unmarked)` of one label (forms: `resolve_vocabulary`); errors name `where`
    and the value. `warn_commas`: warn that a comma inside a `str` label is read as FC-CLIP's synonyms (user labels);
    stored forms (a config's `training_vocabulary`, category tables) hold comma-joined synonyms by definition.
    """
    if isinstance(label, Mapping):
        unknown = [key for key in label if key not in LABEL_KEYS and key not in IGNORED_CATEGORY_KEYS]
        if unknown:
            raise ValueError(
                f"{where} = {preview(label)} has the unknown key(s) {unknown}: a dict label holds {list(LABEL_KEYS)} "
                f"(COCO's {list(IGNORED_CATEGORY_KEYS)} are accepted and ignored), e.g. "
                "{'name': 'cat', 'synonyms': ['kitty'], 'isthing': True}."
            )
        if "name" not in label:
            raise ValueError(
                f"{where} = {preview(label)} is a dict without 'name': use {{'name': 'sky', 'isthing': False}}."
            )
        name = normalize_class_name(label["name"], f"{where}['name']")
        if "synonyms" in label:
            name = ",".join([name, *synonym_list(label["synonyms"], f"{where}['synonyms']")])
        flag = thing_flag(label["isthing"], f"{where}['isthing']") if "isthing" in label else None
        return name, flag
    if isinstance(label, str):
        name = normalize_class_name(label, where)
        if warn_commas and "," in name:
            warn_comma_label(name, where)
        return name, None
    if isinstance(label, (list, tuple)):
        return ",".join(synonym_list(label, where)), None
    raise TypeError(
        f"{where} = {preview(label)} has type {type(label).__name__}; a label is a str ('cat'), a list of synonyms "
        f"(['cat', 'kitty']) or a dict {{'name': str, 'synonyms': [str], 'isthing': bool}}.{type_hint(label)}"
    )


def synonym_list(synonyms: object, where: str) -> list[str]:
    """The synonyms of an explicit list (`["cat", "kitty"]`): each a `str`, not blank, without a comma."""
    if isinstance(synonyms, str) or not isinstance(synonyms, (list, tuple)):
        raise TypeError(
            f"{where} = {preview(synonyms)} has type {type(synonyms).__name__}; synonyms are a list of str, e.g. "
            "['cat', 'kitty']."
        )
    if not synonyms:
        raise ValueError(f"{where} is an empty list of synonyms: give at least one name, e.g. ['cat', 'kitty'].")
    names = []
    for position, synonym in enumerate(synonyms):
        entry = f"{where}[{position}]"
        if not isinstance(synonym, str):
            raise TypeError(
                f"{entry} = {preview(synonym)} has type {type(synonym).__name__}; a synonym is a str.{type_hint(synonym)}"
            )
        if "," in synonym:
            parts = [part.strip() for part in synonym.split(",")]
            raise ValueError(
                f"{entry} = {preview(synonym)} holds a comma, but in a list of synonyms each entry is one synonym: "
                f"write {parts!r} for synonyms of this class, or list separate classes as separate labels."
            )
        names.append(normalize_class_name(synonym, entry))
    return names


def warn_comma_label(name: str, where: str) -> None:
    """The warning for a `str` label holding commas: read as synonyms (FC-CLIP), with every writing spelled out."""
    synonyms = name.split(",")
    warnings.warn(
        f"{where} = {preview(name)} holds commas and is read as ONE class with the synonyms {synonyms!r} (FC-CLIP's "
        f"convention). To say so explicitly (and silence this warning) write that class as {synonyms!r} or "
        f"{{'name': {synonyms[0]!r}, 'synonyms': {synonyms[1:]!r}}}. If you meant {len(synonyms)} classes, give "
        f"them as separate labels ({synonyms!r} as the whole label list) or as one string {name!r} (commas in a "
        "string separate classes, as in transformers' zero-shot pipelines).",
        UserWarning,
        stacklevel=4,
    )


def override_thing_flags(flags: list[bool | None], is_thing: object, labels: list) -> list[bool]:
    """`is_thing` as the flags, after checking it is one bool per label and no label carries its own `isthing`."""
    if isinstance(is_thing, (str, bytes, Mapping, AbstractSet)) or not isinstance(is_thing, (Sequence, np.ndarray)):
        raise TypeError(
            f"is_thing must be a list of bools (one per label), got a {type(is_thing).__name__}: {preview(is_thing)}."
        )
    if len(is_thing) != len(flags):
        raise ValueError(f"is_thing has {len(is_thing)} entries for {len(flags)} labels: give one flag per label.")
    marked = next((index for index, flag in enumerate(flags) if flag is not None), None)
    if marked is not None:
        raise ValueError(
            f"candidate_labels[{marked}] = {preview(labels[marked])} has its own 'isthing' and is_thing is given too: "
            "use one of the two."
        )
    return [thing_flag(flag, f"is_thing[{index}]") for index, flag in enumerate(is_thing)]


def training_synonyms(training_vocabulary: CandidateLabels) -> set[str]:
    """Every synonym of a training vocabulary (`Vocabulary.seen_mask`'s forms; shared synonyms allowed)."""
    if isinstance(training_vocabulary, Vocabulary):
        training_names: Sequence[str] = training_vocabulary.names
    elif isinstance(training_vocabulary, str):
        training_names = preset_vocabulary(training_vocabulary, "training_vocabulary").names
    else:
        entries = label_entries(training_vocabulary, "training_vocabulary")
        training_names = [
            parse_label(entry, f"training_vocabulary[{index}]")[0] for index, entry in enumerate(entries)
        ]
    return {synonym for name in training_names for synonym in split_synonyms(name)}
