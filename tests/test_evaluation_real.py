"""
Evaluation on real COCO panoptic data (two val2017 images from panopticapi's sample_data), checked against
independent references only: panopticapi's `pq_compute`, pycocotools' `COCOeval` driven directly, and a literal
transcription of the reference panoptic -> semantic conversion scripts.
"""

import contextlib
import io
import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.ndimage import binary_erosion


panopticapi_evaluation = pytest.importorskip("panopticapi.evaluation")
from panopticapi.utils import id2rgb, rgb2id  # noqa: E402

from transformers_possam.evaluation import load_panoptic_quality_metric, pq_compute  # noqa: E402


SAMPLE = Path(os.environ.get("POSSAM_COCO_PANOPTIC_SAMPLE", "/work/shared/data/coco-panoptic-sample"))
if not (SAMPLE / "panoptic_examples.json").is_file():
    pytest.skip(f"the COCO panoptic sample is not at {SAMPLE}", allow_module_level=True)

CATEGORIES = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
THING_IDS = {c["id"] for c in CATEGORIES if c["isthing"]}
# Mask2Former's id_map: the i-th of the 133 categories -> class index i.
LABEL_MAP = {c["id"]: index for index, c in enumerate(CATEGORIES)}
TREE_ID = 2330219  # "tree-merged" in both images
# The crowd segments of the sample: (image id, segment id, category id).
CROWD_SEGMENTS = [(142238, 3153362, 1), (439180, 5120499, 1), (439180, 16175517, 19)]  # person, person, horse

# Prediction = ground truth with these edits, by real segment id; each exercises one of panopticapi's rules.
EDITS = {
    142238: {
        "drop": {3997935},  # person at the left border (153 px): a miss
        "merge": {
            3476419: 4325578
        },  # two ~4000 px persons as one segment: IoU 0.507 with the larger, the other missed
        "shift": {2098642: (0, 12)},  # person moved 12 px right: IoU under 0.5, an FP + FN
        "relabel": {16757838: 34},  # sports ball predicted as frisbee: FP frisbee + FN sports ball
        "crowd_as": {3153362: 1},  # the person crowd predicted as one person: on a same-category crowd, not an FP
        "void": (193, 0),  # every VOID pixel predicted as grass: all on VOID, not an FP
    },
    439180: {
        "drop": {15714220},  # 96 px horse
        "merge": {4587520: 6094848},  # trucks of 1680 and 5791 px as one segment: IoU 0.775 with the larger
        "shift": {16306338: (20, 0)},  # horse moved 20 px down: still matched, lower IoU
        "relabel": {11881084: 154},  # gravel predicted as sand: a stuff FP + FN
        "crowd_as": {5120499: 1, 16175517: 1},  # person crowd as person (ignored); horse crowd as person (an FP)
        "void": (199, 10000),  # VOID plus 10000 tree pixels as wall: under half on VOID, so an FP
    },
}


def load_sample():
    """[(image id, file name, (H, W) int64 ids, segments_info as in the JSON)] for the two images."""
    annotations = json.loads((SAMPLE / "panoptic_examples.json").read_text())["annotations"]
    images = []
    for annotation in annotations:
        png = np.array(Image.open(SAMPLE / "panoptic_examples" / annotation["file_name"]), dtype=np.uint32)
        images.append(
            (
                annotation["image_id"],
                annotation["file_name"],
                rgb2id(png).astype(np.int64),
                annotation["segments_info"],
            )
        )
    return images


