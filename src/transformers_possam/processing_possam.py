"""PosSAMProcessor: image processor + CLIP tokenizer; turns a vocabulary into prompt tokens (like OneFormerProcessor)."""

import difflib
import numbers
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy
from transformers.utils import TensorType

from .image_processing_possam import PosSAMImageProcessorKwargs
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


__all__ = [
    "PosSAMProcessor",
    "PosSAMProcessorKwargs",
    "VILD_TEMPLATES",
    "fill_templates",
    "resolve_vocabulary",
    "seen_class_mask",
]

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


class PosSAMProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    Keyword arguments of [`PosSAMProcessor.__call__`], routed as transformers' processors route them:
    `images_kwargs` (or the same names flat) go to the image processor ([`PosSAMImageProcessorKwargs`]),
    `text_kwargs` (or flat `padding`, `max_length`, ...) to the tokenizer as it encodes the vocabulary (see
    [`PosSAMProcessor.encode_vocabulary`] for the ones it honours), `common_kwargs` (`return_tensors`) to both.
    """

    images_kwargs: PosSAMImageProcessorKwargs


# text_kwargs the vocabulary's tokenization honours (`PosSAMProcessor.encode_vocabulary`); any other is refused
VOCABULARY_TEXT_KWARGS = ("padding", "max_length", "truncation", "pad_to_multiple_of", "padding_side")
# Structured keyword groups of `_merge_kwargs`, and the modality inputs transformers' processors take that PosSAM lacks.
STRUCTURED_KWARGS = ("text_kwargs", "images_kwargs", "common_kwargs")
FOREIGN_INPUTS = {
    "text": "PosSAM's text input is its vocabulary: pass class names as candidate_labels=['cat', 'sky,clouds'] (each "
    "class is encoded into CLIP prompts, not tokenized as free text)",
    "videos": "PosSAM segments images: pass frames as images",
    "audio": "PosSAM has no audio input",
    "audio_kwargs": "PosSAM has no audio input",
    "videos_kwargs": "PosSAM segments images: pass image options in images_kwargs",
}


class PosSAMProcessor(ProcessorMixin):
    r"""
    Wraps a [`PosSAMImageProcessor`] and CLIP's tokenizer.

    `processor(images, candidate_labels=..., return_tensors="pt")` returns the image processor's outputs plus the
    tokenized vocabulary: `input_ids` / `attention_mask` of shape `(K, S, T, L)` (K classes, S synonym slots, T = 14
    ViLD templates, L tokens) and `synonym_mask` `(K, S)`; a class with fewer synonyms than S repeats its first synonym
    in the padding slots, which `synonym_mask` marks. Post-processing methods are forwarded to the image processor;
    given `candidate_labels`, they also fill `label_ids_to_fuse` (the stuff classes) and, with `training_vocabulary`,
    the seen-class mask for MASE.
    """

    valid_processor_kwargs = PosSAMProcessorKwargs
    templates = VILD_TEMPLATES

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)
        _check_clip_tokenizer(self.tokenizer)

    @property
    def model_input_names(self) -> list[str]:
        """
        The keys `__call__` returns for images and a vocabulary: the image processor's, the sizes it returns (listed
        as SAM's processor lists them; the model accepts and ignores them), the tokenizer's and `synonym_mask`.
        """
        return [
            *self.image_processor.model_input_names,
            "original_sizes",
            "reshaped_input_sizes",
            *self.tokenizer.model_input_names,
            "synonym_mask",
        ]

    def __call__(
        self, images=None, candidate_labels=None, annotations=None, **kwargs: Unpack[PosSAMProcessorKwargs]
    ) -> BatchFeature:
        r"""
        images (*optional*): one image or a list, as [`PosSAMImageProcessor.preprocess`] takes them.
        candidate_labels (*optional*): the vocabulary, anything [`resolve_vocabulary`] takes (a preset name such as
            `"coco"`, or a list of labels `["cat", "sky,clouds", {"name": "road", "isthing": False}]`).
        annotations (*optional*): one per image, as [`PosSAMImageProcessor.preprocess`] takes them (needs `images`).
        kwargs: image-processor options (`do_normalize`, `label_map`, ...) and the vocabulary's tokenizer options
            (`padding`, `max_length`, ...), flat or grouped as `images_kwargs` / `text_kwargs`; `return_tensors`
            (`"pt"`, `"np"`; default None, transformers' convention: per-image lists and nested lists) applies to
            both. See [`PosSAMProcessorKwargs`].

        Returns the image processor's outputs (with images) and `input_ids`, `attention_mask` `(K, S, T, L)` and
        `synonym_mask` `(K, S)` (with candidate_labels).

        Raises:
            TypeError: a keyword neither processor understands (e.g. `text`: the vocabulary is `candidate_labels`).
            ValueError: neither images nor candidate_labels, annotations without images, the same option given
                flat and in its group, and what the image processor / `encode_vocabulary` raise.
        """
        if images is None and candidate_labels is None:
            raise ValueError("Give images, candidate_labels, or both.")
        if annotations is not None and images is None:
            raise ValueError("annotations were given without images: pass the image each annotation belongs to.")
        self._check_keywords(kwargs)
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        data = {}
        if images is not None:
            data.update(self.image_processor(images, annotations=annotations, **output_kwargs["images_kwargs"]))
        if candidate_labels is not None:
            # `__call__` follows transformers' default (no tensors); `encode_vocabulary` alone returns tensors
            text_kwargs = {"return_tensors": None, **output_kwargs["text_kwargs"]}
            data.update(self.encode_vocabulary(candidate_labels, **text_kwargs))
        return BatchFeature(data=data)

    def _check_keywords(self, kwargs: Mapping[str, object]) -> None:
        """
        TypeError for a keyword neither sub-processor takes: transformers' `_merge_kwargs` would drop it with a
        logged warning, and `text=` in particular would silently give no vocabulary.
        """
        known = set(STRUCTURED_KWARGS) | set(TextKwargs.__annotations__)
        known |= set(getattr(self.image_processor, "valid_kwargs", ImagesKwargs).__annotations__)
        for name in kwargs:
            if name in FOREIGN_INPUTS:
                raise TypeError(f"PosSAMProcessor takes no {name}=: {FOREIGN_INPUTS[name]}.")
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known | {"images", "candidate_labels", "annotations"}))
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise TypeError(
                    f"PosSAMProcessor got the unknown keyword argument {name!r}: it takes images, candidate_labels, "
                    f"annotations, the image processor's options and the tokenizer's (see PosSAMProcessorKwargs).{hint}"
                )

    def encode_vocabulary(
        self, candidate_labels: CandidateLabels, return_tensors: str | TensorType | None = "pt", **text_kwargs
    ) -> BatchFeature:
        """
        Tokenize every (class, synonym, template) prompt: `input_ids`, `attention_mask` `(K, S, T, L)` and
        `synonym_mask` `(K, S)`, as torch tensors by default (model inputs), numpy arrays for `return_tensors="np"`,
        nested lists for None.

        `candidate_labels` follows `resolve_vocabulary` (same `TypeError` / `ValueError`). Prompts are cut to
        `max_length` tokens, by default CLIP's 77-token context: a label whose prompts are cut gets a `UserWarning`
        naming it (a `ValueError` with `truncation=False`), and two labels whose synonyms then read as the same tokens
        in every template (identical embeddings) are a `ValueError` naming both.

        `text_kwargs`, the tokenizer options that apply to prompts of one layout: `padding` (`"longest"`, the
        default, or `True`: L is the longest prompt; `"max_length"`: L = `max_length`), `max_length` (1 to 77: CLIP
        reads no more), `truncation` (True, the default, or False: refuse prompts longer than `max_length`),
        `pad_to_multiple_of`, `padding_side` (`"right"` only: CLIP pools at the first end-of-text token, which
        is also the padding token). Others raise `ValueError` (a `TypeError` for a value of the wrong type).
        """
        padding, max_length, truncation, pad_to_multiple_of = _vocabulary_tokenization(text_kwargs)
        vocabulary = resolve_vocabulary(candidate_labels)
        synonyms = vocabulary.synonyms
        # each distinct synonym is tokenized once; padding slots and repeats reuse its rows
        unique_synonyms = list(dict.fromkeys(synonym for names in synonyms for synonym in names))
        num_templates = len(self.templates)
        prompts = [prompt for synonym in unique_synonyms for prompt in fill_templates(synonym, self.templates)]
        token_rows, truncated = self._tokenize_within_context(prompts, max_length)
        rows_of = {
            synonym: tuple(tuple(row) for row in token_rows[position * num_templates : (position + 1) * num_templates])
            for position, synonym in enumerate(unique_synonyms)
        }
        truncated_synonyms = {unique_synonyms[prompt_index // num_templates] for prompt_index in truncated}
        cut = (
            f"CLIP reads at most {CLIP_CONTEXT_LENGTH} tokens"
            if max_length == CLIP_CONTEXT_LENGTH
            else f"max_length={max_length} keeps at most {max_length} tokens"
        )
        if truncated_synonyms:
            labels = ", ".join(
                f"label {index} ({preview(name)})"
                for index, name in enumerate(vocabulary.names)
                if truncated_synonyms.intersection(synonyms[index])
            )
            if not truncation:
                raise ValueError(
                    f"{cut} and truncation=False, but the prompts of {labels} are longer: shorten these labels, or "
                    "allow the cut (truncation=True)."
                )
            warnings.warn(
                f"{cut}, so the prompts of {labels} are cut short (the end of the label or of the template is lost): "
                "shorten these labels.",
                UserWarning,
                stacklevel=2,
            )
        self._check_tokens_distinct(vocabulary, rows_of, truncated_synonyms, max_length)

        padded = self.tokenizer.pad(
            {"input_ids": token_rows},
            padding=padding,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="pt",
        )
        slots = max(len(names) for names in synonyms)
        position_of = {synonym: position for position, synonym in enumerate(unique_synonyms)}
        # a class with fewer synonyms than S repeats its first one in the extra slots
        slot_synonyms = [
            [names[slot] if slot < len(names) else names[0] for slot in range(slots)] for names in synonyms
        ]
        first_rows = torch.tensor([[position_of[synonym] * num_templates for synonym in row] for row in slot_synonyms])
        rows = first_rows[..., None] + torch.arange(num_templates)  # (K, S, T): row of each prompt in `padded`
        synonym_mask = torch.tensor([[slot < len(names) for slot in range(slots)] for names in synonyms])
        data = {
            "input_ids": padded["input_ids"][rows],
            "attention_mask": padded["attention_mask"][rows],
            "synonym_mask": synonym_mask,
        }
        if return_tensors is None:
            return BatchFeature(data={name: value.tolist() for name, value in data.items()})
        if TensorType(return_tensors) == TensorType.PYTORCH:
            return BatchFeature(data=data)
        return BatchFeature(data={name: value.numpy() for name, value in data.items()}, tensor_type=return_tensors)

    def _tokenize_within_context(self, prompts: list[str], max_length: int) -> tuple[list[list[int]], list[int]]:
        """Token ids of each prompt cut to `max_length`, and the indices of the prompts that were cut."""
        # one token past the limit shows which prompts the tokenizer has to cut, without a second full pass
        token_rows = self.tokenizer(prompts, truncation=True, max_length=max_length + 1)["input_ids"]
        truncated = [index for index, row in enumerate(token_rows) if len(row) > max_length]
        if truncated:
            cut = self.tokenizer([prompts[index] for index in truncated], truncation=True, max_length=max_length)
            for index, row in zip(truncated, cut["input_ids"]):
                token_rows[index] = row
        return [list(row) for row in token_rows], truncated

    @staticmethod
    def _check_tokens_distinct(
        vocabulary: Vocabulary, rows_of: dict, truncated_synonyms: set[str], max_length: int = CLIP_CONTEXT_LENGTH
    ) -> None:
        """`ValueError` when synonyms of two classes give the same tokens in every template (resolve_vocabulary
        already rejects equal text; this catches what only the tokenizer sees, above all the cut to `max_length`)."""
        synonyms = vocabulary.synonyms
        shared = shared_synonyms([[rows_of[synonym] for synonym in names] for names in synonyms])
        if not shared:
            return
        class_a, synonym_a, class_b, synonym_b = shared[0]
        first, second = synonyms[class_a][synonym_a], synonyms[class_b][synonym_b]
        if {first, second} & truncated_synonyms:
            cause = (
                f"after the cut to CLIP's {CLIP_CONTEXT_LENGTH}-token context"
                if max_length == CLIP_CONTEXT_LENGTH
                else f"after the cut to max_length={max_length} tokens"
            )
        else:
            cause = "in CLIP's tokenizer (which ignores case, spacing and some Unicode variants)"
        raise ValueError(
            f"Duplicate tokens: label {class_a} ({preview(vocabulary.names[class_a])}) and label {class_b} "
            f"({preview(vocabulary.names[class_b])}) have synonyms {preview(first)} and {preview(second)} that read as the same "
            f"tokens {cause}, so those synonyms get identical text embeddings: shorten or reword one of them."
        )

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


# Truncation strategies that cut a single sequence (the only kind a prompt is), and those that refuse to.
TRUNCATING = (True, "longest_first", "only_first", TruncationStrategy.LONGEST_FIRST, TruncationStrategy.ONLY_FIRST)
NOT_TRUNCATING = (False, "do_not_truncate", TruncationStrategy.DO_NOT_TRUNCATE)


def _vocabulary_tokenization(text_kwargs: dict) -> tuple[str, int, bool, int | None]:
    """
    `(padding strategy, max_length, truncation, pad_to_multiple_of)` for `encode_vocabulary` from tokenizer options
    (None entries mean the default); `TypeError` / `ValueError` for options the prompt layout cannot honour.
    """
    options = {name: value for name, value in text_kwargs.items() if value is not None}
    unsupported = sorted(name for name in options if name not in VOCABULARY_TEXT_KWARGS)
    if unsupported:
        raise ValueError(
            f"The tokenizer option(s) {unsupported} cannot be applied to the vocabulary's prompts (every class gets "
            f"the same fixed templates): the supported ones are {list(VOCABULARY_TEXT_KWARGS)}."
        )
    padding = options.get("padding", "longest")
    if padding is True or padding in ("longest", PaddingStrategy.LONGEST):
        padding = "longest"
    elif padding in ("max_length", PaddingStrategy.MAX_LENGTH):
        padding = "max_length"
    else:
        raise ValueError(
            f"padding={padding!r} cannot be used for the vocabulary: its prompts form one (K, S, T, L) array, so they "
            "are padded to one length: padding='longest' (the default) or 'max_length'."
        )
    max_length = options.get("max_length", CLIP_CONTEXT_LENGTH)
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__} {max_length!r}.")
    max_length = int(max_length)
    if not 1 <= max_length <= CLIP_CONTEXT_LENGTH:
        raise ValueError(
            f"max_length={max_length} is outside 1..{CLIP_CONTEXT_LENGTH}: CLIP's text encoder reads at most "
            f"{CLIP_CONTEXT_LENGTH} tokens."
        )
    truncation = options.get("truncation", True)
    if truncation in TRUNCATING:
        truncation = True
    elif truncation in NOT_TRUNCATING:
        truncation = False
    else:
        raise ValueError(
            f"truncation={truncation!r} does not apply to the vocabulary's prompts (single sequences): pass True (the "
            "default, cut at max_length) or False (refuse longer prompts)."
        )
    if options.get("padding_side", "right") != "right":
        raise ValueError(
            f"padding_side={options['padding_side']!r}: the vocabulary's prompts are padded on the right only, since "
            "CLIP pools each prompt at its first end-of-text token, which is also the padding token."
        )
    return padding, max_length, truncation, options.get("pad_to_multiple_of")
