import json

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import id_to_rgb

from transformers_possam.evaluation import PanopticQualityAccumulator, SemanticConfusion, pq_compute


CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
    {"id": 4, "name": "road", "isthing": 0},
]


def crafted_images():
    """(gt ids, gt segments, pred ids, pred segments) with crowd, void, unmatched and wrong-class segments."""
    gt = np.zeros((40, 60), np.int64)
    gt[:10] = 300  # sky
    gt[10:20, :30] = 1000  # person
    gt[10:20, 30:] = 70000  # person, crowd
    gt[20:30, :20] = 2000  # car
    gt[30:, :] = 5  # road; rows 20:30 x 20:60 stay VOID
    gt_segments = [
        {"id": 300, "category_id": 3, "iscrowd": 0},
        {"id": 1000, "category_id": 1, "iscrowd": 0},
        {"id": 70000, "category_id": 1, "iscrowd": 1},
        {"id": 2000, "category_id": 2, "iscrowd": 0},
        {"id": 5, "category_id": 4, "iscrowd": 0},
    ]
    for segment in gt_segments:
        segment["area"] = int((gt == segment["id"]).sum())
    pred = np.zeros_like(gt)
    pred[:12] = 7  # sky, slightly too large -> match
    pred[12:20, :25] = 8  # person, partial -> IoU 200/300 > 0.5 match
    pred[10:20, 35:] = 9  # person on the crowd region -> ignored, not an FP
    pred[20:30, :20] = 10  # labelled road but GT car -> FP and the car is an FN
    pred[20:30, 25:] = 11  # person on VOID -> ignored
    pred[30:, :50] = 12  # road, 50/60 of the GT -> match with void-free union
    pred[30:, 50:] = 13  # car on road pixels -> FP
    pred_segments = [
        {"id": 7, "category_id": 3},
        {"id": 8, "category_id": 1},
        {"id": 9, "category_id": 1},
        {"id": 10, "category_id": 4},
        {"id": 11, "category_id": 1},
        {"id": 12, "category_id": 4},
        {"id": 13, "category_id": 2},
    ]
    yield gt, gt_segments, pred, pred_segments
    # a random second image: blocks with random categories, predictions shifted
    rng = np.random.default_rng(0)
    gt = np.repeat(np.repeat(rng.integers(1, 7, (4, 6)), 10, axis=0), 10, axis=1)
    gt_segments = [
        {"id": int(i), "category_id": int(i % 4) + 1, "iscrowd": int(i == 6), "area": int((gt == i).sum())}
        for i in np.unique(gt)
    ]
    pred = np.roll(gt, 3, axis=1) + 100
    pred[:5] = 0
    pred_segments = [{"id": int(i), "category_id": int((i - 100) % 4) + 1} for i in np.unique(pred) if i]
    yield gt, gt_segments, pred, pred_segments


def write_split(folder, name, images, which):
    (folder / name).mkdir()
    annotations = []
    for index, image in enumerate(images):
        ids, segments = (image[0], image[1]) if which == "gt" else (image[2], image[3])
        Image.fromarray(id_to_rgb(ids)).save(folder / name / f"{index}.png")
        annotations.append({"image_id": index, "file_name": f"{index}.png", "segments_info": segments})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": CATEGORIES}))
    return str(path)


