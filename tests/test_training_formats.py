"""
`training/train.py` on the dataset formats people have (issue 13, item 5):

- the instance-segmentation format of transformers' `examples/pytorch/instance-segmentation` (`image` + `annotation`
  PNG: channel 0 = class id, channel 1 = instance id; classes from a JSON label file or the `semantic_class_to_id`
  column), checked against panopticapi's own two-channel export of the real COCO sample;
- COCO panoptic datasets in the schema of `nielsr/coco-panoptic-val2017` (`image`, `label`, `segments_info`, one
  split, no category table), built locally from the real COCO sample;
- the example's flag names (`--max_train_steps`, `--num_warmup_steps`, `--lr_scheduler_type`, `--with_tracking`,
  `--push_to_hub`, ...), with the upload mocked (no Hub here).
"""

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import get_scheduler

from tests.conftest import load_training_script
from transformers_possam import PosSAMImageProcessor
from transformers_possam.data.stream import PanopticTrainStream, UnknownCategory, load_panoptic_dataset
from transformers_possam.vocabularies import Vocabulary, load_vocabulary


COCO = Path("/work/shared/data/coco-panoptic-sample")
REPO = Path(__file__).resolve().parents[1]
if not COCO.is_dir():
    COCO = REPO / "shared" / "data" / "coco-panoptic-sample"
pytestmark = pytest.mark.skipif(not COCO.is_dir(), reason="needs the real COCO panoptic sample (shared/data)")

train = load_training_script("train")

# the schema of nielsr/coco-panoptic-val2017's segments_info
SEGMENTS_INFO = [
    {
        "id": Value("int64"),
        "category_id": Value("int64"),
        "iscrowd": Value("int64"),
        "bbox": Sequence(Value("int64")),
        "area": Value("int64"),
    }
]


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def coco_annotations() -> list[dict]:
    return json.loads((COCO / "panoptic_examples.json").read_text())["annotations"]


def coco_panoptic_dataset(crowd_as_segments: bool = False) -> Dataset:
    """The real COCO sample in nielsr/coco-panoptic-val2017's columns (image, label, segments_info), nothing else."""
    rows = []
    for annotation in coco_annotations():
        stem = Path(annotation["file_name"]).stem
        segments = [
            dict(segment, iscrowd=0 if crowd_as_segments else segment["iscrowd"])
            for segment in annotation["segments_info"]
        ]
        rows.append(
            {
                "image": str(COCO / "input_images" / f"{stem}.jpg"),
                "label": str(COCO / "panoptic_examples" / f"{stem}.png"),
                "segments_info": segments,
            }
        )
    features = Features({"image": ImageFeature(), "label": ImageFeature(), "segments_info": SEGMENTS_INFO})
    return Dataset.from_list(rows, features=features)


def coco_two_channel_dataset() -> Dataset:
    """The same images with panopticapi's two-channel export (R = COCO category id, 0 = void; G = instance id)."""
    rows = [
        {
            "image": str(COCO / "input_images" / f"{Path(a['file_name']).stem}.jpg"),
            "annotation": str(COCO / "panoptic_examples_2ch_format" / a["file_name"]),
        }
        for a in coco_annotations()
    ]
    return Dataset.from_list(rows, features=Features({"image": ImageFeature(), "annotation": ImageFeature()}))


def coco_id2label_file(folder: Path) -> Path:
    """An id2label JSON of panopticapi's COCO categories, as Hub label files are written ({"1": "person", ...})."""
    categories = json.loads((COCO / "panoptic_coco_categories.json").read_text())
    path = folder / "id2label.json"
    path.write_text(json.dumps({str(c["id"]): c["name"] for c in categories}))
    return path


def image_processor(size: int = 128) -> PosSAMImageProcessor:
    return PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})


