"""PosSAMProcessor: image processor + CLIP tokenizer; turns a vocabulary into prompt tokens (like OneFormerProcessor)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

# `resolve_vocabulary` and `seen_class_mask` live in the vocabulary layer; imported here, they stay part of this
# module's API (`from transformers_possam.processing_possam import resolve_vocabulary`).
from .vocabularies import CandidateLabels, Vocabulary, preview, resolve_vocabulary, seen_class_mask, shared_synonyms


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

# CLIP's text context: prompts longer than this are truncated by the tokenizer.
CLIP_CONTEXT_LENGTH = 77


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
                vocabulary.seen_mask(training_vocabulary)
                if training_vocabulary is not None
                else torch.ones(len(vocabulary), dtype=torch.bool)
            )
        if for_instances:
            kwargs.setdefault("thing_label_ids", vocabulary.thing_ids)
        else:
            kwargs.setdefault("label_ids_to_fuse", vocabulary.stuff_ids)
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
