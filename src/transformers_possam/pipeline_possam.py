"""`pipeline("open-vocabulary-panoptic-segmentation")`: any image, any label list."""

from __future__ import annotations

import os
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from io import BytesIO

import numpy as np
import torch
from huggingface_hub import (
    get_session,  # the Hub library's public HTTP session (its client is a dependency already)
)
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.utils import logging

from .image_processing_possam import PosSAMImageProcessor, PosSAMImageProcessorPil
from .modeling_possam import PosSAMForPanopticSegmentation
from .postprocessing import check_ensemble_weight, check_flag, check_threshold
from .processing_possam import PosSAMProcessor
from .vocabularies import Vocabulary, preview, resolve_vocabulary


__all__ = ["OpenVocabularyPanopticSegmentationPipeline", "TASK"]

TASK = "open-vocabulary-panoptic-segmentation"
SUBTASKS = ("panoptic", "semantic", "instance")

logger = logging.get_logger(__name__)
# Keys of a dict input (transformers' zero-shot pipelines: `{"image": ..., "candidate_labels": ...}`).
INPUT_KEYS = ("image", "candidate_labels")
# Vocabularies whose text embeddings stay cached per pipeline (least recently used are evicted).
VOCABULARY_CACHE_SIZE = 8


class OpenVocabularyPanopticSegmentationPipeline(Pipeline):
    """
    Segments images against `candidate_labels` with PosSAM.

    ```python
    segmenter = pipeline("open-vocabulary-panoptic-segmentation", model="path/to/possam")
    segmenter("street.jpg", candidate_labels="person, car, road")  # 3 classes, as transformers' zero-shot pipelines
    segmenter("street.jpg", candidate_labels=[["person", "people"], "car", {"name": "road", "isthing": False}])
    segmenter(images, candidate_labels="ade20k", subtask="semantic", batch_size=4)
    segmenter([{"image": "a.jpg", "candidate_labels": ["cat"]}, {"image": "b.jpg", "candidate_labels": "coco"}])
    segmenter(["a.jpg", "b.jpg"], candidate_labels=[["cat", "dog"], ["car"]])  # one label list per image
    ```

    Returns, per image, a list of `{"score": float | None, "label": str, "mask": PIL.Image (mode "L", 255 inside)}`,
    like transformers' image-segmentation pipeline (`score` is None for semantic segments). Labels are the first
    synonym of each class. The text embeddings of a vocabulary are computed once and cached across calls.
    """

    # transformers' Pipeline documents these flags as True / None / False but sets them to None, so its inferred type
    # (None) is too narrow for the booleans every pipeline assigns
    _load_processor = False  # type: ignore[assignment]
    _load_image_processor = True  # type: ignore[assignment]
    _load_tokenizer = True  # type: ignore[assignment]
    _load_feature_extractor = False  # type: ignore[assignment]

    # Pipeline types these as any model / image processor (or None); this pipeline needs PosSAM's, checked in __init__
    model: PosSAMForPanopticSegmentation
    image_processor: PosSAMImageProcessor | PosSAMImageProcessorPil
    processor: PosSAMProcessor

    def __init__(self, *args, text_batch_size: int | None = None, **kwargs):
        """`text_batch_size`: prompts per text-tower call when a new vocabulary is encoded (default: one pass)."""
        super().__init__(*args, **kwargs)
        if not _is_a(self.model, PosSAMForPanopticSegmentation):
            raise TypeError(
                f"The {TASK} pipeline needs a PosSAMForPanopticSegmentation, got a {type(self.model).__name__}: load "
                "a PosSAM checkpoint (AutoModelForUniversalSegmentation)."
            )
        if not _is_a(self.image_processor, PosSAMImageProcessor, PosSAMImageProcessorPil):
            raise TypeError(
                f"The {TASK} pipeline needs a PosSAMImageProcessor (or PosSAMImageProcessorPil), got "
                f"{type(self.image_processor).__name__}: load the image processor saved with the PosSAM checkpoint."
            )
        self.text_batch_size = text_batch_size
        self.processor = PosSAMProcessor(image_processor=self.image_processor, tokenizer=self.tokenizer)
        self._vocabulary_cache: OrderedDict = OrderedDict()
        self.text_encoding_calls = 0

    def _sanitize_parameters(
        self,
        candidate_labels=None,
        subtask=None,
        threshold=None,
        mask_threshold=None,
        overlap_mask_area_threshold=None,
        use_mase=None,
        mase_alpha=None,
        mase_beta=None,
        timeout=None,
        **kwargs,
    ):
        """
        Splits a call's arguments among the pipeline's steps. The post-processing ones are checked here, before any
        forward pass: `TypeError` for a wrong type (`subtask` not a string, a threshold not a number, `use_mase` not
        a bool), `ValueError` for a wrong value (an unknown subtask, a threshold outside [0, 1], MASE weights outside
        [0, 1]).
        """
        # keyword arguments of each step; the steps' signatures give their types
        preprocess: dict[str, object] = {}
        forward: dict[str, object] = {}
        postprocess: dict[str, object] = {}
        if timeout is not None:
            preprocess["timeout"] = timeout
        if candidate_labels is not None:
            # the call's vocabulary, resolved once; preprocess gives it to every input without its own labels
            preprocess["vocabulary"] = resolve_vocabulary(candidate_labels)
        # every post-processing argument is checked here, before any forward pass (None: the default)
        if subtask is not None:
            if not isinstance(subtask, str):
                raise TypeError(
                    f"subtask must be a string, one of {SUBTASKS}, got {type(subtask).__name__} {subtask!r}."
                )
            if subtask not in SUBTASKS:
                raise ValueError(f"Unknown subtask {subtask!r}: choose one of {SUBTASKS}.")
            postprocess["subtask"] = subtask
        for name, value in (("mase_alpha", mase_alpha), ("mase_beta", mase_beta)):
            if value is not None:
                check_ensemble_weight(value, name)
        for name, value in (
            ("threshold", threshold),
            ("mask_threshold", mask_threshold),
            ("overlap_mask_area_threshold", overlap_mask_area_threshold),
        ):
            if value is not None:
                check_threshold(value, name)  # TypeError for a non-number, ValueError outside [0, 1]
        if use_mase is not None:
            check_flag(use_mase, "use_mase")
        for name, value in (
            ("threshold", threshold),
            ("mask_threshold", mask_threshold),
            ("overlap_mask_area_threshold", overlap_mask_area_threshold),
            ("use_mase", use_mase),
            ("mase_alpha", mase_alpha),
            ("mase_beta", mase_beta),
        ):
            if value is not None:
                postprocess[name] = value
        if kwargs:
            raise ValueError(f"Unknown arguments {sorted(kwargs)} for the {TASK} pipeline.")
        return preprocess, forward, postprocess

    # transformers' Pipeline declares `__call__(inputs, *args, ...)` and each step with arbitrary keyword parameters,
    # but calls the steps only with the ones `_sanitize_parameters` returns; its own pipelines name their input and
    # parameters as here (ZeroShotImageClassificationPipeline.__call__(image, candidate_labels, **kwargs),
    # .preprocess(image, candidate_labels, ..., timeout)), which its annotations do not allow
    def __call__(self, images, candidate_labels=None, **kwargs):  # type: ignore[override]
        """
        Args:
            images: an image (PIL image, path, URL, numpy array), a dict `{"image": image, "candidate_labels": labels}`
                (labels for that image only), or a list / generator / dataset of either. A list gives a list of
                results, one per input.
            candidate_labels: the vocabulary (`resolve_vocabulary`): a preset (`"coco"`, `"ade20k"`), a string of
                comma-separated classes (`"cat,dog"`: 2 classes, as transformers' zero-shot pipelines), or a list with
                one label per class: a str, a list of synonyms (`["cat", "kitty"]`) or a dict
                `{"name", "synonyms", "isthing"}` (`isthing=False` marks stuff classes, which panoptic output fuses).
                With a list of images, a list of label lists (every element a list) is one vocabulary per image, as in
                `zero-shot-object-detection`. Not needed when every input dict has its own.
            subtask: `"panoptic"` (default), `"semantic"` or `"instance"`.
            threshold: keep the non-void queries whose score is above it (default 0.0, FC-CLIP's); scores are MASE's
                class probabilities times the predicted IoU times (1 - p_void), see the README.
            mask_threshold: a pixel belongs to a mask when its probability reaches it (default 0.5; panoptic and
                instance).
            overlap_mask_area_threshold: a panoptic segment must keep this fraction of its own mask (default 0.8).
                Instances may overlap and semantic maps have no segments, so there (as every threshold in semantic
                segmentation) it has no effect, and a warning says so.
            use_mase: MASE (default True) or FC-CLIP's fixed geometric ensemble.
            mase_alpha, mase_beta: CLIP's weight on seen / unseen classes; default: the image processor's
                (`preprocessor_config.json`), the one place these are stored.
            batch_size: images per forward.

        Raises:
            ValueError: no image; no vocabulary for an input; labels given both in an input dict and as the argument;
                per-image label lists whose count differs from the number of images; a dict input with other keys.
            TypeError / ValueError: a malformed vocabulary (`resolve_vocabulary`), before any forward pass for lists.
        """
        if images is None or (isinstance(images, (list, tuple)) and not images):
            raise ValueError(
                f"No image given (images={images!r}): pass an image, a path / URL, a dict {{'image': ..., "
                "'candidate_labels': ...}, or a non-empty list of them."
            )
        if isinstance(images, (list, tuple)) and is_per_image_labels(candidate_labels):
            items = per_image_items(images, candidate_labels)
            return super().__call__(items, **kwargs)
        if isinstance(images, (list, tuple)):
            # every input checked before the first forward pass: a bad vocabulary of image 7 fails before image 0 runs
            shared = resolve_vocabulary(candidate_labels) if candidate_labels is not None else None
            items = [input_item(entry, shared, f"images[{index}]") for index, entry in enumerate(images)]
            unlabelled = [index for index, item in enumerate(items) if item["candidate_labels"] is None]
            if unlabelled:
                raise ValueError(
                    f"candidate_labels is required: images{unlabelled} have no labels; pass candidate_labels=... to "
                    "the call, or give those inputs as {'image': ..., 'candidate_labels': ...}."
                )
            return super().__call__(items, **kwargs)
        if isinstance(images, Mapping):
            shared = resolve_vocabulary(candidate_labels) if candidate_labels is not None else None
            item = input_item(images, shared, "images")
            if item["candidate_labels"] is None:
                raise ValueError(
                    "candidate_labels is required: give it in the input dict ({'image': ..., 'candidate_labels': "
                    "...}) or to the call."
                )
            return super().__call__(item, **kwargs)
        if candidate_labels is None and not is_lazy_collection(images):
            raise ValueError(
                "candidate_labels is required: a list of labels, a string of comma-separated classes ('cat,dog'), "
                "a preset name such as 'ade20k', or per input: {'image': ..., 'candidate_labels': ...}."
            )
        return super().__call__(images, candidate_labels=candidate_labels, **kwargs)

    def preprocess(self, inputs, vocabulary=None, timeout=None):  # type: ignore[override]  # see __call__
        """
        One input -> model inputs and its vocabulary. `inputs` is an image (PIL, numpy array, local path, http(s) URL
        or base64 data) or a dict `{"image": image, "candidate_labels": labels}`; `vocabulary` is the call's
        `candidate_labels`, for inputs without their own. Files and URLs are decoded in their own mode, 16-bit
        included, and converted by the image processor. Raises ValueError naming the input when it cannot be read or
        is not an image.
        """
        item = input_item(inputs, vocabulary, "the input")
        image = item["image"]
        vocabulary = item["candidate_labels"]  # None here (an image preprocessed alone) is refused by _forward
        if isinstance(image, str):
            source = image
            try:
                if os.path.isdir(source):
                    raise ValueError("it is a directory, not an image file")
                # Opened here rather than by transformers' load_image, which converts to 8-bit RGB and so turns a
                # 16-bit PNG white; load_image is left the base64 strings (and the error for anything else).
                if source.startswith(("http://", "https://")):
                    response = get_session().get(source, timeout=timeout, follow_redirects=True)
                    response.raise_for_status()
                    image = Image.open(BytesIO(response.content))
                elif os.path.isfile(source):
                    image = Image.open(source)
                else:
                    image = load_image(source, timeout=timeout)
                image = ImageOps.exif_transpose(image)  # decodes the file, so a broken one fails here, with its name
            except (
                Exception
            ) as error:  # PIL, the HTTP client and load_image raise several types; name the input in one error
                raise ValueError(f"Could not read the image {source!r}: {error}") from error
        elif not isinstance(image, (Image.Image, np.ndarray)):
            raise ValueError(
                f"Cannot segment a {type(image).__name__}: pass a PIL image, a numpy array, a path or a URL."
            )
        elif isinstance(image, np.ndarray) and image.ndim == 4:
            raise ValueError(
                f"Got a 4-D array {image.shape}, a batch: pass its images as a list, one result per image."
            )
        inputs = self.image_processor(image, return_tensors="pt")
        return {
            "pixel_values": inputs["pixel_values"].to(self.dtype),
            "pixel_mask": inputs["pixel_mask"],
            "original_sizes": torch.as_tensor(inputs["original_sizes"]).reshape(1, 2),
            "reshaped_input_sizes": torch.as_tensor(inputs["reshaped_input_sizes"]).reshape(1, 2),
            "vocabulary": vocabulary,
        }

    def class_embeddings(self, vocabulary):
        """
        (class_embeddings, synonym_mask, seen_mask) of a vocabulary, from the cache or one batched text pass: copies,
        so that a caller who modifies them in place does not change what later calls of the pipeline use.
        """
        return tuple(tensor.clone() for tensor in self._cached_class_embeddings(vocabulary))

    def _cached_class_embeddings(self, vocabulary):
        """`class_embeddings` as the cache holds them (the pipeline's own reads: no copy, never written to)."""
        key = (vocabulary.names, vocabulary.is_thing)
        if key in self._vocabulary_cache:
            self._vocabulary_cache.move_to_end(key)
            return self._vocabulary_cache[key]
        tokens = self.processor.encode_vocabulary(vocabulary)
        with torch.no_grad():
            embeddings, synonym_mask = self.model.get_class_embeddings(
                tokens["input_ids"].to(self.device),
                tokens["attention_mask"].to(self.device),
                tokens["synonym_mask"].to(self.device),
                text_batch_size=self.text_batch_size,
            )
        self.text_encoding_calls += 1
        seen = vocabulary.seen_mask(self.model.config.training_vocabulary).to(self.device)
        self._vocabulary_cache[key] = (embeddings, synonym_mask, seen)
        if len(self._vocabulary_cache) > VOCABULARY_CACHE_SIZE:
            self._vocabulary_cache.popitem(last=False)
        return self._vocabulary_cache[key]

    def _forward(self, model_inputs):  # type: ignore[override]  # named step parameters, see __call__
        """
        Model outputs of a batch. `model_inputs["vocabulary"]` is one `Vocabulary` (batch_size=1) or a list of them,
        one per image (transformers' collation). Images sharing a vocabulary go through the model together; with
        several vocabularies in one batch the class axes differ, so each output is then a list of per-image tensors
        (transformers' pipeline iterator unbatches lists and tensors alike).
        """
        vocabularies = model_inputs["vocabulary"]
        if vocabularies is None or (isinstance(vocabularies, list) and None in vocabularies):
            raise ValueError(
                "candidate_labels is required: pass candidate_labels=... to the call, or give each input as "
                "{'image': ..., 'candidate_labels': ...}."
            )
        if isinstance(vocabularies, Vocabulary):
            return self._forward_one_vocabulary(model_inputs, vocabularies, slice(None)) | {"vocabulary": vocabularies}
        groups: dict[Vocabulary, list[int]] = {}
        for index, vocabulary in enumerate(vocabularies):
            groups.setdefault(vocabulary, []).append(index)
        if len(groups) == 1:
            (vocabulary,) = groups
            return self._forward_one_vocabulary(model_inputs, vocabulary, slice(None)) | {"vocabulary": vocabularies}
        per_image: list[dict] = [{} for _ in vocabularies]
        for vocabulary, indices in groups.items():
            outputs = self._forward_one_vocabulary(model_inputs, vocabulary, torch.tensor(indices))
            for position, index in enumerate(indices):
                per_image[index] = {
                    key: value[position] if value is not None else None for key, value in outputs.items()
                }
        # "class_queries_logits" first: the iterator reads the batch size off the first value
        return {key: [outputs[key] for outputs in per_image] for key in per_image[0]} | {"vocabulary": vocabularies}

    def _forward_one_vocabulary(self, model_inputs, vocabulary, images) -> dict:
        """Outputs for the images `images` (a slice or an index tensor) of a batch, all against `vocabulary`."""
        embeddings, synonym_mask, _ = self._cached_class_embeddings(vocabulary)
        outputs = self.model(
            pixel_values=model_inputs["pixel_values"][images],
            pixel_mask=model_inputs["pixel_mask"][images],
            class_embeddings=embeddings,
            synonym_mask=synonym_mask,
            return_clip_logits=True,
        )
        return {
            "class_queries_logits": outputs.class_queries_logits,
            "clip_class_logits": outputs.clip_class_logits,
            "masks_queries_logits": outputs.masks_queries_logits,
            "iou_scores": outputs.iou_scores,
            "original_sizes": model_inputs["original_sizes"][images],
            "reshaped_input_sizes": model_inputs["reshaped_input_sizes"][images],
        }

    def postprocess(  # type: ignore[override]  # named step parameters, see __call__
        self,
        model_outputs,
        subtask="panoptic",
        threshold=None,
        mask_threshold=None,
        overlap_mask_area_threshold=None,
        use_mase=True,
        mase_alpha=None,
        mase_beta=None,
    ):
        vocabulary = model_outputs["vocabulary"]
        _, _, seen = self._cached_class_embeddings(vocabulary)
        outputs = _Outputs(model_outputs)
        sizes = {
            "target_sizes": model_outputs["original_sizes"].tolist(),
            "reshaped_input_sizes": model_outputs["reshaped_input_sizes"].tolist(),
            "mase_alpha": mase_alpha,
            "mase_beta": mase_beta,
        }
        names = vocabulary.display_names
        # the post-processors' defaults apply to what the caller left out (None)
        thresholds = {
            name: value
            for name, value in (
                ("threshold", threshold),
                ("mask_threshold", mask_threshold),
                ("overlap_mask_area_threshold", overlap_mask_area_threshold),
            )
            if value is not None
        }
        if subtask == "semantic":
            if thresholds:
                logger.warning_once(
                    f"{', '.join(sorted(thresholds))}: no effect on semantic segmentation, which gives every pixel "
                    "its best class (there are no segments to threshold); they apply to the panoptic and instance "
                    "subtasks."
                )
            (class_map,) = self.image_processor.post_process_semantic_segmentation(
                outputs, seen_mask=seen, use_mase=use_mase, **sizes
            )
            return [
                {"score": None, "label": names[label], "mask": _to_pil(class_map == label)}
                for label in torch.unique(class_map).tolist()
            ]
        if subtask == "instance":
            (result,) = self.image_processor.post_process_instance_segmentation(
                outputs,
                **thresholds,
                seen_mask=seen,
                use_mase=use_mase,
                return_binary_maps=True,
                thing_label_ids=vocabulary.thing_ids,
                **sizes,
            )
            return [
                {"score": info["score"], "label": names[info["label_id"]], "mask": _to_pil(mask)}
                for info, mask in zip(result["segments_info"], result["binary_masks"])
            ]
        (result,) = self.image_processor.post_process_panoptic_segmentation(
            outputs,
            **thresholds,
            label_ids_to_fuse=vocabulary.stuff_ids,
            seen_mask=seen,
            use_mase=use_mase,
            **sizes,
        )
        return [
            {
                "score": info["score"],
                "label": names[info["label_id"]],
                "mask": _to_pil(result["segmentation"] == info["id"]),
            }
            for info in result["segments_info"]
        ]


