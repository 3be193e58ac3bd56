"""
`training/prepare_panoptic_parquet.py`, run as the command it is, on the real COCO panoptic sample (two val2017
images with their official PNGs and segments) and on tiny synthetic sets: byte-exact round trip, fresh data and no
stale shards on re-runs, nothing in the datasets cache, shards that balance over 8/16/32/64 processes, the optional
`semantic_label` column, and clear errors for bad input.
"""

import importlib.util
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "prepare_panoptic_parquet.py"
COCO_SAMPLE = Path(os.environ.get("COCO_PANOPTIC_SAMPLE", "/work/shared/data/coco-panoptic-sample"))
FIRST_IMAGE, SECOND_IMAGE = "000000142238", "000000439180"  # the sample's two images, in the JSON's order


def run_prepare(tmp_path: Path, *arguments, check: bool = True) -> subprocess.CompletedProcess:
    """Run the script with the Hugging Face caches inside `tmp_path`, where `datasets_cache_files` looks."""
    hf_home = tmp_path / "hf_home"
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, str(SCRIPT), *map(str, arguments)]
    result = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def datasets_cache_files(tmp_path: Path) -> list[Path]:
    return [path for path in (tmp_path / "hf_home" / "datasets").rglob("*") if path.is_file()]


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet"))


def read_rows(folder: Path) -> list[dict]:
    """The rows as stored, read with plain pyarrow (no datasets decoding), shards in name order."""
    return [row for path in shard_files(folder) for row in pq.read_table(path).to_pylist()]


@pytest.fixture
def coco_sample(tmp_path: Path) -> dict:
    """A writable copy of the real sample in panopticapi's layout: the PNG folder is the JSON path without .json."""
    if not COCO_SAMPLE.is_dir():
        pytest.skip(f"the real COCO panoptic sample is not at {COCO_SAMPLE} (set COCO_PANOPTIC_SAMPLE)")
    root = tmp_path / "coco"
    shutil.copytree(COCO_SAMPLE / "input_images", root / "images")
    shutil.copytree(COCO_SAMPLE / "panoptic_examples", root / "panoptic_examples")
    shutil.copy(COCO_SAMPLE / "panoptic_examples.json", root / "panoptic_examples.json")
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the shared copy is read-only; the tests change files
    return {
        "json": root / "panoptic_examples.json",
        "images": root / "images",
        "pngs": root / "panoptic_examples",
        "annotations": json.loads((root / "panoptic_examples.json").read_text()),
    }


def sample_arguments(sample: dict, output_dir: Path, *extra) -> list:
    return [
        "--annotations_json",
        sample["json"],
        "--images_folder",
        sample["images"],
        "--output_dir",
        output_dir,
        *extra,
    ]


