"""Semantic segmentation mIoU from a confusion matrix (detectron2 SemSegEvaluator's rules)."""

from __future__ import annotations

import numpy as np

__all__ = ["SemanticConfusion"]


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