def test_pq_compute_equals_panopticapi(tmp_path):
    panopticapi = pytest.importorskip("panopticapi.evaluation")
    images = list(crafted_images())
    gt_json = write_split(tmp_path, "gt", images, "gt")
    pred_json = write_split(tmp_path, "pred", images, "pred")
    ours = pq_compute(gt_json, pred_json)
    reference = panopticapi.pq_compute(gt_json, pred_json)
    assert set(ours) == set(reference) == {"All", "Things", "Stuff", "per_class"}
    for split in ("All", "Things", "Stuff"):
        assert ours[split]["n"] == reference[split]["n"]
        for key in ("pq", "sq", "rq"):
            assert ours[split][key] == pytest.approx(reference[split][key], abs=1e-12)
    for category, values in reference["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][category][key] == pytest.approx(values[key], abs=1e-12)


def test_crafted_counts_by_hand():
    gt, gt_segments, pred, pred_segments = next(crafted_images())
    accumulator = PanopticQualityAccumulator()
    accumulator.update(gt, gt_segments, pred, pred_segments)
    iou, tp, fp, fn = zip(*[accumulator.stats[c] for c in (1, 2, 3, 4)])
    assert tp == (1, 0, 1, 1) and fp == (0, 1, 0, 1) and fn == (0, 1, 0, 0)
    assert iou[0] == pytest.approx(200 / 300)  # person: union = 200 + 300 - 200
    assert iou[2] == pytest.approx(600 / 670)  # sky: 720 predicted minus 50 overwritten by the crowd-region person
    assert iou[3] == pytest.approx(500 / 600)  # road


def test_empty_split_and_seen_unseen():
    accumulator = PanopticQualityAccumulator()
    ids = np.ones((4, 4), np.int64)
    accumulator.update(
        ids, [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 16}], ids, [{"id": 1, "category_id": 1}]
    )
    categories = {c["id"]: c for c in CATEGORIES}
    results = accumulator.summarize(categories, seen_category_ids=[1, 3])
    assert results["Stuff"] == {
        "pq": 0.0,
        "sq": 0.0,
        "rq": 0.0,
        "n": 0,
    }  # no stuff segment anywhere: no ZeroDivisionError
    assert results["Things"]["pq"] == 1.0 and results["Seen"]["pq"] == 1.0 and results["Unseen"]["n"] == 0
    # accumulators merge (e.g. across processes) through a fixed-size array
    twice = PanopticQualityAccumulator.from_array(accumulator.to_array([1, 2, 3, 4]) * 2, [1, 2, 3, 4])
    assert twice.stats[1] == [2.0, 2, 0, 0]


def test_pq_sanity_errors():
    accumulator = PanopticQualityAccumulator()
    ids = np.ones((4, 4), np.int64)
    with pytest.raises(KeyError, match="not presented in JSON"):
        accumulator.update(ids, [], ids, [])
    with pytest.raises(KeyError, match="not presented in PNG"):
        accumulator.update(ids, [], ids, [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 1}])


def test_miou_by_hand():
    confusion = SemanticConfusion(num_classes=3)
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    confusion.update(pred, gt)
    result = confusion.compute()
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 1, gt 2, pred 1 -> 1/2
    assert result["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert result["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)
    absent = SemanticConfusion(num_classes=3)
    absent.update(np.zeros((2, 2)), np.zeros((2, 2)))
    assert absent.compute()["mIoU"] == 1.0  # classes 1 and 2 absent from the ground truth are left out


def test_mask_ap():
    from transformers_possam.evaluation import mask_ap

    masks = np.zeros((2, 32, 32), bool)
    masks[0, :16, :16] = True
    masks[1, 16:, 16:] = True
    gt = [{"masks": masks, "labels": [1, 2]}]
    perfect = mask_ap(gt, [{"masks": masks, "labels": [1, 2], "scores": [0.9, 0.8]}])
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    wrong = mask_ap(gt, [{"masks": masks, "labels": [2, 1], "scores": [0.9, 0.8]}])
    assert wrong["AP"] == 0.0
    assert mask_ap(gt, [{"masks": masks[:0], "labels": [], "scores": []}])["AP"] == 0.0


def test_evaluate_metric_loads_offline_and_matches(monkeypatch):
    from transformers_possam.evaluation import load_panoptic_quality_metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_panoptic_quality_metric()
    accumulator = PanopticQualityAccumulator()
    for gt, gt_segments, pred, pred_segments in crafted_images():
        accumulator.update(gt, gt_segments, pred, pred_segments)
        pred_info = [dict(s, iscrowd=0, area=0) for s in pred_segments]
        metric.add(
            predictions={"segmentation": pred.tolist(), "segments_info": pred_info},
            references={"segmentation": gt.tolist(), "segments_info": gt_segments},
        )
    result = metric.compute(categories=CATEGORIES, seen_category_ids=[1, 3])
    expected = accumulator.summarize({c["id"]: c for c in CATEGORIES}, seen_category_ids=[1, 3])
    for split in ("All", "Things", "Stuff", "Seen", "Unseen"):
        assert result[split] == pytest.approx(expected[split])
