"""
The vocabulary layer: the `Vocabulary` type, the built-in vocabularies (COCO panoptic, 133 classes; ADE20K, 150
classes) and the class-name rules they share.

- `names`: how a class name is read (comma-separated synonyms, the first one the display name) and checked.
- `vocabulary`: `Vocabulary` (names, thing/stuff flags, dataset category ids; `thing_ids`, `stuff_ids`, `label_map`,
  `seen_mask`, `from_categories` / `to_categories`), `resolve_vocabulary` for user labels and preset names,
  `load_vocabulary` for the shipped presets.
"""

from .names import normalize_class_name, preview, shared_synonyms, split_synonyms, synonym_key, thing_flag, type_hint
from .vocabulary import (
    PRESET_ALIASES,
    VOCABULARY_PRESETS,
    CandidateLabels,
    Vocabulary,
    load_vocabulary,
    resolve_vocabulary,
    seen_class_mask,
)


__all__ = [
    "CandidateLabels",
    "PRESET_ALIASES",
    "VOCABULARY_PRESETS",
    "Vocabulary",
    "load_vocabulary",
    "normalize_class_name",
    "preview",
    "resolve_vocabulary",
    "seen_class_mask",
    "shared_synonyms",
    "split_synonyms",
    "synonym_key",
    "thing_flag",
    "type_hint",
]