def perturbed_prediction(image_id, gt_ids, segments_info):
    """`EDITS[image_id]` applied to the ground truth -> ((H, W) prediction ids 1.., [{"id", "category_id"}])."""
    edits = EDITS[image_id]
    pred_ids = np.zeros_like(gt_ids)
    category_of, pred_id_of = {}, {}
    for segment in segments_info:
        gt_id = segment["id"]
        if gt_id in edits["drop"] or gt_id in edits["shift"]:
            continue
        owner = edits["merge"].get(gt_id, gt_id)
        pred_id = pred_id_of.setdefault(owner, len(pred_id_of) + 1)
        category_of[pred_id] = edits["relabel"].get(owner, edits["crowd_as"].get(owner, segment["category_id"]))
        pred_ids[gt_ids == gt_id] = pred_id
    void_category, tree_pixels = edits["void"]
    region = (gt_ids == 0).ravel()
    region[np.flatnonzero(gt_ids.ravel() == TREE_ID)[:tree_pixels]] = True
    pred_ids.ravel()[region] = void_id = len(pred_id_of) + 1
    category_of[void_id] = void_category
    for gt_id, (down, right) in edits["shift"].items():
        mask = gt_ids == gt_id
        shifted = np.zeros_like(mask)
        shifted[down:, right:] = mask[: mask.shape[0] - down, : mask.shape[1] - right]
        pred_ids[shifted] = shifted_id = max(category_of) + 1
        category_of[shifted_id] = next(s["category_id"] for s in segments_info if s["id"] == gt_id)
    present = [int(i) for i in np.unique(pred_ids) if i != 0]  # a segment painted over entirely is not listed
    return pred_ids, [{"id": i, "category_id": category_of[i]} for i in present]


def write_split(folder: Path, name: str, images) -> str:
    """Panoptic PNGs in folder/name/ and folder/name.json; images = [(image id, file name, ids, segments_info)]."""
    (folder / name).mkdir()
    annotations = []
    for image_id, file_name, ids, segments in images:
        Image.fromarray(id2rgb(ids)).save(folder / name / file_name)
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"annotations": annotations, "categories": CATEGORIES}))
    return str(path)


def panopticapi_pq(gt_json: str, pred_json: str) -> dict:
    # panopticapi forks one worker per CPU over two images: one is enough and keeps the test fast on big machines.
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()):
        patch.setattr(multiprocessing, "cpu_count", lambda: 1)
        return panopticapi_evaluation.pq_compute(gt_json, pred_json)


def assert_same_pq(ours: dict, reference: dict) -> None:
    for split in ("All", "Things", "Stuff"):
        assert ours[split]["n"] == reference[split]["n"], split
        for key in ("pq", "sq", "rq"):
            assert ours[split][key] == pytest.approx(reference[split][key], abs=1e-12), (split, key)
    for category, values in reference["per_class"].items():
        for key in ("pq", "sq", "rq"):
            assert ours["per_class"][category][key] == pytest.approx(values[key], abs=1e-12), (category, key)


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def pq_files(sample, tmp_path_factory):
    """GT files (the real PNGs and JSON, copied), perturbed prediction files, and panopticapi's result on them."""
    folder = tmp_path_factory.mktemp("pq")
    (folder / "gt").mkdir()
    for _, file_name, _, _ in sample:
        shutil.copy(SAMPLE / "panoptic_examples" / file_name, folder / "gt" / file_name)
    gt_json = folder / "gt.json"
    shutil.copy(SAMPLE / "panoptic_examples.json", gt_json)
    predictions = {image_id: perturbed_prediction(image_id, ids, segments) for image_id, _, ids, segments in sample}
    pred_json = write_split(folder, "pred", [(i, f, *predictions[i]) for i, f, _, _ in sample])
    reference = panopticapi_pq(str(gt_json), pred_json)
    return {"gt_json": str(gt_json), "pred_json": pred_json, "predictions": predictions, "reference": reference}


# ----------------------------------------------------------------------------------------------------------- PQ


def test_pq_compute_on_real_sample_equals_panopticapi(pq_files):
    reference = pq_files["reference"]
    for split in ("All", "Things", "Stuff"):  # the edits leave every split imperfect but not empty
        assert 0 < reference[split]["pq"] < 1 and reference[split]["n"] > 0
    assert_same_pq(pq_compute(pq_files["gt_json"], pq_files["pred_json"]), reference)


