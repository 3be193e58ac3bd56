"""
Evaluation as in the paper's Table 1 (PQ / SQ / RQ incl. seen / unseen, mask AP, mIoU with the right semantic ground
truth), and bad data that never kills a run: in `evaluate.py`, in the evaluator, and in evaluations during training.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transformers_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
    tiny_config,
)
from transformers_possam.data import TOY_CATEGORIES, TooManyBadSamples, save_category_table, toy_panoptic_rows
from transformers_possam.evaluation.loop import PanopticEvaluator


REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-sample"
if not SAMPLE.is_dir():
    SAMPLE = Path("/work/shared/data/coco-panoptic-sample")


def png_bytes(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def encoded_rows(count: int, split: str = "validation", seed: int = 0) -> list[dict]:
    """Toy rows with images / PNGs as encoded bytes (the parquet form)."""
    return [
        dict(row, image=png_bytes(row["image"]), label=png_bytes(row["label"]))
        for row in toy_panoptic_rows(count, seed=seed, split=split)
    ]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tiny_config()
    model = PosSAMForPanopticSegmentation(config).eval()
    size = config.vision_config.image_size
    processor = PosSAMProcessor(
        PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}),
        clip_tokenizer_from_bpe(),
    )
    return model, processor


def evaluator_for(tiny, **kwargs):
    model, processor = tiny
    return PanopticEvaluator(model, processor.image_processor, TOY_CATEGORIES, processor=processor, **kwargs)


def test_bad_rows_are_skipped_and_counted_as_in_training(tiny):
    rows = encoded_rows(6)
    rows[1] = dict(rows[1], image={"bytes": b"not an image", "path": None})  # undecodable
    rows[3] = dict(rows[3], segments_info=[dict(rows[3]["segments_info"][0], category_id=77)])  # unknown category
    rows[4] = dict(rows[4], semantic_label=png_bytes(Image.new("L", (5, 5))))  # semantic GT of another size
    rows[5] = dict(
        rows[5], segments_info=rows[5]["segments_info"] + rows[5]["segments_info"][:1]
    )  # a segment listed twice
    evaluator = evaluator_for(tiny, max_bad_fraction=0.7, min_seen=1)
    evaluator.process(rows)
    results = evaluator.results()
    assert (results["images"], results["bad_samples"]) == (2, 4)
    assert results["bad_sample_ids"] == [
        "toy_validation_00001",
        "toy_validation_00003",
        "toy_validation_00004",
        "toy_validation_00005",
    ]
    # the training rule: more than max_bad_fraction bad (after min_seen rows) stops, naming the rows
    strict = evaluator_for(tiny, max_bad_fraction=0.1, min_seen=1)
    with pytest.raises(TooManyBadSamples, match="toy_validation_00001"):
        strict.process(rows)


def test_vocabularies_beyond_255_classes_and_without_things(tiny):
    """Class 255 is a class like any other (ignored pixels use an index outside the vocabulary); no thing class: AP 0."""
    model, processor = tiny
    row = encoded_rows(1)[0]
    # 300 categories; the toy row's category ids 0..5 become class indices 250..255
    categories = [{"id": 1000 + i, "name": f"class {i}", "isthing": 0} for i in range(250)] + list(TOY_CATEGORIES)
    categories += [{"id": 2000 + i, "name": f"extra {i}", "isthing": 0} for i in range(44)]
    embeddings = torch.nn.functional.normalize(
        torch.randn(len(categories), 32, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    evaluator = PanopticEvaluator(model, processor.image_processor, categories, embeddings, None)
    evaluator.process([row])
    confusion = evaluator.state()["confusion"]
    assert confusion.sum() == 128 * 128  # every pixel scored, the pixels of class 255 included
    per_class = confusion.sum(1)
    ground_truth_classes = {250 + s["category_id"] for s in row["segments_info"]}
    assert 255 in ground_truth_classes  # this row's "sand" (category 5) is class 255
    assert {c for c in range(len(categories)) if per_class[c]} == ground_truth_classes
    stuff_only = [dict(c, isthing=0) for c in TOY_CATEGORIES]
    no_things = PanopticEvaluator(model, processor.image_processor, stuff_only, processor=processor)
    no_things.process([row])
    assert no_things.results()["mask_AP"]["AP"] == 0.0 and no_things.results()["images"] == 1


def test_results_hold_table_1_metrics_and_merge_across_processes(tiny):
    rows = encoded_rows(4)
    whole = evaluator_for(tiny)
    whole.process(rows)
    parts = [evaluator_for(tiny), evaluator_for(tiny)]
    parts[0].process(rows[0::2])  # process 0 of 2
    parts[1].process(rows[1::2])  # process 1 of 2
    merged = PanopticEvaluator.summarize(PanopticEvaluator.merge_states([p.state() for p in parts]))
    results = whole.results()
    for split in ("All", "Things", "Stuff", "Seen", "Unseen"):
        assert set(results[split]) == {"pq", "sq", "rq", "n"}
        assert merged[split] == pytest.approx(results[split])
    assert set(results["mask_AP"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert merged["mask_AP"] == pytest.approx(results["mask_AP"])
    assert merged["mIoU"] == pytest.approx(results["mIoU"]) and merged["images"] == results["images"] == 4
    assert results["mIoU_ground_truth"].startswith("derived from the panoptic PNG")


def test_miou_uses_the_datasets_semantic_ground_truth_when_there_is_one(tiny):
    rows = encoded_rows(2)
    # a semantic map that differs from the panoptic one: only the top 40 rows labelled, as class 5 (category id 5)
    semantic = np.full((128, 128), 255, np.uint8)
    semantic[:40] = 5
    with_semantic = [dict(row, semantic_label=png_bytes(Image.fromarray(semantic))) for row in rows]
    evaluator = evaluator_for(tiny)
    evaluator.process(with_semantic)
    state = evaluator.state()
    assert state["confusion"].sum() == 2 * 40 * 128  # scored pixels = the labelled pixels of the semantic PNGs
    assert state["confusion"].sum(1)[5] == 2 * 40 * 128  # all of them ground-truth class 5
    assert evaluator.results()["mIoU_ground_truth"] == "the dataset's semantic ground truth (semantic_label column)"
    mixed = evaluator_for(tiny)
    mixed.process([with_semantic[0], rows[1]])
    assert mixed.results()["mIoU_ground_truth"].startswith("mixed: 1 rows")


def test_crowd_pixels_are_scored_with_their_category_in_miou(tiny):
    """Without semantic PNGs the ground truth comes from the panoptic PNG: a crowd segment's pixels count (panopticapi)."""
    row = encoded_rows(1)[0]
    crowd = dict(row["segments_info"][-1], iscrowd=1)
    crowd_row = dict(row, segments_info=row["segments_info"][:-1] + [crowd])
    plain, with_crowd = evaluator_for(tiny), evaluator_for(tiny)
    plain.process([row])
    with_crowd.process([crowd_row])
    # the same pixels are scored (crowd is not "ignore") ...
    assert plain.state()["confusion"].sum() == with_crowd.state()["confusion"].sum() == 128 * 128
    # ... but the crowd segment is neither a PQ false negative nor an AP target to find
    assert with_crowd.state()["panoptic"][:, 3].sum() == plain.state()["panoptic"][:, 3].sum() - 1


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, processor = tiny
    path = tmp_path_factory.mktemp("possam-eval")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def write_split(folder: Path, rows: list[dict], categories) -> None:
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    features = Features(
        {
            "image": ImageFeature(),
            "label": ImageFeature(),
            "image_id": Value("string"),
            "segments_info": List(
                {
                    "id": Value("int64"),
                    "category_id": Value("int64"),
                    "iscrowd": Value("int64"),
                    "area": Value("int64"),
                    "bbox": List(Value("int64")),
                }
            ),
        }
    )
    folder.mkdir(parents=True)
    Dataset.from_list(rows, features=features).to_parquet(str(folder / "data-00000-of-00001.parquet"))
    save_category_table(categories, folder.parent)