def load_script():
    """The script as a module, for its pure helpers."""
    spec = importlib.util.spec_from_file_location("prepare_panoptic_parquet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_real_coco_sample_round_trips_byte_exact_and_streams(tmp_path, coco_sample):
    """Real COCO files in, the same bytes and segments out: through pyarrow, through the streaming loader, and
    checked against panopticapi's own `rgb2id`."""
    from datasets import Image as ImageFeature
    from panopticapi.utils import rgb2id

    from transformers_possam.data import decode_panoptic_sample
    from transformers_possam.data.stream import load_panoptic_dataset

    output = tmp_path / "parquet" / "validation"
    result = run_prepare(tmp_path, *sample_arguments(coco_sample, output, "--vocabulary", "coco"))
    assert datasets_cache_files(tmp_path) == []
    # 2 rows: the default 64 shards is capped at 2, which does not divide over 8/16/32/64 processes
    assert [path.name for path in shard_files(output)] == [
        "data-00000-of-00002.parquet",
        "data-00001-of-00002.parquet",
    ]
    assert "note:" in result.stdout and "do not divide evenly over 8, 16, 32, 64" in result.stdout

    annotations = coco_sample["annotations"]
    stored = read_rows(output)
    assert [row["image_id"] for row in stored] == [FIRST_IMAGE.lstrip("0"), SECOND_IMAGE.lstrip("0")]
    assert set(stored[0]) == {"image", "label", "image_id", "segments_info"}  # no semantic_label without the flag
    for row, annotation in zip(stored, annotations["annotations"], strict=True):
        stem = Path(annotation["file_name"]).stem
        assert row["image"]["bytes"] == (coco_sample["images"] / f"{stem}.jpg").read_bytes()
        assert row["label"]["bytes"] == (coco_sample["pngs"] / annotation["file_name"]).read_bytes()
        assert row["image_id"] == str(annotation["image_id"])
        assert row["segments_info"] == annotation["segments_info"]  # ids, categories, iscrowd, area and bbox
        # the independent reference: panopticapi's own id decoding of the stored PNG
        present = set(
            np.unique(rgb2id(np.asarray(Image.open(io.BytesIO(row["label"]["bytes"])).convert("RGB")))).tolist()
        )
        assert {segment["id"] for segment in row["segments_info"]} <= present
    segments = [segment for row in stored for segment in row["segments_info"]]
    assert len(segments) == 50 and sum(segment["iscrowd"] for segment in segments) == 3

    dataset, table = load_panoptic_dataset(str(tmp_path / "parquet"), split="validation")
    assert isinstance(dataset.features["image"], ImageFeature)  # from the datasets metadata in the parquet schema
    streamed = list(dataset)
    assert [row["image_id"] for row in streamed] == [row["image_id"] for row in stored]
    for row, raw in zip(streamed, stored, strict=True):
        image, _, segments_info = decode_panoptic_sample(row)
        assert image.size == Image.open(io.BytesIO(raw["image"]["bytes"])).size
        assert segments_info == raw["segments_info"]
    undecoded = list(dataset.decode(False))
    assert [row["image"]["bytes"] for row in undecoded] == [row["image"]["bytes"] for row in stored]

    assert len(table) == 133 and [c["id"] for c in table] == [c["id"] for c in annotations["categories"]]
    assert table[0]["name"].startswith("person,") and table[0]["isthing"] == 1  # COCO synonyms by category id
    assert json.loads((output / "categories.json").read_text()) == table


def test_rerun_after_an_image_changed_in_place_writes_the_new_bytes(tmp_path, coco_sample):
    """A cache keyed by paths (datasets' `from_generator` fingerprint) would write the old bytes again."""
    output = tmp_path / "parquet"
    run_prepare(tmp_path, *sample_arguments(coco_sample, output))
    changed = coco_sample["images"] / f"{FIRST_IMAGE}.jpg"
    old_bytes = changed.read_bytes()
    buffer = io.BytesIO()
    Image.open(changed).save(buffer, format="JPEG", quality=40)  # same path, size and pixels roughly; other bytes
    changed.write_bytes(buffer.getvalue())
    assert changed.read_bytes() != old_bytes
    run_prepare(tmp_path, *sample_arguments(coco_sample, output))
    assert read_rows(output)[0]["image"]["bytes"] == buffer.getvalue()
    assert datasets_cache_files(tmp_path) == []


def test_rerun_with_fewer_shards_leaves_no_stale_shard(tmp_path, coco_sample):
    """Old shards of another count would be read by the loader too: every row twice."""
    from transformers_possam.data.stream import load_panoptic_dataset

    output = tmp_path / "parquet"
    run_prepare(tmp_path, *sample_arguments(coco_sample, output, "--num_shards", "2"))
    assert len(shard_files(output)) == 2
    run_prepare(tmp_path, *sample_arguments(coco_sample, output, "--num_shards", "1"))
    assert [path.name for path in shard_files(output)] == ["data-00000-of-00001.parquet"]
    assert sorted(path.name for path in output.iterdir()) == [
        "categories.json",
        "data-00000-of-00001.parquet",
    ]  # no staging left
    dataset, _ = load_panoptic_dataset(str(output))
    assert [row["image_id"] for row in dataset.decode(False)] == [FIRST_IMAGE.lstrip("0"), SECOND_IMAGE.lstrip("0")]


def test_shard_slices_are_contiguous_and_differ_by_at_most_one():
    """The split rule itself, on sizes up to COCO train's."""
    script = load_script()
    for num_rows, num_shards in ((130, 64), (64, 64), (118287, 64), (5, 3), (2, 2)):
        slices = script.shard_slices(num_rows, num_shards)
        sizes = [s.stop - s.start for s in slices]
        assert slices[0].start == 0 and slices[-1].stop == num_rows
        assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert script.choose_num_shards(script.DEFAULT_NUM_SHARDS, 1000) == (64, None)
    num_shards, note = script.choose_num_shards(script.DEFAULT_NUM_SHARDS, 2)
    assert num_shards == 2 and "do not divide evenly" in note


def test_default_shards_balance_over_8_16_32_64_processes(tmp_path):
    """130 rows make 64 shards of 2 or 3 rows, so `split_dataset_by_node` gives 8/16/32/64 processes whole shards."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    from transformers_possam.data import toy_panoptic_rows

    source = tmp_path / "toy"
    (source / "images").mkdir(parents=True)
    (source / "panoptic").mkdir()
    images, annotations = [], []
    for index, row in enumerate(toy_panoptic_rows(130, size=32)):
        row["image"].save(source / "images" / f"{index:03d}.jpg")
        row["label"].save(source / "panoptic" / f"{index:03d}.png")
        images.append({"id": index, "file_name": f"{index:03d}.jpg", "height": 32, "width": 32})
        annotations.append({"image_id": index, "file_name": f"{index:03d}.png", "segments_info": row["segments_info"]})
    categories = [{"id": i, "name": f"class{i}", "isthing": int(i < 3)} for i in range(6)]
    (source / "panoptic.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    output = tmp_path / "parquet"
    result = run_prepare(
        tmp_path,
        "--annotations_json",
        source / "panoptic.json",
        "--images_folder",
        source / "images",
        "--output_dir",
        output,
    )
    assert "note:" not in result.stdout

    files = shard_files(output)
    assert len(files) == 64 and files[-1].name == "data-00063-of-00064.parquet"
    sizes = [pq.ParquetFile(path).metadata.num_rows for path in files]
    assert set(sizes) == {2, 3} and sum(sizes) == 130
    assert [row["image_id"] for row in read_rows(output)] == [
        str(index) for index in range(130)
    ]  # contiguous, in order
    dataset = load_dataset("parquet", data_files=[str(path) for path in files], split="train", streaming=True)
    assert dataset.n_shards == 64
    for world_size in (8, 16, 32, 64):
        assert split_dataset_by_node(dataset, rank=0, world_size=world_size).n_shards == 64 // world_size
    assert datasets_cache_files(tmp_path) == []


def write_semantic_pngs(annotations: dict, folder: Path) -> dict[str, bytes]:
    """Small ADE20K-style semantic maps: uint8 category ids with a 255 (ignore) band, named <image stem>.png."""
    folder.mkdir()
    written = {}
    for image in annotations["images"]:
        semantic = np.full((image["height"], image["width"]), 7, np.uint8)
        semantic[: image["height"] // 3] = 255
        semantic[:, image["width"] // 2 :] = 149
        path = folder / f"{Path(image['file_name']).stem}.png"
        Image.fromarray(semantic).save(path)
        written[str(image["id"])] = path.read_bytes()
    return written


def test_semantic_folder_adds_a_byte_exact_semantic_label_column(tmp_path, coco_sample):
    """The dataset's own semantic PNGs (uint8 category ids, 255 = ignore) travel byte for byte; a missing one stops
    the run before anything is replaced."""
    from datasets import Image as ImageFeature

    from transformers_possam.data.stream import load_panoptic_dataset

    semantic_folder = tmp_path / "semantic"
    written = write_semantic_pngs(coco_sample["annotations"], semantic_folder)
    output = tmp_path / "parquet"
    run_prepare(tmp_path, *sample_arguments(coco_sample, output, "--semantic_folder", semantic_folder))
    stored = read_rows(output)
    assert [row["semantic_label"]["bytes"] for row in stored] == [written[row["image_id"]] for row in stored]

    dataset, _ = load_panoptic_dataset(str(output))
    assert isinstance(dataset.features["semantic_label"], ImageFeature)  # from the datasets metadata in the schema
    for row in dataset.decode(False):  # bytes whether or not the loader decodes images itself
        semantic, image = (Image.open(io.BytesIO(row[column]["bytes"])) for column in ("semantic_label", "image"))
        assert semantic.mode == "L" and semantic.size == image.size
        assert set(np.unique(np.asarray(semantic)).tolist()) == {7, 149, 255}

    (semantic_folder / f"{SECOND_IMAGE}.png").unlink()
    result = run_prepare(
        tmp_path, *sample_arguments(coco_sample, output, "--semantic_folder", semantic_folder), check=False
    )
    assert result.returncode != 0
    # names the image, its id and the folder searched
    assert (
        f"semantic PNG for image {SECOND_IMAGE}.jpg (image_id {SECOND_IMAGE.lstrip('0')}) not found" in result.stderr
    )
    assert str(semantic_folder) in result.stderr
    assert [row["semantic_label"]["bytes"] for row in read_rows(output)] == list(written.values())  # old shards kept


def break_annotation_image_id(sample: dict) -> None:
    annotations = sample["annotations"]
    annotations["annotations"][1]["image_id"] = 999
    sample["json"].write_text(json.dumps(annotations))


def no_change(sample: dict) -> None:
    pass


def write_undersized_semantic_pngs(sample: dict) -> None:
    folder = sample["json"].parent / "semantic"
    folder.mkdir()
    for image in sample["annotations"]["images"]:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"{Path(image['file_name']).stem}.png")


# case: (how the input is broken, extra arguments given the sample, fragments the error message must contain)
BAD_INPUTS = {
    # the JSON path does not exist
    "missing annotations JSON": (
        lambda sample: sample["json"].unlink(),
        lambda sample: [],
        ["annotations JSON not found"],
    ),
    # the images folder does not exist
    "missing images folder": (
        lambda sample: shutil.rmtree(sample["images"]),
        lambda sample: [],
        ["images folder not found"],
    ),
    # the default PNG folder (the JSON path without .json) does not exist
    "missing PNG folder": (
        lambda sample: shutil.rmtree(sample["pngs"]),
        lambda sample: [],
        ["panoptic PNG folder not found"],
    ),
    # an annotation refers to an image id that `images` does not list
    "unknown image id": (
        break_annotation_image_id,
        lambda sample: [],
        ["has image_id 999, which is not in its 'images'"],
    ),
    # an image file is missing: the message names the file and its image id
    "missing image file": (
        lambda sample: (sample["images"] / f"{SECOND_IMAGE}.jpg").unlink(),
        lambda sample: [],
        [f"image file for image_id {SECOND_IMAGE.lstrip('0')} not found", f"{SECOND_IMAGE}.jpg"],
    ),
    # a panoptic PNG is missing: the message names the file and its image id
    "missing PNG file": (
        lambda sample: (sample["pngs"] / f"{FIRST_IMAGE}.png").unlink(),
        lambda sample: [],
        [f"panoptic PNG for image_id {FIRST_IMAGE.lstrip('0')} not found", f"{FIRST_IMAGE}.png"],
    ),
    # no shard at all is not a dataset
    "zero shards": (no_change, lambda sample: ["--num_shards", "0"], ["argument --num_shards: must be at least 1"]),
    # the semantic folder does not exist
    "missing semantic folder": (
        no_change,
        lambda sample: ["--semantic_folder", sample["json"].parent / "semantic"],
        ["semantic PNG folder not found"],
    ),
    # the RGB panoptic PNGs passed as semantic maps (a likely mix-up)
    "RGB PNGs as semantic maps": (
        no_change,
        lambda sample: ["--semantic_folder", sample["pngs"]],
        ["has mode RGB, not one 8-bit channel", f"{FIRST_IMAGE}.png"],
    ),
    # semantic maps that do not have their image's size
    "semantic maps of another size": (
        write_undersized_semantic_pngs,
        lambda sample: ["--semantic_folder", sample["json"].parent / "semantic"],
        [f"{FIRST_IMAGE}.png is 8x8 but its image", "is 640x427: they must match"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_with_a_clear_error(tmp_path, coco_sample, case):
    """Each bad input stops the run with a message naming it, before any shard is written."""
    break_input, extra_arguments, fragments = BAD_INPUTS[case]
    break_input(coco_sample)
    output = tmp_path / "parquet"
    result = run_prepare(tmp_path, *sample_arguments(coco_sample, output, *extra_arguments(coco_sample)), check=False)
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr  # a message, not a crash
    assert shard_files(output) == [] and not list(output.glob(".prepare-*"))  # nothing half-written left behind
