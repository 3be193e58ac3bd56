"""Mask AP (COCO protocol) with pycocotools: an image-by-image accumulator of RLE-encoded masks, and `mask_ap`."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


__all__ = ["MaskAPAccumulator", "mask_ap"]

MASK_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6], in that order
_STATE_VERSION = 1


def _to_numpy(values: Any) -> np.ndarray:
    """Arrays, lists or (any-device) torch tensors -> a numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _mask_stack(masks: Any, name: str) -> np.ndarray | None:
    """`(K, H, W)` binary masks -> bool array; an empty input without a spatial size (e.g. `[]`) -> None."""
    array = _to_numpy(masks)
    if array.size == 0 and array.ndim != 3:
        return None
    if array.ndim != 3:
        raise ValueError(
            f"{name} must be (K, H, W) masks, got shape {array.shape} (a single mask needs a leading axis)."
        )
    if array.dtype != bool:
        # Soft masks (probabilities, logits) would be silently binarised by pycocotools' uint8 cast: refuse them.
        if not (np.issubdtype(array.dtype, np.number) and np.isin(array, (0, 1)).all()):
            raise ValueError(
                f"{name} must be boolean (or hold only 0 and 1), got dtype {array.dtype}; threshold soft masks first."
            )
        array = array.astype(bool)
    return array


def _vector(values: Any, length: int, name: str, masks_name: str, integral: bool) -> np.ndarray:
    """One value per mask, checked: 1-D, `length` long, finite, and whole numbers when `integral`."""
    array = _to_numpy(values)
    if array.size == 0 and length == 0:
        return np.zeros(0, dtype=np.int64 if integral else np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per mask), got shape {array.shape}.")
    if len(array) != length:
        raise ValueError(f"{name} has {len(array)} entries but {masks_name} has {length} masks.")
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be finite, got {array.tolist()}.")
    if integral:
        if (array != np.round(array)).any():
            raise ValueError(f"{name} must be whole numbers (category ids), got {array.tolist()}.")
        return array.astype(np.int64)
    return array.astype(np.float64)


def _encode_stack(masks: np.ndarray) -> list[dict]:
    """`(K, H, W)` bool -> K COCO RLEs with str counts (JSON- and pickle-friendly)."""
    if len(masks) == 0:
        return []
    # pycocotools encodes an (H, W, K) Fortran-ordered uint8 stack in one call.
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