def test_evaluate_script_on_real_coco(checkpoint, tmp_path):
    """evaluate.py on the real COCO sample (prepared with the prepare script): every Table 1 metric, COCO vocabulary."""
    subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "prepare_panoptic_parquet.py"),
            "--annotations_json",
            str(SAMPLE / "panoptic_examples.json"),
            "--png_folder",
            str(SAMPLE / "panoptic_examples"),
            "--images_folder",
            str(SAMPLE / "input_images"),
            "--output_dir",
            str(tmp_path / "coco" / "validation"),
            "--vocabulary",
            "coco",
        ],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "evaluate.py"),
            "--model_name_or_path",
            str(checkpoint),
            "--dataset_name",
            str(tmp_path / "coco"),
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        check=True,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["bad_samples"] == 0
    assert {"All", "Things", "Stuff", "Seen", "Unseen", "mask_AP", "mIoU", "mIoU_ground_truth", "per_class"} <= set(
        metrics
    )
    assert metrics["Unseen"]["n"] == 0  # COCO classes are all seen by a COCO-trained model
    # every ground-truth category of the two images enters PQ (as a false negative at least)
    categories = {
        s["category_id"]
        for a in json.loads((SAMPLE / "panoptic_examples.json").read_text())["annotations"]
        for s in a["segments_info"]
        if not s["iscrowd"]
    }
    assert metrics["All"]["n"] >= len(categories)
    assert "mask AP" in result.stdout and "ground truth: derived from the panoptic PNG" in result.stdout


