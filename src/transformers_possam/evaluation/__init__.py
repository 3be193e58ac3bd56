"""Evaluation: panoptic quality (panopticapi rules), semantic mIoU, PQ on seen / unseen classes."""

from .panoptic import PanopticQualityAccumulator, pq_compute, rgb2id
from .semantic import SemanticConfusion

__all__ = ["PanopticQualityAccumulator", "SemanticConfusion", "pq_compute", "rgb2id"]