def test_metric_on_real_sample_equals_panopticapi(sample, pq_files, monkeypatch):
    # Fails before the fix: references with COCO's `bbox` and predictions without `iscrowd` / `area` raised KeyError
    # inside evaluate's feature check.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_panoptic_quality_metric()
    for image_id, _, gt_ids, segments in sample:
        pred_ids, pred_segments = pq_files["predictions"][image_id]
        assert set(segments[0]) == {"id", "category_id", "iscrowd", "area", "bbox"}  # the real COCO form
        assert set(pred_segments[0]) == {"id", "category_id"}  # the documented prediction form
        metric.add(
            prediction={"segmentation": pred_ids, "segments_info": pred_segments},
            reference={"segmentation": gt_ids, "segments_info": segments},
        )
    assert_same_pq(metric.compute(categories=CATEGORIES), pq_files["reference"])


def test_metric_label_id_rgb_and_reference_area_fallback(sample, pq_files, monkeypatch):
    """Post-processor form (`label_id`, `score`), RGB PNG arrays, and references without `area`, through compute()."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for _, _, gt_ids, segments in sample:  # the fallback (pixel count) equals the annotated area on this sample
        assert all(int((gt_ids == s["id"]).sum()) == s["area"] for s in segments)
    predictions, references = [], []
    for image_id, _, gt_ids, segments in sample:
        pred_ids, pred_segments = pq_files["predictions"][image_id]
        post_processed = [
            {"id": s["id"], "label_id": s["category_id"], "score": None, "was_fused": False} for s in pred_segments
        ]
        predictions.append({"segmentation": id2rgb(pred_ids), "segments_info": post_processed})
        references.append(
            {"segmentation": gt_ids, "segments_info": [{k: v for k, v in s.items() if k != "area"} for s in segments]}
        )
    result = load_panoptic_quality_metric().compute(
        predictions=predictions, references=references, categories=CATEGORIES
    )
    assert_same_pq(result, pq_files["reference"])


def test_ground_truth_against_itself_is_perfect(sample, pq_files, monkeypatch):
    folder = Path(pq_files["gt_json"]).parent
    reference = panopticapi_pq(pq_files["gt_json"], pq_files["gt_json"])
    ours = pq_compute(pq_files["gt_json"], pq_files["gt_json"], str(folder / "gt"), str(folder / "gt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_panoptic_quality_metric()
    for _, _, gt_ids, segments in sample:
        image = {"segmentation": gt_ids, "segments_info": segments}
        metric.add(prediction=image, reference=image)
    from_metric = metric.compute(categories=CATEGORIES)
    for result in (reference, ours, from_metric):
        for split in ("All", "Things", "Stuff"):
            assert result[split]["pq"] == pytest.approx(1.0, abs=1e-12) and result[split]["sq"] == pytest.approx(
                1.0, abs=1e-12
            )
    assert_same_pq(ours, reference)
    assert_same_pq(from_metric, reference)


def test_metric_rejects_careless_inputs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = load_panoptic_quality_metric()
    ids = np.ones((4, 4), np.int64)
    reference = {"segmentation": ids, "segments_info": [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 16}]}

    def add(prediction):
        metric.add(prediction=prediction, reference=reference)

    with pytest.raises(ValueError, match="neither 'category_id' nor 'label_id'"):  # a segment without a class
        add({"segmentation": ids, "segments_info": [{"id": 1}]})
    with pytest.raises(ValueError, match="has 'category_id' 1 and a different 'label_id' 2"):  # contradictory class
        add({"segmentation": ids, "segments_info": [{"id": 1, "category_id": 1, "label_id": 2}]})
    with pytest.raises(ValueError, match=r"prediction\['segments_info'\]\[0\] has no 'id'"):
        add({"segmentation": ids, "segments_info": [{"category_id": 1}]})
    with pytest.raises(ValueError, match="must be \\(H, W\\) segment ids"):  # flattened map
        add({"segmentation": ids.ravel(), "segments_info": [{"id": 1, "category_id": 1}]})
    with pytest.raises(ValueError, match="integer segment ids, got dtype float"):  # e.g. a probability map
        add({"segmentation": ids * 0.5, "segments_info": [{"id": 1, "category_id": 1}]})
    with pytest.raises(ValueError, match="must be a dict with 'segmentation' and 'segments_info'"):
        add(ids)
    with pytest.raises(ValueError, match=r"references\[0\]\['segments_info'\] must be a list of dicts"):
        metric.add_batch(predictions=[reference], references=[{"segmentation": ids, "segments_info": "id=1"}])
    # a segment painted in the PNG but missing from segments_info: panopticapi's own check, at compute time
    metric.add(prediction={"segmentation": ids, "segments_info": []}, reference=reference)
    with pytest.raises(KeyError, match="not presented in JSON"):
        metric.compute(categories=CATEGORIES)


# ------------------------------------------------------------------------------------------------------ semantic


def reference_semantic_mask2former(panoptic, segments, id_map):
    """
    Literal transcription of `_process_panoptic_to_semantic` in Mask2Former's
    `datasets/prepare_coco_semantic_annos_from_panoptic_annos.py` (facebookresearch/Mask2Former @
    9b0651c6c1d5b3af2e6da0589b719c514ec0d69a); uint8 there, int64 here.
    """
    output = np.zeros_like(panoptic, dtype=np.int64) + 255
    for seg in segments:
        output[panoptic == seg["id"]] = id_map[seg["category_id"]]
    return output


def reference_semantic_panopticapi(pan, segments_info):
    """
    Literal transcription of the PNG branch of `extract_semantic_single_core` in panopticapi's
    `converters/panoptic2semantic_segmentation.py` (cocodataset/panopticapi @ 7bb4655548f98f3fedc07bf37e9040a992b054b0,
    without --things_others): dataset category ids, unlabelled pixels 0; uint8 there, int64 here.
    """
    semantic = np.zeros(pan.shape, dtype=np.int64)
    for segm_info in segments_info:
        semantic[pan == segm_info["id"]] = segm_info["category_id"]
    return semantic


def test_panoptic_to_semantic_equals_reference_scripts(sample):
    from transformers_possam.evaluation import panoptic_to_semantic

    for _, file_name, ids, segments in sample:
        png = np.array(Image.open(SAMPLE / "panoptic_examples" / file_name))
        for segment_ids in (ids, png):  # (H, W) ids or the RGB PNG array
            ours = panoptic_to_semantic(segment_ids, segments, label_map=LABEL_MAP)
            assert ours.dtype == np.int64 and ours.shape == ids.shape
            np.testing.assert_array_equal(ours, reference_semantic_mask2former(ids, segments, LABEL_MAP))
        np.testing.assert_array_equal(
            panoptic_to_semantic(ids, segments, ignore_index=0), reference_semantic_panopticapi(ids, segments)
        )


def test_panoptic_to_semantic_labels_crowd_pixels(sample):
    from transformers_possam.evaluation import panoptic_to_semantic

    by_image = {image_id: (ids, segments) for image_id, _, ids, segments in sample}
    for image_id, segment_id, category in CROWD_SEGMENTS:
        ids, segments = by_image[image_id]
        assert next(s for s in segments if s["id"] == segment_id)["iscrowd"] == 1
        semantic = panoptic_to_semantic(ids, segments, label_map=LABEL_MAP)
        crowd = ids == segment_id
        assert crowd.sum() > 0 and (semantic[crowd] == LABEL_MAP[category]).all()  # its category, not ignore
        assert (semantic[ids == 0] == 255).all()  # VOID stays ignored


def test_panoptic_to_semantic_rejects_careless_inputs():
    from transformers_possam.evaluation import panoptic_to_semantic

    ids = np.array([[1, 1, 0], [2, 2, 0]])
    segments = [{"id": 1, "category_id": 10}, {"id": 2, "category_id": 20}]
    with pytest.raises(KeyError, match="Category id 20 \\(segment id 2\\) is not in label_map"):
        panoptic_to_semantic(ids, segments, label_map={10: 0})
    with pytest.raises(ValueError, match="segment id 3, which does not occur"):  # listed but never painted
        panoptic_to_semantic(ids, [*segments, {"id": 3, "category_id": 10}])
    with pytest.raises(ValueError, match="segment id 1 twice"):  # the result would depend on the listing order
        panoptic_to_semantic(ids, [*segments, {"id": 1, "category_id": 20}])
    with pytest.raises(ValueError, match="maps to class 255, which is ignore_index"):
        panoptic_to_semantic(ids, segments, label_map={10: 0, 20: 255})
    with pytest.raises(ValueError, match="got shape \\(2, 3, 4\\)"):  # RGBA PNG
        panoptic_to_semantic(np.zeros((2, 3, 4), np.uint8), segments)
    with pytest.raises(ValueError, match="integer segment ids, got dtype float64"):
        panoptic_to_semantic(ids.astype(float), segments)
    with pytest.raises(ValueError, match="must be a list of segment dicts, got dict"):  # one segment, not in a list
        panoptic_to_semantic(ids, segments[0])
    with pytest.raises(ValueError, match=r"segments_info\[0\] must be a dict with 'id' and 'category_id'"):
        panoptic_to_semantic(ids, [{"id": 1, "label_id": 10}])


# ------------------------------------------------------------------------------------------------------- mask AP

MASK_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def thing_instances(ids, segments):
    """Ground-truth thing masks (N, H, W), category ids, iscrowd (crowd segments included) from the panoptic PNG."""
    things = [s for s in segments if s["category_id"] in THING_IDS]
    masks = np.stack([ids == s["id"] for s in things])
    return masks, np.array([s["category_id"] for s in things]), np.array([s["iscrowd"] for s in things])


def degraded_predictions(masks, labels, iscrowd, seed):
    """Ground-truth thing masks with some dropped / eroded / relabelled, one on each crowd, one spurious; random scores."""
    pred_masks, pred_labels = [], []
    for index, (mask, label, crowd) in enumerate(zip(masks, labels.tolist(), iscrowd.tolist())):
        if not crowd and index % 5 == 0:
            continue  # dropped: a miss
        if not crowd and index % 3 == 0:
            mask = binary_erosion(mask, iterations=3)  # lower IoU: passes some thresholds, fails others
        if not crowd and index % 7 == 1:
            label = 21  # relabelled as cow
        pred_masks.append(mask)  # crowd regions are predicted too: COCOeval matches them to the crowd and ignores them
        pred_labels.append(label)
    pred_masks.append(np.roll(masks[1], 40, axis=1))  # a spurious detection
    pred_labels.append(int(labels[1]))
    scores = np.random.default_rng(seed).uniform(0.05, 1.0, len(pred_masks))
    return np.stack(pred_masks), np.array(pred_labels), scores


@pytest.fixture(scope="module")
def instances(sample):
    """[(image id, gt masks, gt labels, gt iscrowd, pred masks, pred labels, pred scores)] per image."""
    result = []
    for seed, (image_id, _, ids, segments) in enumerate(sample):
        gt = thing_instances(ids, segments)
        result.append((image_id, *gt, *degraded_predictions(*gt, seed=seed)))
    return result


def reference_cocoeval(instances) -> dict:
    """pycocotools' COCOeval (segm) on COCO GT / result dicts built here, every GT category evaluated."""
    images, annotations, results = [], [], []
    for image_id, gt_masks, gt_labels, gt_iscrowd, pred_masks, pred_labels, pred_scores in instances:
        images.append({"id": image_id, "height": gt_masks.shape[1], "width": gt_masks.shape[2]})
        for mask, label, crowd in zip(gt_masks, gt_labels, gt_iscrowd):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "iscrowd": int(crowd),
                    "area": float(mask.sum()),
                    "bbox": list(mask_utils.toBbox(rle)),
                    "segmentation": rle,
                }
            )
        for mask, label, score in zip(pred_masks, pred_labels, pred_scores):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append(
                {"image_id": image_id, "category_id": int(label), "segmentation": rle, "score": float(score)}
            )
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        categories = sorted({a["category_id"] for a in annotations})
        ground_truth.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c} for c in categories],
        }
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(MASK_AP_KEYS, evaluator.stats[:6].tolist()))


