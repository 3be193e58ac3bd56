"""PosSAMProcessor: image processor + CLIP tokenizer; turns a vocabulary into prompt tokens (like OneFormerProcessor)."""

import difflib
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin, TextKwargs, Unpack
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy
from transformers.utils import TensorType

# `resolve_vocabulary` and `seen_class_mask` live in the vocabulary layer; imported here, they stay part of this
# module's API (`from transformers_possam.processing_possam import resolve_vocabulary`).
from .image_processing_possam import PosSAMImageProcessorKwargs
from .remote_code_hooks import saving_checkpoint, write_json_with_auto_map
from .vocabularies import CandidateLabels, Vocabulary, preview, resolve_vocabulary, seen_class_mask, shared_synonyms


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


class PosSAMProcessorKwargs(ProcessingKwargs, total=False):
    r"""
    Keyword arguments of [`PosSAMProcessor.__call__`], routed as transformers' processors route them:
    `images_kwargs` (or the same names flat) go to the image processor ([`PosSAMImageProcessorKwargs`]),
    `text_kwargs` (or flat `padding`, `max_length`, ...) to the tokenizer as it encodes the vocabulary (see
    [`PosSAMProcessor.encode_vocabulary`] for the ones it honours), `common_kwargs` (`return_tensors`) to both.
    """

    # transformers' processors narrow the inherited `images_kwargs` to their image processor's kwargs (e.g.
    # Emu3ProcessorKwargs.images_kwargs: Emu3ImageProcessorKwargs), which TypedDict rules (PEP 589) do not allow
    images_kwargs: PosSAMImageProcessorKwargs  # type: ignore[misc]


# text_kwargs the vocabulary's tokenization honours (`PosSAMProcessor.encode_vocabulary`); any other is refused
# What a fast tokenizer's saved truncation state adds to its init kwargs (see `__call__`).
TRUNCATION_STATE = ("stride", "max_length")
VOCABULARY_TEXT_KWARGS = ("padding", "max_length", "truncation", "pad_to_multiple_of", "padding_side")
# Structured keyword groups of `_merge_kwargs`, and the modality inputs transformers' processors take that PosSAM lacks.
STRUCTURED_KWARGS = ("text_kwargs", "images_kwargs", "common_kwargs")
FOREIGN_INPUTS = {
    "text": "PosSAM's text input is its vocabulary: pass class names as candidate_labels=['cat', ['sky', 'clouds']] "
    "(or 'cat,sky'; each class, with its synonyms, is encoded into CLIP prompts, not tokenized as free text)",
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

    # not a TypedDict subtype of ProcessingKwargs only because of the narrowed images_kwargs (see above)
    valid_processor_kwargs = PosSAMProcessorKwargs  # type: ignore[assignment]
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
        self,
        images=None,
        candidate_labels=None,
        annotations=None,
        segmentation_maps=None,
        instance_id_to_semantic_id=None,
        **kwargs: Unpack[PosSAMProcessorKwargs],
    ) -> BatchFeature:
        r"""
        images (*optional*): one image or a list, as [`PosSAMImageProcessor.preprocess`] takes them.
        candidate_labels (*optional*): the vocabulary, anything [`resolve_vocabulary`] takes (a preset name such as
            `"coco"`, a string of classes `"cat,dog"`, or a list of labels
            `["cat", ["sky", "clouds"], {"name": "road", "synonyms": ["street"], "isthing": False}]`).
        annotations (*optional*): one per image, as [`PosSAMImageProcessor.preprocess`] takes them (needs `images`).
        segmentation_maps, instance_id_to_semantic_id (*optional*): Mask2Former's form of labels, 2-D id maps, one
            per image, as [`PosSAMImageProcessor.preprocess`] takes them (needs `images`): `mask_labels` and
            `class_labels` as Mask2Former's image processor builds them (`ignore_index`, `do_reduce_labels` apply).
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
        if segmentation_maps is not None and images is None:
            raise ValueError("segmentation_maps were given without images: pass the image each map belongs to.")
        self._check_keywords(kwargs)
        # A fast tokenizer loaded from a tokenizer.json that was saved after a truncating call carries that call's
        # truncation state as init defaults (`stride`, `max_length`; transformers' TokenizersBackend): not a choice
        # about the vocabulary's prompts, whose layout is CLIP's fixed context, so only call options set them.
        tokenizer_defaults = {
            name: value for name, value in self.tokenizer.init_kwargs.items() if name not in TRUNCATION_STATE
        }
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=tokenizer_defaults, **kwargs)
        data = {}
        if images is not None:
            labels = {
                name: value
                for name, value in (
                    ("segmentation_maps", segmentation_maps),
                    ("instance_id_to_semantic_id", instance_id_to_semantic_id),
                )
                if value is not None
            }
            data.update(
                self.image_processor(images, annotations=annotations, **labels, **output_kwargs["images_kwargs"])
            )
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
                inputs = {
                    "images",
                    "candidate_labels",
                    "annotations",
                    "segmentation_maps",
                    "instance_id_to_semantic_id",
                }
                close = difflib.get_close_matches(name, sorted(known | inputs))
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise TypeError(
                    f"PosSAMProcessor got the unknown keyword argument {name!r}: it takes images, candidate_labels, "
                    f"annotations, the image processor's options and the tokenizer's (see PosSAMProcessorKwargs).{hint}"
                )

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Saved by `save_pretrained`, the file also gets `auto_map` and the checkpoint its code (remote_code.py)."""
        write_json_with_auto_map(self, json_file_path, ("AutoProcessor", "AutoImageProcessor"), super().to_json_file)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        with saving_checkpoint():
            return super().save_pretrained(save_directory, *args, **kwargs)

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
        # A truncating call leaves its setting in a fast tokenizer's backend, which `save_pretrained` writes to
        # tokenizer.json and loading turns into init defaults (max_length=78 here): the tokenizer is left as found.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        state = backend.truncation if backend is not None else None
        try:
            # one token past the limit shows which prompts the tokenizer has to cut, without a second full pass
            token_rows = self.tokenizer(prompts, truncation=True, max_length=max_length + 1)["input_ids"]
            truncated = [index for index, row in enumerate(token_rows) if len(row) > max_length]
            if truncated:
                cut = self.tokenizer([prompts[index] for index in truncated], truncation=True, max_length=max_length)
                for index, row in zip(truncated, cut["input_ids"]):
                    token_rows[index] = row
        finally:
            if backend is not None:
                if state is None:
                    backend.no_truncation()
                else:
                    backend.enable_truncation(**state)
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
