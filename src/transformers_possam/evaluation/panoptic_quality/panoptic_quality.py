"""`evaluate` metric: panoptic quality with panopticapi's rules (transformers-possam).

Load it from its local path, offline: `evaluate.load(transformers_possam.evaluation.PANOPTIC_QUALITY_METRIC_PATH)`
or `transformers_possam.evaluation.load_panoptic_quality_metric()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

from transformers_possam.evaluation.panoptic import PanopticQualityAccumulator, segment_id_map


_DESCRIPTION = (
    "Panoptic quality (PQ, SQ, RQ; All/Things/Stuff and per class; optional Seen/Unseen) with panopticapi's rules."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: per image `{"segmentation": (H, W) segment ids (0 = none) or an (H, W, 3) RGB panoptic PNG array,
        "segments_info": [{"id", "category_id"}]}`. `label_id` (what this package's post-processors emit) is accepted
        in place of `category_id`. Predicted areas are always recounted from `segmentation`; any other key of a
        segment (`score`, `was_fused`, `iscrowd`, `area`, ...) is ignored.
    references: per image `{"segmentation": (H, W) segment ids (0 = VOID) or an (H, W, 3) RGB panoptic PNG array,
        "segments_info": [{"id", "category_id", "iscrowd"?, "area"?, ...}]}` — COCO panoptic `segments_info` as they
        are (`bbox` and any other key are ignored). `area` is used as given, as panopticapi does (it enters the IoU
        union); when a segment has no `area` its pixel count in `segmentation` is used. A missing `iscrowd` means 0.
    categories: list of {"id", "isthing"} (or a dict id -> {"isthing"}).
    seen_category_ids: optional, adds "Seen" / "Unseen" splits.
Returns:
    the dict of panopticapi's pq_compute: `{"All", "Things", "Stuff": {"pq", "sq", "rq", "n"}, "per_class": {...}}`,
    plus "Seen" / "Unseen" with `seen_category_ids`.
"""

# The stored (Arrow) form of one segment. Inputs are projected onto exactly these keys in `add` / `add_batch`:
# `evaluate` checks every dict of an example against the feature with `datasets.utils.py_utils.zip_dict`, which
# raises KeyError on any key present on one side only, so neither COCO's extra `bbox` nor a prediction without
# `iscrowd` / `area` could be declared away in the features themselves. Absent optional values are stored as null.
_SEGMENT_KEYS = ("id", "category_id", "iscrowd", "area")
_SEGMENTS = {
    "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
    "segments_info": [{key: datasets.Value("int64") for key in _SEGMENT_KEYS}],
}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PanopticQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Kirillov et al., Panoptic Segmentation, CVPR 2019",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _SEGMENTS, "references": _SEGMENTS}),
        )

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Adds one image (its segments normalised to the stored form first)."""
        return super().add(
            prediction=None if prediction is None else _normalized_image(prediction, "prediction"),
            reference=None if reference is None else _normalized_image(reference, "reference"),
            **kwargs,
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Adds a batch of images (their segments normalised to the stored form first); `compute` goes through here."""
        if predictions is not None:
            predictions = [
                _normalized_image(image, f"predictions[{index}]") for index, image in enumerate(predictions)
            ]
        if references is not None:
            references = [_normalized_image(image, f"references[{index}]") for index, image in enumerate(references)]
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, categories, seen_category_ids=None):
        if not isinstance(categories, dict):
            categories = {int(c["id"]): c for c in categories}
        accumulator = PanopticQualityAccumulator()
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            reference_ids = np.asarray(reference["segmentation"], dtype=np.int64)
            reference_segments = _rows(reference["segments_info"])
            if any(segment["area"] is None for segment in reference_segments):
                labels, counts = np.unique(reference_ids, return_counts=True)
                pixel_count = dict(zip(labels.tolist(), counts.tolist()))
                for segment in reference_segments:
                    if segment["area"] is None:
                        segment["area"] = pixel_count.get(segment["id"], 0)
            for segment in reference_segments:
                segment["iscrowd"] = segment["iscrowd"] or 0
            accumulator.update(
                reference_ids,
                reference_segments,
                np.asarray(prediction["segmentation"], dtype=np.int64),
                _rows(prediction["segments_info"]),
                image_id=index,
            )
        return accumulator.summarize(categories, seen_category_ids)


def _rows(segments) -> list[dict]:
    """datasets may hand a sequence of dicts back as a dict of lists; either way -> a list of (new) dicts."""
    if isinstance(segments, Mapping):
        keys = list(segments)
        return [dict(zip(keys, values)) for values in zip(*(segments[k] for k in keys))]
    return [dict(segment) for segment in segments]


def _normalized_image(image: Any, where: str) -> dict:
    """
    One prediction / reference -> `{"segmentation": (H, W) int64, "segments_info": [{id, category_id, iscrowd, area}]}`
    with exactly the stored keys (`None` for an absent `iscrowd` / `area`), raising errors that name `where`.
    """
    if not isinstance(image, Mapping) or "segmentation" not in image or "segments_info" not in image:
        raise ValueError(
            f"{where} must be a dict with 'segmentation' and 'segments_info', got {type(image).__name__}."
        )
    ids = np.asarray(image["segmentation"])
    if ids.ndim == 3 and ids.shape[-1] == 3:  # an RGB panoptic PNG
        ids = segment_id_map(ids)
    if ids.ndim != 2:
        raise ValueError(
            f"{where}['segmentation'] must be (H, W) segment ids or (H, W, 3) RGB, got shape {ids.shape}."
        )
    if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype == bool):
        raise ValueError(f"{where}['segmentation'] must hold integer segment ids, got dtype {ids.dtype}.")
    segments = image["segments_info"]
    if isinstance(segments, Mapping):
        segments = _rows(segments)
    if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
        raise ValueError(f"{where}['segments_info'] must be a list of dicts, got {type(segments).__name__}.")
    normalized_segments = [_normalized_segment(s, f"{where}['segments_info'][{i}]") for i, s in enumerate(segments)]
    return {"segmentation": ids.astype(np.int64), "segments_info": normalized_segments}


def _normalized_segment(segment: Any, where: str) -> dict:
    if not isinstance(segment, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(segment).__name__}.")
    if "id" not in segment:
        raise ValueError(f"{where} has no 'id'.")
    category = segment.get("category_id", segment.get("label_id"))
    if category is None:
        raise ValueError(f"{where} has neither 'category_id' nor 'label_id'.")
    if "label_id" in segment and "category_id" in segment and int(segment["label_id"]) != int(segment["category_id"]):
        raise ValueError(
            f"{where} has 'category_id' {segment['category_id']} and a different 'label_id' {segment['label_id']}."
        )
    optional = {key: None if segment.get(key) is None else int(segment[key]) for key in ("iscrowd", "area")}
    return {"id": int(segment["id"]), "category_id": int(category), **optional}
