"""Panoptic quality (Kirillov et al.) with panopticapi's exact rules, as an accumulator and as `pq_compute`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
from PIL import Image
from transformers.image_transforms import rgb_to_id


__all__ = ["PanopticQualityAccumulator", "pq_compute", "segment_id_map", "OFFSET", "VOID"]

OFFSET = 256 * 256 * 256
VOID = 0


def segment_id_map(array: np.ndarray) -> np.ndarray:
    """
    `(H, W)` int64 segment ids of an `(H, W)` id map, or of an `(H, W, 3)` panoptic PNG array (transformers'
    `rgb_to_id`: R + 256 G + 256^2 B).
    """
    # int64 before the colour sum: transformers' rgb_to_id keeps other dtypes than uint8, and uint16 would overflow
    ids = np.asarray(array).astype(np.int64)
    return rgb_to_id(ids) if ids.ndim == 3 else ids


class PanopticQualityAccumulator:
    """
    Per-category sums of true positives, false positives, false negatives and matched IoU, image by image, with
    panopticapi's rules: a match needs the same category and IoU > 0.5, where the union leaves out the predicted
    segment's VOID pixels; crowd ground truth is never matched nor counted as a miss; an unmatched prediction is not
    a false positive when more than half of it lies on VOID plus same-category crowd pixels.

    `update` per image; `merge` or `+=` accumulators (e.g. from other processes; `to_array`/`from_array` give a
    fixed-size tensor form for `accelerator.reduce`); `summarize(categories)` gives panopticapi's result dict.
    """

    def __init__(self):
        self.stats: dict[int, list[float]] = {}  # category -> [iou, tp, fp, fn]

    def _category(self, category_id: int) -> list[float]:
        return self.stats.setdefault(int(category_id), [0.0, 0, 0, 0])

    def update(
        self,
        gt_ids: np.ndarray,
        gt_segments: Iterable[Mapping],
        pred_ids: np.ndarray,
        pred_segments: Iterable[Mapping],
        categories: Mapping[int, Mapping] | None = None,
        image_id=None,
    ) -> None:
        """
        Args:
            gt_ids, pred_ids: `(H, W)` segment-id maps (or RGB panoptic PNG arrays), 0 = VOID.
            gt_segments: ground-truth segments_info (`id`, `category_id`, `iscrowd`, `area` — panopticapi uses the
                annotated area in the union).
            pred_segments: predicted segments_info (`id`, `category_id`); areas are recounted from `pred_ids`.
            categories: when given, predicted categories must be in it (panopticapi's check).
        """
        gt_ids, pred_ids = segment_id_map(gt_ids), segment_id_map(pred_ids)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(
                f"Image {image_id}: ground truth {gt_ids.shape} and prediction {pred_ids.shape} differ in size."
            )
        gt_segms = {int(s["id"]): dict(s) for s in gt_segments}
        pred_segms = {int(s["id"]): dict(s) for s in pred_segments}

        labels, counts = np.unique(pred_ids, return_counts=True)
        unseen = set(pred_segms)
        for label, count in zip(labels.tolist(), counts.tolist()):
            if label not in pred_segms:
                if label == VOID:
                    continue
                raise KeyError(
                    f"In the image with ID {image_id} segment with ID {label} is presented in PNG and not presented in JSON."
                )
            pred_segms[label]["area"] = count
            unseen.discard(label)
            if categories is not None and pred_segms[label]["category_id"] not in categories:
                raise KeyError(
                    f"In the image with ID {image_id} segment with ID {label} has unknown category_id {pred_segms[label]['category_id']}."
                )
        if unseen:
            raise KeyError(
                f"In the image with ID {image_id} the following segment IDs {sorted(unseen)} are presented in JSON and not presented in PNG."
            )

        pairs, intersections = np.unique(gt_ids * OFFSET + pred_ids, return_counts=True)
        overlap = {(int(p // OFFSET), int(p % OFFSET)): int(c) for p, c in zip(pairs.tolist(), intersections.tolist())}

        gt_matched, pred_matched = set(), set()
        for (gt_label, pred_label), intersection in overlap.items():
            if gt_label not in gt_segms or pred_label not in pred_segms:
                continue
            gt, pred = gt_segms[gt_label], pred_segms[pred_label]
            if gt.get("iscrowd", 0) == 1 or gt["category_id"] != pred["category_id"]:
                continue
            union = pred["area"] + gt["area"] - intersection - overlap.get((VOID, pred_label), 0)
            iou = intersection / union
            if iou > 0.5:
                stat = self._category(gt["category_id"])
                stat[1] += 1
                stat[0] += iou
                gt_matched.add(gt_label)
                pred_matched.add(pred_label)

        crowd_of_category = {}
        for gt_label, gt in gt_segms.items():
            if gt_label in gt_matched:
                continue
            if gt.get("iscrowd", 0) == 1:
                crowd_of_category[gt["category_id"]] = gt_label
                continue
            self._category(gt["category_id"])[3] += 1
        for pred_label, pred in pred_segms.items():
            if pred_label in pred_matched:
                continue
            ignored = overlap.get((VOID, pred_label), 0)
            if pred["category_id"] in crowd_of_category:
                ignored += overlap.get((crowd_of_category[pred["category_id"]], pred_label), 0)
            if ignored / pred["area"] > 0.5:
                continue
            self._category(pred["category_id"])[2] += 1

    def merge(self, other: PanopticQualityAccumulator) -> PanopticQualityAccumulator:
        for category, values in other.stats.items():
            stat = self._category(category)
            for index in range(4):
                stat[index] += values[index]
        return self

    __iadd__ = merge

    def to_array(self, category_ids: list[int]) -> np.ndarray:
        """`(C, 4)` float64 [iou, tp, fp, fn] in `category_ids` order (sum it across processes)."""
        return np.array([self.stats.get(c, [0.0, 0, 0, 0]) for c in category_ids], dtype=np.float64).reshape(-1, 4)

    @classmethod
    def from_array(cls, array, category_ids: list[int]) -> PanopticQualityAccumulator:
        accumulator = cls()
        for category, (iou, tp, fp, fn) in zip(category_ids, np.asarray(array, dtype=np.float64).tolist()):
            if tp or fp or fn or iou:
                accumulator.stats[int(category)] = [iou, int(tp), int(fp), int(fn)]
        return accumulator

    def average(
        self, categories: Mapping[int, Mapping], isthing: bool | None = None, subset: Iterable[int] | None = None
    ):
        """panopticapi's `pq_average`, with `n = 0` giving zeros instead of a ZeroDivisionError."""
        subset = None if subset is None else {int(c) for c in subset}
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for label, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            if subset is not None and int(label) not in subset:
                continue
            iou, tp, fp, fn = self.stats.get(int(label), [0.0, 0, 0, 0])
            if tp + fp + fn == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:
            return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

    def summarize(self, categories: Mapping[int, Mapping], seen_category_ids: Iterable[int] | None = None) -> dict:
        """
        `{"All", "Things", "Stuff": {pq, sq, rq, n}, "per_class": {...}}` as panopticapi's `pq_compute`; with
        `seen_category_ids`, also `"Seen"` and `"Unseen"` (paper Table 3: PQ_seen / PQ_unseen).
        """
        results = {}
        results["All"], results["per_class"] = self.average(categories)
        results["Things"], _ = self.average(categories, isthing=True)
        results["Stuff"], _ = self.average(categories, isthing=False)
        if seen_category_ids is not None:
            seen = {int(c) for c in seen_category_ids}
            results["Seen"], _ = self.average(categories, subset=seen)
            results["Unseen"], _ = self.average(categories, subset=[c for c in categories if int(c) not in seen])
        return results


def pq_compute(
    gt_json_file: str, pred_json_file: str, gt_folder: str | None = None, pred_folder: str | None = None
) -> dict:
    """
    Drop-in for panopticapi's `pq_compute` (same files, same result dict, same sanity errors), in one process and
    without its prints; categories with no segment in a split give PQ 0 with n = 0 instead of dividing by zero.
    """
    with open(gt_json_file, encoding="utf-8") as handle:
        gt_json = json.load(handle)
    with open(pred_json_file, encoding="utf-8") as handle:
        pred_json = json.load(handle)
    gt_folder = gt_folder if gt_folder is not None else gt_json_file.replace(".json", "")
    pred_folder = pred_folder if pred_folder is not None else pred_json_file.replace(".json", "")
    for folder, what in ((gt_folder, "ground truth"), (pred_folder, "predicted")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Folder {folder} with {what} segmentations doesn't exist")
    categories = {c["id"]: c for c in gt_json["categories"]}
    predictions = {a["image_id"]: a for a in pred_json["annotations"]}
    accumulator = PanopticQualityAccumulator()
    for gt_ann in gt_json["annotations"]:
        image_id = gt_ann["image_id"]
        if image_id not in predictions:
            raise KeyError(f"no prediction for the image with id: {image_id}")
        pred_ann = predictions[image_id]
        gt_png = np.array(Image.open(os.path.join(gt_folder, gt_ann["file_name"])), dtype=np.uint32)
        pred_png = np.array(Image.open(os.path.join(pred_folder, pred_ann["file_name"])), dtype=np.uint32)
        accumulator.update(gt_png, gt_ann["segments_info"], pred_png, pred_ann["segments_info"], categories, image_id)
    return accumulator.summarize(categories)