def is_lazy_collection(images) -> bool:
    """Inputs transformers' Pipeline streams (a generator, a torch Dataset): their items may carry their labels."""
    return isinstance(images, (types.GeneratorType, Dataset))


def is_per_image_labels(candidate_labels) -> bool:
    """
    `candidate_labels` of a call on a list of images is one label list per image when it is a list / tuple whose every
    element is a list / tuple / `Vocabulary` (`ZeroShotObjectDetectionPipeline.__call__`'s rule); a flat list, even one
    with some synonym lists (`[["cat", "kitty"], "dog"]`), is one vocabulary for all images.
    """
    return (
        isinstance(candidate_labels, (list, tuple))
        and len(candidate_labels) > 0
        and all(isinstance(labels, (list, tuple, Vocabulary)) for labels in candidate_labels)
    )


def per_image_items(images, candidate_labels) -> list[dict]:
    """`[{"image", "candidate_labels": Vocabulary}]` of a list of images and one label list per image (checked)."""
    if len(candidate_labels) != len(images):
        raise ValueError(
            f"Got {len(images)} images but {len(candidate_labels)} candidate label lists: with a list of images, a "
            "candidate_labels whose every element is a list gives one label list per image (as in transformers' "
            "zero-shot-object-detection). For one vocabulary shared by all images whose classes have synonyms, write "
            "the classes as dicts ({'name': 'cat', 'synonyms': ['kitty']}) or any of them as a plain string."
        )
    if all(
        isinstance(labels, (list, tuple)) and all(isinstance(label, str) for label in labels)
        for labels in candidate_labels
    ):
        # lists of strings only: the shape of a shared vocabulary whose every class is a list of synonyms too
        warnings.warn(
            f"candidate_labels holds one list per image ({len(images)} images), so each list is read as the classes of "
            f"its image (transformers' zero-shot-object-detection convention): image 0 gets the "
            f"{len(candidate_labels[0])} classes {preview(list(candidate_labels[0]))}. If you meant one vocabulary for "
            "all images whose classes are lists of synonyms, write those classes as {'name': 'cat', 'synonyms': "
            "['kitty']}. To give per-image labels without this warning, pass [{'image': image, 'candidate_labels': "
            "labels}, ...].",
            UserWarning,
            stacklevel=3,
        )
    items = []
    for index, (image, labels) in enumerate(zip(images, candidate_labels)):
        if isinstance(image, Mapping) and image.get("candidate_labels") is not None:
            raise ValueError(
                f"images[{index}] has its own candidate_labels and candidate_labels[{index}] gives it labels too: give "
                "them once."
            )
        try:
            vocabulary = resolve_vocabulary(labels)
        except (TypeError, ValueError) as error:  # the vocabulary layer names candidate_labels[j]: say whose list
            raise type(error)(f"In the label list of image {index} (candidate_labels[{index}]): {error}") from error
        items.append(input_item(image, vocabulary, f"images[{index}]"))  # a dict input here has no labels of its own
    return items