def stream_samples(dataset, categories, count: int, source: str = "the test table") -> list[dict]:
    vocabulary = Vocabulary.from_categories(categories)
    stream = PanopticTrainStream(
        dataset, image_processor(), vocabulary.label_map, augment=False, shuffle_buffer=0, category_source=source
    )
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def segment_set(sample: dict, category_ids: tuple[int, ...], offset: int = 0) -> set:
    """{(dataset category id, mask bytes)} of one processed sample."""
    return {
        (category_ids[int(label)] + offset, mask.numpy().tobytes())
        for mask, label in zip(sample["mask_labels"], sample["class_labels"])
    }


def run_train(tmp_path: Path, *arguments: str) -> dict:
    output = tmp_path / "run"
    return train.main(
        [
            "--output_dir",
            str(output),
            "--per_device_train_batch_size",
            "1",
            "--max_eval_samples",
            "2",
            "--per_device_eval_batch_size",
            "2",
            "--seed",
            "0",
            *arguments,
        ]
    )


# ----- (a) transformers' instance-segmentation format


def test_two_channel_annotations_give_the_segments_of_the_panoptic_pngs(tmp_path):
    """
    panopticapi exported each COCO sample image twice: as the RGB panoptic PNG + segments_info and as the
    (category, instance) two-channel PNG. Read as the instance-segmentation format (void 0 removed with
    --do_reduce_labels, classes from an id2label file), the two-channel files must give exactly the masks and COCO
    categories the panoptic files give (crowd regions included: the two-channel format has no crowd flag).
    """
    folder = tmp_path / "instance"
    DatasetDict({"train": coco_two_channel_dataset()}).save_to_disk(str(folder))
    dataset, categories, source = load_panoptic_dataset(
        str(folder), "train", label_file=str(coco_id2label_file(tmp_path)), do_reduce_labels=True, return_source=True
    )
    assert "reduced" in source and "id2label.json" in source
    instance = stream_samples(dataset, categories, 2)
    instance_ids = Vocabulary.from_categories(categories).category_ids

    reference = coco_panoptic_dataset(crowd_as_segments=True).to_iterable_dataset()
    panoptic = stream_samples(reference, load_vocabulary("coco_panoptic_133").to_categories(), 2)
    panoptic_ids = load_vocabulary("coco_panoptic_133").category_ids

    for annotation, ours, theirs in zip(coco_annotations(), instance, panoptic):
        assert len(ours["mask_labels"]) == len(annotation["segments_info"])
        # reduced ids are COCO's minus one
        assert segment_set(ours, instance_ids, offset=1) == segment_set(theirs, panoptic_ids)
        torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"])


def test_label2id_column_of_the_example_names_the_classes(tmp_path):
    """The example's own schema: `semantic_class_to_id` (label2id) per row, background 0, people 1, cars 2."""
    image = np.full((64, 96, 3), 90, dtype=np.uint8)
    annotation = np.zeros((64, 96, 3), dtype=np.uint8)  # background, instance 0
    annotation[5:30, 5:40] = (1, 1, 0)  # person 1
    annotation[35:60, 5:40] = (1, 2, 0)  # person 2
    annotation[10:50, 50:90] = (2, 1, 0)  # car 1
    label2id = {"background": 0, "person": 1, "car": 2}
    rows = [{"image": png_bytes(image), "annotation": png_bytes(annotation), "semantic_class_to_id": label2id}] * 2
    features = Features(
        {
            "image": ImageFeature(),
            "annotation": ImageFeature(),
            "semantic_class_to_id": {name: Value("int64") for name in label2id},
        }
    )
    folder = tmp_path / "example"
    DatasetDict({"train": Dataset.from_list(rows, features=features)}).save_to_disk(str(folder))

    dataset, categories = load_panoptic_dataset(str(folder), "train")
    assert [(c["id"], c["name"]) for c in categories] == [(0, "background"), (1, "person"), (2, "car")]
    (sample,) = stream_samples(dataset, categories, 1)
    # 96 -> 128 wide: the processor's resize, nearest for masks; count pixels per class on the resized map
    classes = sorted(sample["class_labels"].tolist())
    assert classes == [0, 1, 1, 2]
    areas = {int(c): int(m.sum()) for m, c in zip(sample["mask_labels"], sample["class_labels"]) if c != 1}
    scale = (128 / 96) ** 2
    assert math.isclose(areas[2], 40 * 40 * scale, rel_tol=0.08)

    reduced, reduced_categories = load_panoptic_dataset(str(folder), "train", do_reduce_labels=True)
    assert [(c["id"], c["name"]) for c in reduced_categories] == [(0, "person"), (1, "car")]
    (sample,) = stream_samples(reduced, reduced_categories, 1)
    assert sorted(sample["class_labels"].tolist()) == [0, 0, 1]  # background left unlabeled


