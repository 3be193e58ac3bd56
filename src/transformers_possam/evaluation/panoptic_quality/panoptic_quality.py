"""`evaluate` metric: panoptic quality with panopticapi's rules (transformers-possam).

Load it from its local path, offline: `evaluate.load(transformers_possam.evaluation.PANOPTIC_QUALITY_METRIC_PATH)`
or `transformers_possam.evaluation.load_panoptic_quality_metric()`.
"""

import datasets
import evaluate
import numpy as np

from transformers_possam.evaluation.panoptic import PanopticQualityAccumulator

_DESCRIPTION = "Panoptic quality (PQ, SQ, RQ; All/Things/Stuff and per class; optional Seen/Unseen) with panopticapi's rules."
_KWARGS_DESCRIPTION = """
Args:
    predictions: per image {"segmentation": (H, W) segment ids, 0 = none, "segments_info": [{"id", "category_id"}]}.
    references: per image {"segmentation": (H, W) segment ids, 0 = VOID, "segments_info": [{"id", "category_id",
        "iscrowd", "area"}]}.
    categories: list of {"id", "isthing"} (or a dict id -> {"isthing"}).
    seen_category_ids: optional, adds "Seen" / "Unseen" splits.
Returns:
    the dict of panopticapi's pq_compute.
"""

_SEGMENTS = {
    "segmentation": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
    "segments_info": [
        {"id": datasets.Value("int64"), "category_id": datasets.Value("int64"), "iscrowd": datasets.Value("int64"), "area": datasets.Value("int64")}
    ],
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

    def _compute(self, predictions, references, categories, seen_category_ids=None):
        if not isinstance(categories, dict):
            categories = {int(c["id"]): c for c in categories}
        accumulator = PanopticQualityAccumulator()
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            accumulator.update(
                np.asarray(reference["segmentation"], dtype=np.int64),
                _rows(reference["segments_info"]),
                np.asarray(prediction["segmentation"], dtype=np.int64),
                _rows(prediction["segments_info"]),
                image_id=index,
            )
        return accumulator.summarize(categories, seen_category_ids)


def _rows(segments):
    """datasets stores a sequence of dicts as a dict of lists."""
    if isinstance(segments, dict):
        keys = list(segments)
        return [dict(zip(keys, values)) for values in zip(*(segments[k] for k in keys))]
    return list(segments)