class MaskAPAccumulator:
    """
    COCO mask AP (pycocotools `COCOeval`, iouType "segm") accumulated image by image. `update` RLE-encodes the masks
    at once, so what is kept over a dataset is O(RLE size), not O(N x H x W) dense masks.

    Across processes: `merge` (or `+=`) another accumulator, or combine picklable `state()`s, e.g.
    `MaskAPAccumulator.from_states(accelerate.utils.gather_object([accumulator.state()]))`. Images are numbered by
    position, so images from merged accumulators never share an id.
    """

    def __init__(self) -> None:
        self.image_sizes: list[tuple[int, int]] = []  # (height, width) per image, image id = position
        self.ground_truths: list[dict] = []  # {"image", "category_id", "iscrowd", "area", "segmentation": RLE}
        self.detections: list[dict] = []  # {"image", "category_id", "score", "segmentation": RLE}

    def __len__(self) -> int:
        """The number of images seen."""
        return len(self.image_sizes)

    def update(
        self,
        gt_masks: Any,
        gt_labels: Any,
        gt_iscrowd: Any | None = None,
        pred_masks: Any = None,
        pred_labels: Any = None,
        pred_scores: Any = None,
    ) -> None:
        """
        Adds one image. Passing keywords is safest; positionally the order is the one below (`gt_iscrowd` third,
        `None` for "no crowd"): the prediction in the place of `gt_iscrowd` is caught by the shape checks.

        Args:
            gt_masks: `(N, H, W)` bool ground-truth instance masks (`[]` or `(0, H, W)` when there is none).
            gt_labels: `(N,)` category ids.
            gt_iscrowd: `(N,)` 0/1, or None for all 0: crowd regions absorb matching predictions instead of counting
                as misses.
            pred_masks: `(M, H, W)` bool predicted masks, same `H, W` as `gt_masks` (`[]` when there is none).
            pred_labels: `(M,)` category ids.
            pred_scores: `(M,)` confidences (COCOeval ranks by them; at most 100 per image count, maxDets).

        Raises:
            ValueError: naming the argument, for a missing prediction argument, masks that are not `(K, H, W)`
                binary, `H, W` that differ between ground truth and prediction, or a label / score / iscrowd vector of
                the wrong length or values.
        """
        gt = _mask_stack(gt_masks, "gt_masks")
        num_gt = 0 if gt is None else len(gt)
        gt_labels = _vector(gt_labels, num_gt, "gt_labels", "gt_masks", integral=True)
        crowd = (
            np.zeros(num_gt, np.int64)
            if gt_iscrowd is None
            else _vector(gt_iscrowd, num_gt, "gt_iscrowd", "gt_masks", integral=True)
        )
        if not np.isin(crowd, (0, 1)).all():
            raise ValueError(f"gt_iscrowd must be 0 or 1, got {crowd.tolist()}.")
        predictions = {"pred_masks": pred_masks, "pred_labels": pred_labels, "pred_scores": pred_scores}
        missing = [name for name, value in predictions.items() if value is None]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} not given: pass [] (or a (0, H, W) stack) for an image without predictions."
            )
        pred = _mask_stack(pred_masks, "pred_masks")
        if gt is not None and pred is not None and gt.shape[1:] != pred.shape[1:]:
            raise ValueError(
                f"gt_masks are {gt.shape[1:]} (H, W) but pred_masks are {pred.shape[1:]}: one image, one size."
            )
        # An image without masks on either side has no size to record; it can influence no match, so (0, 0) is fine.
        height, width = next((stack.shape[1:] for stack in (gt, pred) if stack is not None), (0, 0))
        gt = gt if gt is not None else np.zeros((0, height, width), bool)
        pred = pred if pred is not None else np.zeros((0, height, width), bool)
        pred_labels = _vector(pred_labels, len(pred), "pred_labels", "pred_masks", integral=True)
        pred_scores = _vector(pred_scores, len(pred), "pred_scores", "pred_masks", integral=False)

        image = len(self.image_sizes)
        self.image_sizes.append((int(height), int(width)))
        gt_rles = _encode_stack(gt)
        areas = mask_utils.area(gt_rles).tolist() if gt_rles else []
        for rle, label, is_crowd, area in zip(gt_rles, gt_labels.tolist(), crowd.tolist(), areas):
            self.ground_truths.append(
                {"image": image, "category_id": label, "iscrowd": is_crowd, "area": int(area), "segmentation": rle}
            )
        for rle, label, score in zip(_encode_stack(pred), pred_labels.tolist(), pred_scores.tolist()):
            self.detections.append({"image": image, "category_id": label, "score": score, "segmentation": rle})

    def merge(self, other: MaskAPAccumulator) -> MaskAPAccumulator:
        """Appends `other`'s images after this accumulator's (renumbered, so ids stay unique); returns self."""
        if not isinstance(other, MaskAPAccumulator):
            raise TypeError(f"Can only merge a MaskAPAccumulator, got {type(other).__name__}.")
        offset = len(self.image_sizes)
        self.image_sizes.extend(other.image_sizes)
        self.ground_truths.extend(
            dict(copy.deepcopy(record), image=record["image"] + offset) for record in other.ground_truths
        )
        self.detections.extend(
            dict(copy.deepcopy(record), image=record["image"] + offset) for record in other.detections
        )
        return self

    __iadd__ = merge

    def state(self) -> dict:
        """A picklable (and JSON-serialisable) copy of the accumulated images, for `from_states`."""
        return copy.deepcopy(
            {
                "version": _STATE_VERSION,
                "image_sizes": [list(size) for size in self.image_sizes],
                "ground_truths": self.ground_truths,
                "detections": self.detections,
            }
        )

    @classmethod
    def from_states(cls, states: Iterable[Mapping]) -> MaskAPAccumulator:
        """One accumulator holding the images of every `state()` in `states`, in order."""
        if isinstance(states, Mapping):
            raise TypeError("from_states takes a list of states (e.g. the list gather_object returns), got one state.")
        combined = cls()
        for index, state in enumerate(states):
            if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
                raise ValueError(f"states[{index}] is not a MaskAPAccumulator.state() (version {_STATE_VERSION}).")
            part = cls()
            part.image_sizes = [(int(h), int(w)) for h, w in state["image_sizes"]]
            part.ground_truths = list(state["ground_truths"])
            part.detections = list(state["detections"])
            if any(
                not 0 <= record["image"] < len(part.image_sizes) for record in part.ground_truths + part.detections
            ):
                raise ValueError(f"states[{index}] refers to an image it does not list.")
            combined.merge(part)
        return combined

    def compute(self, category_ids: Sequence[int] | None = None) -> dict[str, float]:
        """
        Args:
            category_ids: the categories to evaluate (default: every label of the ground truth, crowd included).

        Returns:
            `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` in [0, 1]: `COCOeval.stats[:6]`, with COCOeval's -1 (nothing
            to evaluate) reported as 0; all 0 when there is no ground truth, no prediction or no category at all (e.g.
            a vocabulary without thing classes).
        """
        if category_ids is None:
            category_ids = sorted({record["category_id"] for record in self.ground_truths})
        category_ids = [int(c) for c in category_ids]
        if not self.ground_truths or not self.detections or not category_ids:
            return dict.fromkeys(MASK_AP_KEYS, 0.0)
        # Fresh dicts every call: COCO.loadRes and COCOeval write into the records they are given.
        images = [
            {"id": image, "height": height, "width": width} for image, (height, width) in enumerate(self.image_sizes)
        ]
        annotations = [
            {
                "id": number,  # COCOeval takes annotation id 0 for "unmatched": number from 1
                "image_id": record["image"],
                "category_id": record["category_id"],
                "iscrowd": record["iscrowd"],
                "area": float(record["area"]),
                "bbox": mask_utils.toBbox(record["segmentation"]).tolist(),
                "segmentation": dict(record["segmentation"]),
            }
            for number, record in enumerate(self.ground_truths, start=1)
        ]
        detections = [
            {
                "image_id": record["image"],
                "category_id": record["category_id"],
                "score": record["score"],
                "segmentation": dict(record["segmentation"]),
            }
            for record in self.detections
        ]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary table
            coco_gt = COCO()
            coco_gt.dataset = {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c} for c in category_ids],
            }
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(detections)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
            evaluator.params.catIds = category_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {key: max(float(value), 0.0) for key, value in zip(MASK_AP_KEYS, evaluator.stats[:6])}