def test_evaluation_failures_never_cost_training(tmp_path):
    """A bad validation row is skipped and counted; a failing evaluation is logged and training goes on and saves."""
    root = tmp_path / "data"
    write_split(root / "train", encoded_rows(8, split="train"), TOY_CATEGORIES)
    validation = encoded_rows(4)
    validation[2] = dict(validation[2], label={"bytes": b"\x89PNG broken", "path": None})
    write_split(root / "validation", validation, TOY_CATEGORIES)
    common = [
        sys.executable,
        str(REPO / "training" / "train.py"),
        "--dataset_name",
        str(root),
        "--max_steps",
        "4",
        "--eval_steps",
        "2",
        "--max_eval_samples",
        "4",
        "--per_device_train_batch_size",
        "1",
        "--checkpointing_steps",
        "2",
    ]
    run = subprocess.run(
        [*common, "--output_dir", str(tmp_path / "bad_row"), "--max_bad_fraction", "0.5"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "bad_row" / "eval_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["failed"], h["eval/bad_samples"], h["eval/images"]) for h in history] == [
        (2, False, 1.0, 3.0),
        (4, False, 1.0, 3.0),
    ]
    assert {"eval/all_pq", "eval/seen_pq", "eval/unseen_pq", "eval/mask_ap", "eval/miou"} <= set(history[0])
    # an evaluation that fails outright (here: the dataset has no validation split) does not stop training
    no_validation = tmp_path / "no_validation"
    write_split(no_validation / "train", encoded_rows(8, split="train"), TOY_CATEGORIES)
    failing = [arg if arg != str(root) else str(no_validation) for arg in common]
    run = subprocess.run(
        [*failing, "--output_dir", str(tmp_path / "failing")], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    history = [json.loads(line) for line in (tmp_path / "failing" / "eval_history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["failed"]) for h in history] == [(2, True), (4, True)]
    assert "Evaluation failed" in run.stderr and (tmp_path / "failing" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "failing").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_splits_are_never_mixed_up_and_an_unscorable_dataset_is_an_error(tmp_path, checkpoint):
    from transformers_possam.data.stream import load_panoptic_dataset

    root = tmp_path / "data"
    write_split(root / "train", encoded_rows(2, split="train"), TOY_CATEGORIES)
    # a split folder layout without the requested split: an error, never the training shards
    with pytest.raises(FileNotFoundError, match="has the splits \\['train'\\], not 'validation'"):
        load_panoptic_dataset(str(root), split="validation")
    assert len(list(load_panoptic_dataset(str(root), split="train")[0])) == 2
    # evaluate.py on a split whose every row is bad: a clear error, not metrics of nothing
    broken = [dict(row, image={"bytes": b"broken", "path": None}) for row in encoded_rows(2)]
    write_split(root / "validation", broken, TOY_CATEGORIES)
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "training" / "evaluate.py"),
            "--model_name_or_path",
            str(checkpoint),
            "--dataset_name",
            str(root),
            "--output_dir",
            str(tmp_path / "eval"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "could be scored: 2 bad rows" in run.stderr