def test_a_class_label_feature_names_the_classes(tmp_path):
    """id2label from the dataset's features: a ClassLabel column whose names index the annotation's class ids."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    annotation = np.zeros((32, 32, 3), dtype=np.uint8)
    annotation[:16] = (1, 1, 0)
    features = Features(
        {
            "image": ImageFeature(),
            "annotation": ImageFeature(),
            "classes": Sequence(ClassLabel(names=["background", "cat"])),
        }
    )
    rows = [{"image": png_bytes(image), "annotation": png_bytes(annotation), "classes": [0, 1]}]
    folder = tmp_path / "classlabel"
    Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    _, categories, source = load_panoptic_dataset(str(folder), "train", return_source=True)
    assert [(c["id"], c["name"]) for c in categories] == [(0, "background"), (1, "cat")]
    assert "ClassLabel feature 'classes'" in source


def test_train_script_end_to_end_on_the_instance_format(tmp_path):
    folder = tmp_path / "instance"
    two_channel = coco_two_channel_dataset()
    DatasetDict({"train": two_channel, "validation": two_channel}).save_to_disk(str(folder))
    metrics = run_train(
        tmp_path,
        "--dataset_name",
        str(folder),
        "--label_file",
        str(coco_id2label_file(tmp_path)),
        "--do_reduce_labels",
        "--max_train_steps",
        "2",
        "--eval_steps",
        "2",
    )
    assert math.isfinite(metrics["train/loss"])
    history = [json.loads(line) for line in (tmp_path / "run" / "eval_history.jsonl").read_text().splitlines()]
    assert history[-1]["failed"] is False and history[-1]["eval/images"] == 2.0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    # the trained model evaluates on the same format with training/evaluate.py's matching flags
    results = load_training_script("evaluate").main(
        [
            "--model_name_or_path",
            str(tmp_path / "run"),
            "--dataset_name",
            str(folder),
            "--label_file",
            str(coco_id2label_file(tmp_path)),
            "--do_reduce_labels",
            "--output_dir",
            str(tmp_path / "eval"),
        ]
    )
    assert results["images"] == 2 and results["bad_samples"] == 0


# ----- (b) COCO panoptic on the Hub (nielsr/coco-panoptic-val2017's schema, one split, no category table)


@pytest.mark.parametrize("storage", ["parquet", "save_to_disk"])
def test_coco_panoptic_without_a_category_table_uses_the_coco_133_vocabulary(tmp_path, storage):
    folder = tmp_path / "coco"
    if storage == "parquet":
        folder.mkdir()
        coco_panoptic_dataset().to_parquet(str(folder / "train-00000-of-00001.parquet"))
    else:
        DatasetDict({"train": coco_panoptic_dataset()}).save_to_disk(str(folder))
    dataset, categories, source = load_panoptic_dataset(str(folder), "train", return_source=True)
    assert "COCO panoptic 133" in source
    # panopticapi's own category file: same ids and thing flags, in the same order
    reference = json.loads((COCO / "panoptic_coco_categories.json").read_text())
    assert [(c["id"], c["isthing"]) for c in categories] == [(c["id"], c["isthing"]) for c in reference]
    samples = stream_samples(dataset, categories, 2)
    vocabulary = Vocabulary.from_categories(categories)
    for annotation, sample in zip(coco_annotations(), samples):
        expected = sorted(s["category_id"] for s in annotation["segments_info"] if not s["iscrowd"])
        assert sorted(vocabulary.category_ids[int(c)] for c in sample["class_labels"]) == expected


def test_train_script_end_to_end_on_a_coco_panoptic_parquet_folder_without_categories(tmp_path):
    folder = tmp_path / "coco"
    folder.mkdir()
    coco_panoptic_dataset().to_parquet(str(folder / "train-00000-of-00001.parquet"))
    metrics = run_train(
        tmp_path, "--dataset_name", str(folder), "--max_train_steps", "2", "--eval_steps", "2", "--eval_split", "train"
    )
    assert math.isfinite(metrics["train/loss"])
    history = [json.loads(line) for line in (tmp_path / "run" / "eval_history.jsonl").read_text().splitlines()]
    assert history[-1]["failed"] is False and history[-1]["eval/images"] == 2.0


# ----- hostile inputs


def test_one_channel_annotation_is_refused_with_the_fix(tmp_path):
    gray = np.zeros((32, 32), dtype=np.uint8)
    rows = [{"image": png_bytes(np.zeros((32, 32, 3), dtype=np.uint8)), "annotation": png_bytes(gray)}]
    folder = tmp_path / "gray"
    Dataset.from_list(rows, features=Features({"image": ImageFeature(), "annotation": ImageFeature()})).save_to_disk(
        str(folder)
    )
    with pytest.raises(ValueError, match=r"first row: .*annotation PNG has one channel.*channel 0 = semantic"):
        load_panoptic_dataset(str(folder), "train", label_file=str(coco_id2label_file(tmp_path)))


def test_an_id_missing_from_id2label_stops_training_naming_it(tmp_path):
    folder = tmp_path / "instance"
    DatasetDict({"train": coco_two_channel_dataset()}).save_to_disk(str(folder))
    label_file = tmp_path / "partial.json"
    label_file.write_text(json.dumps({"0": "void", "1": "person"}))  # the sample has many more classes
    with pytest.raises(UnknownCategory, match=r"class / category ids \[.*\] are not in --label_file .*partial.json"):
        run_train(tmp_path, "--dataset_name", str(folder), "--label_file", str(label_file), "--max_train_steps", "1")


def test_a_label_file_that_is_not_json_is_refused(tmp_path):
    label_file = tmp_path / "labels.txt"
    label_file.write_text("0 background\n1 person\n")
    with pytest.raises(ValueError, match=r"Label file .*labels.txt is not valid JSON .*id2label JSON object"):
        load_panoptic_dataset(None, "train", label_file=str(label_file))


def test_instance_rows_without_any_class_table_are_refused(tmp_path):
    folder = tmp_path / "instance"
    DatasetDict({"train": coco_two_channel_dataset()}).save_to_disk(str(folder))
    with pytest.raises(ValueError, match="names no classes: pass --label_file"):
        load_panoptic_dataset(str(folder), "train")


def test_unknown_columns_name_both_schemas(tmp_path):
    folder = tmp_path / "other"
    Dataset.from_list([{"pixels": 1, "mask": 2}]).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"match neither accepted schema: COCO panoptic .*instance segmentation"):
        load_panoptic_dataset(str(folder), "train")


# ----- flags of run_instance_segmentation_no_trainer.py


def test_example_flag_names_and_our_aliases_mean_the_same():
    assert train.parse_args(["--max_train_steps", "7"]).max_steps == 7
    assert train.parse_args(["--max_steps", "7"]).max_steps == 7
    args = train.parse_args(["--max_train_steps", "10", "--num_warmup_steps", "3", "--lr_scheduler_type", "cosine"])
    assert (args.num_warmup_steps, args.lr_scheduler_type) == (3, "cosine")
    assert train.parse_args(["--per_device_eval_batch_size", "3"]).per_device_eval_batch_size == 3
    with pytest.raises(SystemExit):
        train.parse_args(["--max_train_steps", "4", "--num_warmup_steps", "5"])


def test_warmup_then_the_papers_step_decay():
    """LR factor: linear warmup step / W (transformers' rule) below W, then 0.1 ** (drops reached) (Appendix A)."""
    args = train.parse_args(["--max_train_steps", "100", "--num_warmup_steps", "10", "--lr_drops", "0.6", "0.8"])
    model = torch.nn.Linear(2, 2)
    _, _, scheduler = train.build_optimization(args, model)
    factors = [scheduler.lr_lambdas[0](step) for step in range(100)]
    expected = [step / 10 if step < 10 else (1.0 if step < 60 else 0.1 if step < 80 else 0.01) for step in range(100)]
    assert factors == pytest.approx(expected)


def test_transformers_schedules_match_get_scheduler():
    args = train.parse_args(["--max_train_steps", "50", "--num_warmup_steps", "5", "--lr_scheduler_type", "cosine"])
    model = torch.nn.Linear(2, 2)
    _, _, scheduler = train.build_optimization(args, model)
    reference = get_scheduler(
        "cosine", torch.optim.SGD(model.parameters(), lr=1.0), num_warmup_steps=5, num_training_steps=50
    )
    ours = [scheduler.lr_lambdas[0](step) for step in range(50)]
    assert ours == pytest.approx([reference.lr_lambdas[0](step) for step in range(50)])
    assert ours[0] == 0.0 and ours[5] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--with_tracking"], "no experiment tracker is installed"),
        (["--with_tracking", "--report_to", "tensorboard"], "tensorboard is not installed"),
        (["--report_to", "tensorboard"], "tensorboard is not installed"),  # our earlier way to turn tracking on
    ],
)
def test_tracking_without_an_installed_tracker_is_refused(capsys, arguments, message):
    from accelerate import PartialState
    from accelerate.tracking import filter_trackers

    PartialState()
    if filter_trackers("all"):
        pytest.skip("a tracker is installed here: the refusal cannot be observed")
    with pytest.raises(SystemExit):
        train.parse_args(arguments)
    assert message in capsys.readouterr().err


