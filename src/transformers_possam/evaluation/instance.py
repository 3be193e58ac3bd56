"""Mask AP (COCO protocol) with pycocotools."""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["mask_ap"]


def _encode(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def mask_ap(ground_truths: list[dict], predictions: list[dict], category_ids: list[int] | None = None) -> dict:
    """
    COCO mask AP over a set of images.

    Args:
        ground_truths: per image `{"masks": (N, H, W) bool, "labels": (N,), "iscrowd": (N,) optional}`.
        predictions: per image `{"masks": (M, H, W) bool, "labels": (M,), "scores": (M,)}`.
        category_ids: the categories to evaluate (default: every label seen in the ground truth).

    Returns:
        `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` in [0, 1] (0 when there is no prediction).
    """
    if len(ground_truths) != len(predictions):
        raise ValueError(f"{len(ground_truths)} ground truths but {len(predictions)} predictions: one each per image.")
    images, annotations, detections = [], [], []
    for image_id, (gt, pred) in enumerate(zip(ground_truths, predictions)):
        masks = np.asarray(gt["masks"], dtype=bool)
        height, width = masks.shape[-2:] if masks.ndim == 3 else np.asarray(pred["masks"]).shape[-2:]
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        crowd = np.asarray(gt.get("iscrowd", np.zeros(len(masks))), dtype=int)
        for mask, label, is_crowd in zip(masks, np.asarray(gt["labels"]).tolist(), crowd.tolist()):
            rle = _encode(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label), "segmentation": rle,
                "area": float(mask_utils.area(rle)), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": int(is_crowd),
            })
        for mask, label, score in zip(np.asarray(pred["masks"], dtype=bool), np.asarray(pred["labels"]).tolist(), np.asarray(pred["scores"]).tolist()):
            detections.append({"image_id": image_id, "category_id": int(label), "segmentation": _encode(mask), "score": float(score)})
    if category_ids is None:
        category_ids = sorted({a["category_id"] for a in annotations})
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    if not detections or not annotations:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": int(c)} for c in category_ids]}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.catIds = [int(c) for c in category_ids]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: max(float(value), 0.0) for key, value in zip(keys, evaluator.stats[:6])}
