"""Evaluation: panoptic quality (panopticapi rules), semantic mIoU, mask AP, PQ on seen / unseen classes."""

from pathlib import Path

from .instance import MaskAPAccumulator, mask_ap
from .loop import PanopticEvaluator, evaluate_panoptic, vocabulary_embeddings
from .panoptic import PanopticQualityAccumulator, pq_compute, segment_id_map
from .semantic import SemanticConfusion, panoptic_to_semantic


PANOPTIC_QUALITY_METRIC_PATH = str(Path(__file__).parent / "panoptic_quality" / "panoptic_quality.py")


def load_panoptic_quality_metric(**kwargs):
    """The panoptic-quality `evaluate.Metric`, loaded from this package's file (works offline)."""
    import evaluate

    return evaluate.load(PANOPTIC_QUALITY_METRIC_PATH, **kwargs)


__all__ = [
    "PANOPTIC_QUALITY_METRIC_PATH",
    "MaskAPAccumulator",
    "PanopticEvaluator",
    "PanopticQualityAccumulator",
    "SemanticConfusion",
    "evaluate_panoptic",
    "load_panoptic_quality_metric",
    "mask_ap",
    "panoptic_to_semantic",
    "pq_compute",
    "segment_id_map",
    "vocabulary_embeddings",
]