def mask_ap(
    ground_truths: list[dict], predictions: list[dict], category_ids: list[int] | None = None
) -> dict[str, float]:
    """
    COCO mask AP over a set of images (a `MaskAPAccumulator` fed image by image).

    Args:
        ground_truths: per image `{"masks": (N, H, W) bool, "labels": (N,), "iscrowd": (N,) optional}`.
        predictions: per image `{"masks": (M, H, W) bool, "labels": (M,), "scores": (M,)}`.
        category_ids: the categories to evaluate (default: every label seen in the ground truth).

    Returns:
        `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` in [0, 1] (0 when there is no prediction).
    """
    if len(ground_truths) != len(predictions):
        raise ValueError(f"{len(ground_truths)} ground truths but {len(predictions)} predictions: one each per image.")
    accumulator = MaskAPAccumulator()
    for index, (gt, pred) in enumerate(zip(ground_truths, predictions)):
        try:
            accumulator.update(
                gt_masks=gt["masks"],
                gt_labels=gt["labels"],
                gt_iscrowd=gt.get("iscrowd"),
                pred_masks=pred["masks"],
                pred_labels=pred["labels"],
                pred_scores=pred["scores"],
            )
        except ValueError as error:
            raise ValueError(f"Image {index} (ground_truths[{index}] / predictions[{index}]): {error}") from error
    return accumulator.compute(category_ids)