def accumulate(instances):
    from transformers_possam.evaluation import MaskAPAccumulator

    accumulator = MaskAPAccumulator()
    for _, gt_masks, gt_labels, gt_iscrowd, pred_masks, pred_labels, pred_scores in instances:
        accumulator.update(
            gt_masks=gt_masks,
            gt_labels=gt_labels,
            gt_iscrowd=gt_iscrowd,
            pred_masks=pred_masks,
            pred_labels=pred_labels,
            pred_scores=pred_scores,
        )
    return accumulator


@pytest.mark.parametrize("with_crowd", [True, False], ids=["crowd", "crowd-as-instances"])
def test_mask_ap_accumulator_equals_cocoeval(instances, with_crowd):
    assert sum(int(i[3].sum()) for i in instances) == 3  # the three crowd segments are in the ground truth
    if not with_crowd:  # the crowds as ordinary instances: the only large objects of the sample then count
        instances = [(i[0], i[1], i[2], np.zeros_like(i[3]), *i[4:]) for i in instances]
    reference = reference_cocoeval(instances)
    assert 0 < reference["AP"] < 1 and reference["APs"] > 0 and reference["APm"] > 0
    # Every thing over 96^2 px in the sample is a crowd, ignored by COCOeval: no large object, APl -1, which
    # MaskAPAccumulator documents as 0.
    assert (reference["APl"] == -1) if with_crowd else (reference["APl"] > 0)
    ours = accumulate(instances).compute()
    for key in MASK_AP_KEYS:
        assert ours[key] == pytest.approx(max(reference[key], 0.0), abs=1e-12), key