def input_item(entry, shared: Vocabulary | None, where: str) -> dict:
    """
    `{"image": image, "candidate_labels": Vocabulary or None}` of one input: an image (labels: the call's `shared`
    vocabulary) or a dict `{"image", "candidate_labels"}` (its own labels, resolved here; the call's when it has none).
    ValueError for a dict with other keys or without "image", and for labels given in the dict and the call both.
    """
    if not isinstance(entry, Mapping):
        return {"image": entry, "candidate_labels": shared}
    unknown = [key for key in entry if key not in INPUT_KEYS]
    if unknown or "image" not in entry:
        raise ValueError(
            f"{where} is a dict with the keys {sorted(map(str, entry))}: a dict input is {{'image': image, "
            "'candidate_labels': labels} (candidate_labels optional when the call gives them), as in transformers' "
            "zero-shot pipelines."
        )
    own = entry.get("candidate_labels")
    if own is None:
        return {"image": entry["image"], "candidate_labels": shared}
    if shared is not None:
        raise ValueError(
            f"{where} has its own candidate_labels and the call gives candidate_labels too: give them once (per "
            "input, or for the whole call)."
        )
    return {"image": entry["image"], "candidate_labels": resolve_vocabulary(own)}


def _is_a(obj: object, *classes: type) -> bool:
    """
    isinstance by class name: loaded with `trust_remote_code=True` from a local folder, the pipeline, the model and the
    image processor each come from their own copy of the checkpoint's modules (transformers keys the copy by the hash
    of the entry module and its imports), so the model's class is another copy of the same class.
    """
    names = {cls.__name__ for cls in classes}
    return any(base.__name__ in names for base in type(obj).__mro__)


