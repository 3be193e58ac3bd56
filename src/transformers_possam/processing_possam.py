"""PosSAMProcessor: image processor + CLIP tokenizer; turns a vocabulary into prompt tokens (like OneFormerProcessor)."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .vocabularies import (
    Vocabulary,
    load_vocabulary,
    normalize_class_name,
    preview,
    shared_synonyms,
    split_synonyms,
    thing_flag,
    type_hint,
)


__all__ = ["PosSAMProcessor", "VILD_TEMPLATES", "fill_templates", "resolve_vocabulary", "seen_class_mask"]

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
# Keys a dict label may hold; anything else (`is_thing`, `isThing`, `label`) is an error, not ignored.
LABEL_KEYS = ("name", "isthing")
# Keys of COCO / detectron2 category dicts, accepted so their category lists can be passed as they are, and ignored:
# class ids are positions in the list (a category's `id` is its dataset id, which `label_map`s translate).
IGNORED_CATEGORY_KEYS = ("id", "color", "supercategory")
# CLIP's text context: prompts longer than this are truncated by the tokenizer.
CLIP_CONTEXT_LENGTH = 77
# What `candidate_labels` may be (resolve_vocabulary checks the rest at run time).
CandidateLabels = str | Vocabulary | Iterable[str | Mapping[str, object]]


def resolve_vocabulary(candidate_labels: CandidateLabels, is_thing: Sequence[bool] | None = None) -> Vocabulary:
    """
    The `Vocabulary` that `candidate_labels` describes; class ids are positions in it.

    Accepted forms:

    - a preset name (`str`, case and surrounding spaces ignored): `"coco"`, `"coco_panoptic"`, `"coco_panoptic_133"`,
      `"ade20k"`, `"ade"`, `"ade20k_150"`. Any other string is a `ValueError` (with the closest presets), never a
      one-class vocabulary: a single label goes in a list, `["cat"]`.
    - a `Vocabulary` (returned as is).
    - an ordered collection of labels: a list, tuple, 1-D numpy array, generator or other iterator (read once).
      Each label is a `str` of comma-separated synonyms (`"person,people"`) or a dict `{"name": str, "isthing": bool}`
      (`isthing` optional). Unmarked classes count as things (never fused).

    Label rules: synonyms are stripped of surrounding whitespace (`" cat , kitty "` -> `"cat,kitty"`, FC-CLIP's
    `", "` rule generalized); a synonym may repeat inside one class (harmless: each class scores its best synonym).
    Any other text is kept as written: Unicode, emoji, right-to-left scripts, braces (`"{x}"` never reaches a format
    field, see `fill_templates`). Token-level problems (the 77-token cut) are checked by
    `PosSAMProcessor.encode_vocabulary`, which has the tokenizer.
    `isthing` / `is_thing` entries must be `True` / `False` (numpy bools too) or the integers 1 / 0 (COCO's JSON).

    Args:
        candidate_labels: see above.
        is_thing: optional thing/stuff flag per label, for a list of labels without `isthing` keys.

    Raises:
        TypeError: a wrong type: `None`, a bare dict (wrap it in a list), a set (unordered: class ids would be
            arbitrary), bytes, a multi-dimensional array, a non-iterable; a label that is neither `str` nor dict
            (None, a number, bytes, a nested list); a non-`str` `name`; an `isthing` that is not a bool or 0/1
            (e.g. `"false"`, None, 1.0); `is_thing` not a list.
        ValueError: an unknown preset; an empty vocabulary; a dict without `name` or with another key (e.g.
            `is_thing`); a blank name (`""`, `"  "`, `",,"`); an empty synonym (`"cat,,dog"`, `"cat,"`); a control
            character inside a synonym (line break, tab); two labels CLIP reads alike (case, spacing and Unicode
            composition ignored: `"cat"` / `"Cat"`) or one synonym in two labels (`"cat"` / `"cat,kitty"`), whose
            message contains "Duplicate"; an integer flag other than 0 / 1; `is_thing` of the wrong length or given
            with a preset, a `Vocabulary` or dicts that already hold `isthing`.
    Every message names the entry (`candidate_labels[index] = value`) and says what to pass instead.
    """
    if isinstance(candidate_labels, Vocabulary):
        if is_thing is not None:
            raise ValueError("is_thing cannot be combined with a Vocabulary, which already holds its flags.")
        return candidate_labels
    if isinstance(candidate_labels, str):
        if is_thing is not None:
            raise ValueError(
                f"is_thing cannot be combined with the preset {candidate_labels!r}, which fixes its flags."
            )
        return preset_vocabulary(candidate_labels, "candidate_labels")
    labels = label_entries(candidate_labels, "candidate_labels")
    names, flags = [], []
    for index, label in enumerate(labels):
        name, flag = parse_label(label, f"candidate_labels[{index}]")
        names.append(name)
        flags.append(flag)
    if is_thing is not None:
        flags = override_thing_flags(flags, is_thing, labels)
    return Vocabulary(names=tuple(names), is_thing=tuple(True if flag is None else flag for flag in flags))


def preset_vocabulary(preset: str, argument: str) -> Vocabulary:
    """The shipped vocabulary of a preset alias (case and surrounding spaces ignored); `ValueError` otherwise."""
    key = preset.strip().lower()
    if key in PRESET_ALIASES:
        return load_vocabulary(PRESET_ALIASES[key])
    close = difflib.get_close_matches(key, PRESET_ALIASES, n=3, cutoff=0.6)
    suggestion = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    raise ValueError(
        f"{argument}={preview(preset)} is not a preset ({sorted(PRESET_ALIASES)}).{suggestion} For your own "
        "classes pass a list, even for one class: ['cat'] (inside one label, commas separate synonyms: "
        "['person,people', 'car'])."
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


def parse_label(label: object, where: str) -> tuple[str, bool | None]:
    """`(canonical name, isthing or None when unmarked)` of one label; errors name `where` and the value."""
    if isinstance(label, Mapping):
        unknown = [key for key in label if key not in LABEL_KEYS and key not in IGNORED_CATEGORY_KEYS]
        if unknown:
            raise ValueError(
                f"{where} = {preview(label)} has the unknown key(s) {unknown}: a dict label holds {list(LABEL_KEYS)} "
                f"(COCO's {list(IGNORED_CATEGORY_KEYS)} are accepted and ignored), e.g. {{'name': 'sky', 'isthing': False}}."
            )
        if "name" not in label:
            raise ValueError(
                f"{where} = {preview(label)} is a dict without 'name': use {{'name': 'sky', 'isthing': False}}."
            )
        name = normalize_class_name(label["name"], f"{where}['name']")
        flag = thing_flag(label["isthing"], f"{where}['isthing']") if "isthing" in label else None
        return name, flag
    if isinstance(label, str):
        return normalize_class_name(label, where), None
    raise TypeError(
        f"{where} = {preview(label)} has type {type(label).__name__}; a label is a str ('person,people': commas separate "
        f"synonyms) or a dict {{'name': str, 'isthing': bool}}.{type_hint(label)}"
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


def seen_class_mask(vocabulary: CandidateLabels, training_vocabulary: CandidateLabels) -> torch.Tensor:
    """
    FC-CLIP's category-overlap rule: class c is seen when any of its synonyms equals (exact string) any synonym of any
    training class. ADE20K-150 against COCO-133 gives 64 seen / 86 unseen. Returns `(K,)` bool.

    `vocabulary` is anything `resolve_vocabulary` takes. `training_vocabulary` is a `Vocabulary`, a preset name or a
    list of class names / `{"name", "isthing"}` dicts (a model config's `training_vocabulary`); its entries follow the
    label rules of `resolve_vocabulary` (`TypeError` / `ValueError` naming `training_vocabulary[index]`), but a
    synonym shared by training classes is allowed (it only widens the seen set).
    """
    vocabulary = resolve_vocabulary(vocabulary)
    if isinstance(training_vocabulary, Vocabulary):
        training_names = training_vocabulary.names
    elif isinstance(training_vocabulary, str):
        training_names = preset_vocabulary(training_vocabulary, "training_vocabulary").names
    else:
        entries = label_entries(training_vocabulary, "training_vocabulary")
        training_names = [
            parse_label(entry, f"training_vocabulary[{index}]")[0] for index, entry in enumerate(entries)
        ]
    training_synonyms = {synonym for name in training_names for synonym in split_synonyms(name)}
    return torch.tensor(
        [any(s in training_synonyms for s in synonyms) for synonyms in vocabulary.synonyms], dtype=torch.bool
    )


def fill_templates(synonym: str, templates: Sequence[str] = VILD_TEMPLATES) -> list[str]:
    """The prompts of one synonym. `str.format` never parses its arguments, so braces in a label stay text."""
    return [template.format(synonym) for template in templates]


# plain English that CLIP's BPE vocabulary covers: unknown tokens here mean the tokenizer lost its vocabulary
_TOKENIZER_PROBE = "a photo of a cat in the scene"


def _check_clip_tokenizer(tokenizer) -> None:
    """
    A CLIP tokenizer loaded without its vocabulary (a checkpoint folder missing `tokenizer.json`) has a handful of
    tokens and maps every word to the unknown token, so every label would embed identically: refuse it.
    """
    if tokenizer is None:
        return
    ids = tokenizer(_TOKENIZER_PROBE)["input_ids"]
    unknown = tokenizer.unk_token_id
    words = [
        token for token in ids if token not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ]
    if len(tokenizer) < 1000 or (unknown is not None and unknown in words):
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens and does not know plain English words ({_TOKENIZER_PROBE!r} -> {ids}): "
            "its vocabulary is missing (a checkpoint folder without tokenizer.json, or vocab.json + merges.txt). Copy "
            "the tokenizer files into the folder, or build one with transformers_possam.clip_tokenizer_from_bpe()."
        )


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
        _check_clip_tokenizer(self.tokenizer)

    templates = VILD_TEMPLATES

    def __call__(
        self, images=None, candidate_labels=None, annotations=None, return_tensors="pt", **kwargs
    ) -> BatchFeature:
        if images is None and candidate_labels is None:
            raise ValueError("Give images, candidate_labels, or both.")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, annotations=annotations, return_tensors=return_tensors, **kwargs))
        if candidate_labels is not None:
            data.update(self.encode_vocabulary(candidate_labels))
        return BatchFeature(data=data)

    def encode_vocabulary(self, candidate_labels: CandidateLabels) -> BatchFeature:
        """
        Tokenize every (class, synonym, template) prompt: `input_ids`, `attention_mask` `(K, S, T, L)` and
        `synonym_mask` `(K, S)`.

        `candidate_labels` follows `resolve_vocabulary` (same `TypeError` / `ValueError`). Prompts are cut to CLIP's
        77-token context: a label whose prompts are cut gets a `UserWarning` naming it, and two labels whose synonyms
        then read as the same tokens in every template (identical embeddings) are a `ValueError` naming both.
        """
        vocabulary = resolve_vocabulary(candidate_labels)
        synonyms = vocabulary.synonyms
        # each distinct synonym is tokenized once; padding slots and repeats reuse its rows
        unique_synonyms = list(dict.fromkeys(synonym for names in synonyms for synonym in names))
        num_templates = len(self.templates)
        prompts = [prompt for synonym in unique_synonyms for prompt in fill_templates(synonym, self.templates)]
        token_rows, truncated = self._tokenize_within_context(prompts)
        rows_of = {
            synonym: tuple(tuple(row) for row in token_rows[position * num_templates : (position + 1) * num_templates])
            for position, synonym in enumerate(unique_synonyms)
        }
        truncated_synonyms = {unique_synonyms[prompt_index // num_templates] for prompt_index in truncated}
        self._check_tokens_distinct(vocabulary, rows_of, truncated_synonyms)
        if truncated_synonyms:
            labels = [
                f"label {index} ({preview(name)})"
                for index, name in enumerate(vocabulary.names)
                if truncated_synonyms.intersection(synonyms[index])
            ]
            warnings.warn(
                f"CLIP reads at most {CLIP_CONTEXT_LENGTH} tokens, so the prompts of {', '.join(labels)} are cut short "
                "(the end of the label or of the template is lost): shorten these labels.",
                UserWarning,
                stacklevel=2,
            )

        padded = self.tokenizer.pad({"input_ids": token_rows}, padding="longest", return_tensors="pt")
        slots = max(len(names) for names in synonyms)
        position_of = {synonym: position for position, synonym in enumerate(unique_synonyms)}
        # a class with fewer synonyms than S repeats its first one in the extra slots
        slot_synonyms = [
            [names[slot] if slot < len(names) else names[0] for slot in range(slots)] for names in synonyms
        ]
        first_rows = torch.tensor([[position_of[synonym] * num_templates for synonym in row] for row in slot_synonyms])
        rows = first_rows[..., None] + torch.arange(num_templates)  # (K, S, T): row of each prompt in `padded`
        synonym_mask = torch.tensor([[slot < len(names) for slot in range(slots)] for names in synonyms])
        return BatchFeature(
            data={
                "input_ids": padded["input_ids"][rows],
                "attention_mask": padded["attention_mask"][rows],
                "synonym_mask": synonym_mask,
            }
        )

    def _tokenize_within_context(self, prompts: list[str]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each prompt cut to CLIP's context, and the indices of the prompts that were cut."""
        # one token past the context shows which prompts the tokenizer has to cut, without a second full pass
        token_rows = self.tokenizer(prompts, truncation=True, max_length=CLIP_CONTEXT_LENGTH + 1)["input_ids"]
        truncated = [index for index, row in enumerate(token_rows) if len(row) > CLIP_CONTEXT_LENGTH]
        if truncated:
            cut = self.tokenizer(
                [prompts[index] for index in truncated], truncation=True, max_length=CLIP_CONTEXT_LENGTH
            )
            for index, row in zip(truncated, cut["input_ids"]):
                token_rows[index] = row
        return [list(row) for row in token_rows], truncated

    @staticmethod
    def _check_tokens_distinct(vocabulary: Vocabulary, rows_of: dict, truncated_synonyms: set[str]) -> None:
        """`ValueError` when synonyms of two classes give the same tokens in every template (resolve_vocabulary
        already rejects equal text; this catches what only the tokenizer sees, above all the 77-token cut)."""
        synonyms = vocabulary.synonyms
        shared = shared_synonyms([[rows_of[synonym] for synonym in names] for names in synonyms])
        if not shared:
            return
        class_a, synonym_a, class_b, synonym_b = shared[0]
        first, second = synonyms[class_a][synonym_a], synonyms[class_b][synonym_b]
        cause = (
            f"after the cut to CLIP's {CLIP_CONTEXT_LENGTH}-token context"
            if {first, second} & truncated_synonyms
            else "in CLIP's tokenizer (which ignores case, spacing and some Unicode variants)"
        )
        raise ValueError(
            f"Duplicate tokens: label {class_a} ({preview(vocabulary.names[class_a])}) and label {class_b} "
            f"({preview(vocabulary.names[class_b])}) have synonyms {preview(first)} and {preview(second)} that read as the same "
            f"tokens {cause}, so those synonyms get identical text embeddings: shorten or reword one of them."
        )

    @staticmethod
    def vocabulary(candidate_labels: CandidateLabels) -> Vocabulary:
        """`resolve_vocabulary(candidate_labels)` (its errors)."""
        return resolve_vocabulary(candidate_labels)

    @staticmethod
    def seen_mask(candidate_labels: CandidateLabels, training_vocabulary: CandidateLabels) -> torch.Tensor:
        """`seen_class_mask` of the resolved vocabulary (its errors)."""
        return seen_class_mask(resolve_vocabulary(candidate_labels), training_vocabulary)

    def _vocabulary_defaults(self, kwargs: dict, for_instances: bool = False) -> dict:
        candidate_labels = kwargs.pop("candidate_labels", None)
        training_vocabulary = kwargs.pop("training_vocabulary", None)
        if candidate_labels is None:
            return kwargs
        vocabulary = resolve_vocabulary(candidate_labels)
        if kwargs.get("seen_mask") is None:
            # all classes seen without a training vocabulary (the post-processors' default), but always passed: its
            # length lets post-processing refuse a vocabulary whose size differs from the model outputs' class count
            kwargs["seen_mask"] = (
                seen_class_mask(vocabulary, training_vocabulary)
                if training_vocabulary is not None
                else torch.ones(len(vocabulary.names), dtype=torch.bool)
            )
        if for_instances:
            kwargs.setdefault("thing_label_ids", [i for i, thing in enumerate(vocabulary.is_thing) if thing])
        else:
            kwargs.setdefault("label_ids_to_fuse", [i for i, thing in enumerate(vocabulary.is_thing) if not thing])
        return kwargs

    def post_process_panoptic_segmentation(self, *args, **kwargs):
        return self.image_processor.post_process_panoptic_segmentation(*args, **self._vocabulary_defaults(kwargs))

    def post_process_instance_segmentation(self, *args, **kwargs):
        return self.image_processor.post_process_instance_segmentation(
            *args, **self._vocabulary_defaults(kwargs, True)
        )

    def post_process_semantic_segmentation(self, *args, **kwargs):
        kwargs = self._vocabulary_defaults(kwargs)
        kwargs.pop("label_ids_to_fuse", None)
        return self.image_processor.post_process_semantic_segmentation(*args, **kwargs)