class FakeHfApi:
    """Records what `--push_to_hub` would send: the repo it creates and, per upload, the files it would upload."""

    calls: list = []

    def create_repo(self, repo_id, exist_ok=False, token=None):
        FakeHfApi.calls.append(("create_repo", repo_id, exist_ok, token))

        class Url:
            pass

        url = Url()
        url.repo_id = repo_id
        return url

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(kwargs["folder_path"])
        files = sorted(
            filter_repo_objects(
                [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()],
                ignore_patterns=kwargs.get("ignore_patterns"),
            )
        )
        FakeHfApi.calls.append(("upload_folder", kwargs, files))


def test_push_to_hub_uploads_the_model_at_each_checkpoint_and_at_the_end(tmp_path, monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(train, "HfApi", FakeHfApi)
    run_train(
        tmp_path,
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--toy_train_size",
        "4",
        "--push_to_hub",
        "--hub_model_id",
        "me/possam-finetuned",
        "--hub_token",
        "secret",
    )
    assert FakeHfApi.calls[0] == ("create_repo", "me/possam-finetuned", True, "secret")
    uploads = [call for call in FakeHfApi.calls if call[0] == "upload_folder"]
    assert [call[1]["commit_message"] for call in uploads] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
        "End of training",
    ]
    for _, kwargs, files in uploads:
        assert kwargs["repo_id"] == "me/possam-finetuned" and kwargs["token"] == "secret"
        assert kwargs["folder_path"] == str(tmp_path / "run") and kwargs["repo_type"] == "model"
        # the model and its processor, never the resumable checkpoints (optimizer / RNG states)
        assert {"config.json", "model.safetensors", "processor_config.json"} <= set(files), files
        assert not any(name.startswith(("checkpoint-", ".tmp-checkpoint-")) for name in files), files
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
