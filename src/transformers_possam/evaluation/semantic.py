"""Semantic segmentation: mIoU from a confusion matrix (detectron2 SemSegEvaluator's rules) and the semantic ground
truth derived from a panoptic annotation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .panoptic import segment_id_map


__all__ = ["SemanticConfusion", "panoptic_to_semantic"]


def panoptic_to_semantic(
    segment_ids: np.ndarray,
    segments_info: Iterable[Mapping],
    label_map: Mapping[int, int] | None = None,
    ignore_index: int = 255,
) -> np.ndarray:
    """
    The semantic ground truth of a panoptic annotation, by the rule of panopticapi's
    `converters/panoptic2semantic_segmentation.py` and Mask2Former's
    `datasets/prepare_coco_semantic_annos_from_panoptic_annos.py`: every segment of `segments_info`, crowd segments
    included, paints its pixels with its category; pixels of no segment (VOID, or ids `segments_info` does not
    list) are `ignore_index`.

    Args:
        segment_ids: `(H, W)` integer segment ids, or an `(H, W, 3)` RGB panoptic PNG array (id = R + 256 G + 256^2 B).
        segments_info: `[{"id", "category_id", ...}]` (COCO panoptic; other keys such as `iscrowd` are not used).
        label_map: dataset category id -> class index (e.g. COCO's 1..200 -> 0..132); default: the category id itself.
        ignore_index: the value of unlabelled pixels; no class may take it.

    Returns:
        `(H, W)` int64 class map.

    Raises:
        ValueError: `segment_ids` of another shape or a non-integer dtype; a segment without `id` / `category_id`; a
            segment id listed twice; a listed segment id that does not occur in `segment_ids`; a class equal to
            `ignore_index`.
        KeyError: a category id missing from `label_map`.
    """
    ids = np.asarray(segment_ids)
    if ids.ndim == 3 and ids.shape[-1] == 3:
        ids = segment_id_map(ids)
    if ids.ndim != 2:
        raise ValueError(f"segment_ids must be (H, W) ids or an (H, W, 3) RGB panoptic PNG, got shape {ids.shape}.")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"segment_ids must hold integer segment ids, got dtype {ids.dtype}.")
    if isinstance(segments_info, (Mapping, str, bytes)):
        raise ValueError(f"segments_info must be a list of segment dicts, got {type(segments_info).__name__}.")
    # One class per distinct id, then one gather: a single pass over the pixels instead of one mask per segment.
    present_ids, pixel_to_present = np.unique(ids.astype(np.int64), return_inverse=True)
    class_of_present = np.full(len(present_ids), ignore_index, dtype=np.int64)
    position_of_id = {segment_id: position for position, segment_id in enumerate(present_ids.tolist())}
    seen_ids: set[int] = set()
    for index, segment in enumerate(segments_info):
        if not isinstance(segment, Mapping) or "id" not in segment or "category_id" not in segment:
            raise ValueError(f"segments_info[{index}] must be a dict with 'id' and 'category_id', got {segment!r}.")
        segment_id, category = int(segment["id"]), int(segment["category_id"])
        # A repeated id would make the class of its pixels depend on the listing order.
        if segment_id in seen_ids:
            raise ValueError(f"segments_info lists segment id {segment_id} twice.")
        seen_ids.add(segment_id)
        if segment_id not in position_of_id:
            raise ValueError(f"segments_info names segment id {segment_id}, which does not occur in segment_ids.")
        if label_map is None:
            class_index = category
        elif category in label_map:
            class_index = int(label_map[category])
        else:
            raise KeyError(f"Category id {category} (segment id {segment_id}) is not in label_map.")
        if class_index == ignore_index:
            raise ValueError(
                f"Category id {category} (segment id {segment_id}) maps to class {class_index}, which is ignore_index."
            )
        class_of_present[position_of_id[segment_id]] = class_index
    return class_of_present[pixel_to_present.reshape(ids.shape)]


class SemanticConfusion:
    """
    Accumulates a `(K, K)` confusion matrix (rows = ground truth, columns = prediction), ignoring ground-truth pixels
    equal to `ignore_index`. mIoU = mean IoU over the classes present in the ground truth (detectron2's rule);
    `matrix` can be summed across processes.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction, ground_truth) -> None:
        prediction, ground_truth = np.asarray(prediction).astype(np.int64), np.asarray(ground_truth).astype(np.int64)
        if prediction.shape != ground_truth.shape:
            raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in size.")
        valid = ground_truth != self.ignore_index
        if ((ground_truth[valid] < 0) | (ground_truth[valid] >= self.num_classes)).any():
            raise ValueError(f"Ground-truth classes must be in [0, {self.num_classes}) or {self.ignore_index}.")
        if ((prediction[valid] < 0) | (prediction[valid] >= self.num_classes)).any():
            raise ValueError(f"Predicted classes must be in [0, {self.num_classes}).")
        index = ground_truth[valid] * self.num_classes + prediction[valid]
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)

    def compute(self) -> dict:
        """`{"mIoU", "pixel_accuracy", "per_class_iou"}` (IoU NaN for classes absent from the ground truth)."""
        true_positive = np.diag(self.matrix).astype(np.float64)
        gt_pixels = self.matrix.sum(1).astype(np.float64)
        pred_pixels = self.matrix.sum(0).astype(np.float64)
        union = gt_pixels + pred_pixels - true_positive
        present = gt_pixels > 0
        iou = np.full(self.num_classes, np.nan)
        iou[present] = true_positive[present] / union[present]
        total = gt_pixels.sum()
        return {
            "mIoU": float(np.nanmean(iou)) if present.any() else 0.0,
            "pixel_accuracy": float(true_positive.sum() / total) if total else 0.0,
            "per_class_iou": iou.tolist(),
        }