def test_mask_ap_accumulators_merge_across_processes(instances):
    from transformers_possam.evaluation import MaskAPAccumulator, mask_ap

    whole = accumulate(instances)
    first, second = accumulate(instances[:1]), accumulate(instances[1:])
    state = whole.state()
    json.dumps(state)  # plain data: RLE strings and numbers, no dense mask is kept
    # what accelerate.utils.gather_object hands back: the states, pickled across processes
    gathered = [pickle.loads(pickle.dumps(part.state())) for part in (first, second)]
    from_states = MaskAPAccumulator.from_states(gathered)
    assert len(from_states) == len(whole) == 2
    expected = whole.compute()
    assert from_states.compute() == expected  # images keep distinct ids after merging: both were image 0 before
    assert accumulate(instances[:1]).merge(second).compute() == expected
    assert whole.compute() == expected  # compute leaves the accumulator as it was
    # the mask_ap wrapper is the same computation
    ground_truths = [{"masks": i[1], "labels": i[2], "iscrowd": i[3]} for i in instances]
    predictions = [{"masks": i[4], "labels": i[5], "scores": i[6]} for i in instances]
    assert mask_ap(ground_truths, predictions) == expected


def test_mask_ap_accumulator_rejects_careless_inputs():
    from transformers_possam.evaluation import MaskAPAccumulator, mask_ap

    masks = np.zeros((2, 8, 8), bool)
    masks[0, :4] = True
    masks[1, 4:] = True
    good = {
        "gt_masks": masks,
        "gt_labels": [1, 2],
        "pred_masks": masks,
        "pred_labels": [1, 2],
        "pred_scores": [0.9, 0.8],
    }

    def update(**changes):
        MaskAPAccumulator().update(**{**good, **changes})

    with pytest.raises(
        ValueError, match="gt_masks must be \\(K, H, W\\) masks, got shape \\(8, 8\\)"
    ):  # one mask, no axis
        update(gt_masks=masks[0])
    with pytest.raises(ValueError, match="pred_masks must be boolean .* threshold soft masks"):  # probabilities
        update(pred_masks=masks * 0.7)
    with pytest.raises(ValueError, match="gt_masks are \\(8, 8\\) \\(H, W\\) but pred_masks are \\(8, 6\\)"):
        update(pred_masks=masks[:, :, :6])
    with pytest.raises(ValueError, match="gt_labels has 1 entries but gt_masks has 2 masks"):
        update(gt_labels=[1])
    with pytest.raises(ValueError, match="pred_scores has 3 entries but pred_masks has 2 masks"):
        update(pred_scores=[0.9, 0.8, 0.1])
    with pytest.raises(ValueError, match="pred_labels has 1 entries but pred_masks has 2 masks"):
        update(pred_labels=[1])
    with pytest.raises(ValueError, match="pred_scores must be finite"):
        update(pred_scores=[0.9, float("nan")])
    with pytest.raises(ValueError, match="gt_labels must be whole numbers"):
        update(gt_labels=[1.5, 2])
    with pytest.raises(ValueError, match="gt_iscrowd must be 0 or 1"):
        update(gt_iscrowd=[0, 2])
    with pytest.raises(ValueError, match="gt_iscrowd has 3 entries"):
        update(gt_iscrowd=[0, 0, 1])
    with pytest.raises(ValueError, match="gt_iscrowd must be 1-D"):  # positional call forgetting the iscrowd slot
        MaskAPAccumulator().update(masks, [1, 2], masks, [1, 2], [0.9, 0.8])
    with pytest.raises(ValueError, match="pred_labels, pred_scores not given"):
        MaskAPAccumulator().update(masks, [1, 2], None, masks)
    accumulator = MaskAPAccumulator()
    accumulator.update(masks, [1, 2], None, masks, [1, 2], [0.9, 0.8])  # positional, in the documented order
    assert accumulator.compute() == pytest.approx(
        {"AP": 1, "AP50": 1, "AP75": 1, "APs": 1, "APm": 0, "APl": 0}
    )  # 32 px: small only
    assert accumulator.compute(category_ids=[]) == dict.fromkeys(MASK_AP_KEYS, 0.0)  # e.g. no thing class at all
    with pytest.raises(TypeError, match="Can only merge a MaskAPAccumulator"):
        accumulator.merge(accumulator.state())
    with pytest.raises(TypeError, match="takes a list of states"):  # one state instead of the gathered list
        MaskAPAccumulator.from_states(accumulator.state())
    with pytest.raises(ValueError, match=r"states\[0\] is not a MaskAPAccumulator.state\(\)"):
        MaskAPAccumulator.from_states([{"image_sizes": []}])
    with pytest.raises(ValueError, match="1 ground truths but 2 predictions"):
        mask_ap([{"masks": masks, "labels": [1, 2]}], [{"masks": masks, "labels": [1, 2], "scores": [1, 1]}] * 2)
    with pytest.raises(ValueError, match=r"Image 0 .*pred_scores has 1 entries"):  # the wrapper says which image
        mask_ap([{"masks": masks, "labels": [1, 2]}], [{"masks": masks, "labels": [1, 2], "scores": [1]}])
    # empty images are fine: no masks on either side, or an empty list for one side
    empty = MaskAPAccumulator()
    empty.update(gt_masks=[], gt_labels=[], pred_masks=[], pred_labels=[], pred_scores=[])
    empty.update(gt_masks=masks, gt_labels=[1, 2], pred_masks=[], pred_labels=[], pred_scores=[])
    assert empty.compute() == dict.fromkeys(MASK_AP_KEYS, 0.0)