class _Outputs:
    """Attribute view of the pipeline's model outputs for the post-processors."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


def _to_pil(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray(mask.to(torch.uint8).mul(255).cpu().numpy(), mode="L")


NO_DEFAULT_CHECKPOINT = (
    f"pipeline({TASK!r}) needs a model: PosSAM has no default checkpoint. Pass model=<a local folder or Hub id of a "
    "PosSAM checkpoint>. To make one: conversion/convert_possam_to_hf.py (SAM + FC-CLIP + open_clip weights), "
    "training/train.py, or for a quick test a random tiny model: "
    "`PosSAMForPanopticSegmentation(tiny_config()).save_pretrained(path)` with "
    "`PosSAMProcessor(PosSAMImageProcessor(...), clip_tokenizer_from_bpe()).save_pretrained(path)`."
)


class _NoDefaultCheckpoint(dict):
    """
    The task's `default` entry: transformers' `pipeline()` reads `default["model"]` when given no model (a task
    registered without a default fails there with a bare `KeyError: 'default'`); this one says what to do instead.
    """

    def __contains__(self, key: object) -> bool:
        return key == "model"

    def __getitem__(self, key: object):
        raise ValueError(NO_DEFAULT_CHECKPOINT)


def register_pipeline() -> None:
    from transformers import AutoModelForUniversalSegmentation
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=OpenVocabularyPanopticSegmentationPipeline,
        pt_model=AutoModelForUniversalSegmentation,
        default=_NoDefaultCheckpoint(),
        type="multimodal",
    )
    # `Pipeline.save_pretrained` of a registered pipeline copies its module and that module's relative imports as
    # they are, which this nested package cannot load from; the model's `save_pretrained` (which the pipeline's calls)
    # writes the flattened code and `custom_pipelines` instead (remote_code.py).
    if "_registered_impl" in vars(OpenVocabularyPanopticSegmentationPipeline):
        delattr(OpenVocabularyPanopticSegmentationPipeline, "_registered_impl")
