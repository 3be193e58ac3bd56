"""PosSAMProcessor: image processor + CLIP tokenizer; turns a vocabulary into prompt tokens (like OneFormerProcessor)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .vocabularies import Vocabulary, load_vocabulary, split_synonyms

__all__ = ["PosSAMProcessor", "VILD_TEMPLATES", "resolve_vocabulary", "seen_class_mask"]

# FC-CLIP's 14 ViLD prompt templates (fcclip/fcclip.py::VILD_PROMPT); punctuation matters.
VILD_TEMPLATES = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

PRESET_ALIASES = {
    "coco": "coco_panoptic_133",
    "coco_panoptic": "coco_panoptic_133",
    "coco_panoptic_133": "coco_panoptic_133",
    "ade20k": "ade20k_150",
    "ade20k_150": "ade20k_150",
    "ade": "ade20k_150",
}


def resolve_vocabulary(candidate_labels, is_thing: Sequence[bool] | None = None) -> Vocabulary:
    """
    A vocabulary from: a preset name (`"coco"`, `"ade20k"`, ...), a `Vocabulary`, or a list whose entries are class
    names (comma-separated synonyms, e.g. `"person,people,child"`) or dicts `{"name": ..., "isthing": bool}`.
    Unmarked classes count as things (never fused). Raises `ValueError` on an empty list, a blank label or a
    duplicate label.
    """
    if isinstance(candidate_labels, Vocabulary):
        return candidate_labels
    if isinstance(candidate_labels, str):
        key = candidate_labels.strip().lower()
        if key in PRESET_ALIASES:
            return load_vocabulary(PRESET_ALIASES[key])
        raise ValueError(
            f"candidate_labels={candidate_labels!r} is not a preset ({sorted(PRESET_ALIASES)}); pass a list of labels "
            "(inside one label, commas separate synonyms: ['person,people', 'car'])."
        )
    labels = list(candidate_labels) if candidate_labels is not None else []
    if not labels:
        raise ValueError("candidate_labels is empty: give at least one label (or a preset such as 'coco' or 'ade20k').")
    names, flags = [], []
    for index, label in enumerate(labels):
        if isinstance(label, dict):
            if "name" not in label:
                raise ValueError(f"Label {index} is a dict without 'name': use {{'name': 'sky', 'isthing': False}}.")
            name, thing = label["name"], bool(label.get("isthing", True))
        elif isinstance(label, str):
            name, thing = label, True
        else:
            raise ValueError(f"Label {index} is a {type(label).__name__}; labels are strings or {{'name', 'isthing'}} dicts.")
        if not name.strip() or not any(part.strip() for part in name.split(",")):
            raise ValueError(f"Label {index} ({name!r}) is blank: every label needs a name.")
        synonyms = split_synonyms(name)
        names.append(",".join(synonyms))
        flags.append(thing)
    seen = {}
    for index, name in enumerate(names):
        key = name.lower()
        if key in seen:
            raise ValueError(f"Duplicate label {labels[index]!r} (positions {seen[key]} and {index}): labels must be unique.")
        seen[key] = index
    if is_thing is not None:
        if len(is_thing) != len(names):
            raise ValueError(f"is_thing has {len(is_thing)} entries for {len(names)} labels.")
        flags = [bool(flag) for flag in is_thing]
    return Vocabulary(names=tuple(names), is_thing=tuple(flags))


def seen_class_mask(vocabulary: Vocabulary, training_vocabulary: Sequence[str]) -> torch.Tensor:
    """
    FC-CLIP's category-overlap rule: class c is seen when any of its synonyms equals (exact string) any synonym of any
    training class. ADE20K-150 against COCO-133 gives 64 seen / 86 unseen. Returns `(K,)` bool.
    """
    training_synonyms = {synonym for name in training_vocabulary for synonym in split_synonyms(name)}
    return torch.tensor([any(s in training_synonyms for s in synonyms) for synonyms in vocabulary.synonyms], dtype=torch.bool)


class PosSAMProcessor(ProcessorMixin):
    r"""
    Wraps a [`PosSAMImageProcessor`] and CLIP's tokenizer.

    `processor(images, candidate_labels=...)` returns the image processor's outputs plus the tokenized vocabulary:
    `input_ids` / `attention_mask` of shape `(K, S, T, L)` (K classes, S synonym slots, T = 14 ViLD templates, L
    tokens) and `synonym_mask` `(K, S)`; a class with fewer synonyms than S repeats its first synonym in the padding
    slots, which `synonym_mask` marks. Post-processing methods are forwarded to the image processor; given
    `candidate_labels`, they also fill `label_ids_to_fuse` (the stuff classes) and, with `training_vocabulary`, the
    seen-class mask for MASE.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    templates = VILD_TEMPLATES

    def __call__(self, images=None, candidate_labels=None, annotations=None, return_tensors="pt", **kwargs) -> BatchFeature:
        if images is None and candidate_labels is None:
            raise ValueError("Give images, candidate_labels, or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, annotations=annotations, return_tensors=return_tensors, **kwargs))
        if candidate_labels is not None:
            data.update(self.encode_vocabulary(candidate_labels))
        return BatchFeature(data=data)

    def encode_vocabulary(self, candidate_labels) -> BatchFeature:
        """Tokenize every (class, synonym, template) prompt in one call: `input_ids`, `attention_mask`, `synonym_mask`."""
        vocabulary = resolve_vocabulary(candidate_labels)
        synonyms = vocabulary.synonyms
        slots = max(len(names) for names in synonyms)
        padded = [names + [names[0]] * (slots - len(names)) for names in synonyms]
        prompts = [template.format(name) for names in padded for name in names for template in self.templates]
        tokens = self.tokenizer(prompts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
        shape = (len(synonyms), slots, len(self.templates), -1)
        synonym_mask = torch.tensor([[slot < len(names) for slot in range(slots)] for names in synonyms])
        return BatchFeature(
            data={
                "input_ids": tokens["input_ids"].view(shape),
                "attention_mask": tokens["attention_mask"].view(shape),
                "synonym_mask": synonym_mask,
            }
        )

    @staticmethod
    def vocabulary(candidate_labels) -> Vocabulary:
        return resolve_vocabulary(candidate_labels)

    @staticmethod
    def seen_mask(candidate_labels, training_vocabulary: Sequence[str]) -> torch.Tensor:
        return seen_class_mask(resolve_vocabulary(candidate_labels), training_vocabulary)

    def _vocabulary_defaults(self, kwargs: dict, for_instances: bool = False) -> dict:
        candidate_labels = kwargs.pop("candidate_labels", None)
        training_vocabulary = kwargs.pop("training_vocabulary", None)
        if candidate_labels is None:
            return kwargs
        vocabulary = resolve_vocabulary(candidate_labels)
        if training_vocabulary is not None and kwargs.get("seen_mask") is None:
            kwargs["seen_mask"] = seen_class_mask(vocabulary, training_vocabulary)
        if for_instances:
            kwargs.setdefault("thing_label_ids", [i for i, thing in enumerate(vocabulary.is_thing) if thing])
        else:
            kwargs.setdefault("label_ids_to_fuse", [i for i, thing in enumerate(vocabulary.is_thing) if not thing])
        return kwargs

    def post_process_panoptic_segmentation(self, *args, **kwargs):
        return self.image_processor.post_process_panoptic_segmentation(*args, **self._vocabulary_defaults(kwargs))

    def post_process_instance_segmentation(self, *args, **kwargs):
        return self.image_processor.post_process_instance_segmentation(*args, **self._vocabulary_defaults(kwargs, True))

    def post_process_semantic_segmentation(self, *args, **kwargs):
        kwargs = self._vocabulary_defaults(kwargs)
        kwargs.pop("label_ids_to_fuse", None)
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)
