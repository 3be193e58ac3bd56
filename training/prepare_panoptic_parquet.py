#!/usr/bin/env python
"""Turn a COCO-format panoptic download into parquet shards for `training/train.py` (streamable, pushable to the Hub).

    # COCO panoptic (official zips: panoptic_annotations_trainval2017 + train2017/val2017 images)
    python training/prepare_panoptic_parquet.py --annotations_json annotations/panoptic_train2017.json \\
        --images_folder train2017 --vocabulary coco --output_dir data/coco_panoptic/train
    # ADE20K panoptic, as prepared by Mask2Former's datasets/prepare_ade20k_pan_seg.py, with the semantic ground
    # truth of datasets/prepare_ade20k_sem_seg.py for mIoU scored the way FC-CLIP does
    python training/prepare_panoptic_parquet.py --annotations_json ADEChallengeData2016/ade20k_panoptic_val.json \\
        --images_folder ADEChallengeData2016/images/validation --vocabulary ade20k \\
        --semantic_folder ADEChallengeData2016/annotations_detectron2/validation --output_dir data/ade20k_panoptic/validation

Rows follow `nielsr/coco-panoptic-val2017`: `image` and `label` (the RGB panoptic PNG) as encoded bytes, `image_id`
(string), `segments_info` [{id, category_id, iscrowd, area, bbox}]. With `--semantic_folder`, a column
`semantic_label` holds the dataset's own semantic PNG for each image (`<image file stem>.png` in that folder): a
uint8 map of the dataset's category ids (the `id`s of `categories.json`, not class indices), 255 = ignore.

`categories.json` ({"id", "name" with synonyms, "isthing"}, in class-index order) is written next to the shards (and
one level up, where train.py looks for it when given the dataset root). `--vocabulary coco|ade20k` takes the
prompt-engineered names with synonyms from this package's vocabularies; otherwise the JSON's names are used.

Shards: `--num_shards` (default 64, which divides evenly over 8, 16, 32 and 64 training processes, so that
`split_dataset_by_node` gives every process whole shards) contiguous shards whose sizes differ by at most one row,
named `data-{index:05d}-of-{num_shards:05d}.parquet`. The files are read afresh on every run (no datasets cache) and
written one row group (~100 MB) at a time, so memory stays bounded however large the dataset. New shards are
written to a temporary folder inside `--output_dir` and replace the old `*.parquet` there only once all are
complete. Upload with `huggingface_hub.upload_folder`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value
from PIL import Image as PILImage


DEFAULT_NUM_SHARDS = 64
PROCESS_COUNTS = (8, 16, 32, 64)  # training world sizes the default shard count divides evenly over
ROW_GROUP_BYTES = (
    100 * 1024 * 1024
)  # datasets' own target (config.MAX_ROW_GROUP_SIZE): bounds memory and random access
STAGING_PREFIX = ".prepare-"  # hidden, so neither our loader's `*.parquet` glob nor the Hub's data files see it
SEMANTIC_COLUMN = "semantic_label"
SEMANTIC_MODES = ("L", "P")  # single-channel 8-bit PNGs: the pixel values are the category ids

FEATURES = Features(
    {
        "image": Image(),
        "label": Image(),
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


class PreparationError(ValueError):
    """Bad input; the message names the input and says what to do."""


@dataclass
class SampleFiles:
    """Where one row's files are, checked to exist before any shard is written."""

    image_id: str
    image_path: Path
    label_path: Path
    semantic_path: Path | None
    segments_info: list[dict]


def features_for(with_semantic: bool) -> Features:
    """The row schema; `semantic_label` only when semantic PNGs were given, so other datasets keep today's schema."""
    return Features({**FEATURES, SEMANTIC_COLUMN: Image()}) if with_semantic else FEATURES


def category_table(categories: list[dict], vocabulary: str | None) -> list[dict]:
    """
    {"id", "name", "isthing"} per category of the JSON (checked by `Vocabulary.from_categories`), named from the
    package's vocabulary (`--vocabulary`, matched by category id) when one is given.
    """
    # imported here, after the inputs were checked: the package pulls in torch (seconds), and bad input should fail at once
    from transformers_possam.vocabularies import PRESET_ALIASES, Vocabulary, load_vocabulary

    try:
        table = Vocabulary.from_categories(categories, "the annotations JSON's categories")
    except (TypeError, ValueError) as error:
        raise PreparationError(str(error)) from None
    if vocabulary is not None:
        preset = load_vocabulary(PRESET_ALIASES[vocabulary])
        names = dict(zip(preset.category_ids, preset.names))
        table = Vocabulary(
            names=tuple(names.get(identifier, name) for identifier, name in zip(table.category_ids, table.names)),
            is_thing=table.is_thing,
            category_ids=table.category_ids,
        )
    return table.to_categories()


def load_annotations(path: Path) -> dict:
    """The COCO panoptic JSON, checked to have the three lists this script reads."""
    if not path.is_file():
        raise PreparationError(
            f"annotations JSON not found: {path}. Pass --annotations_json the COCO-format panoptic JSON "
            "(e.g. annotations/panoptic_val2017.json from COCO's panoptic_annotations_trainval2017.zip)."
        )
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PreparationError(
            f"annotations JSON {path} is not valid JSON ({error}); download or unzip it again."
        ) from error
    missing = [key for key in ("images", "annotations", "categories") if key not in annotations]
    if missing:
        raise PreparationError(
            f"annotations JSON {path} lacks {missing}: pass a COCO panoptic JSON, which has 'images', 'annotations' "
            "and 'categories'."
        )
    if not annotations["annotations"]:
        raise PreparationError(f"annotations JSON {path} has no annotations: there is nothing to write.")
    return annotations


def require_folder(path: Path, what: str, advice: str) -> Path:
    if not path.is_dir():
        raise PreparationError(f"{what} folder not found: {path}. {advice}")
    return path


def collect_samples(
    annotations: dict, annotations_path: Path, images_folder: Path, png_folder: Path, semantic_folder: Path | None
) -> list[SampleFiles]:
    """
    One `SampleFiles` per annotation, in the JSON's order. Every file is checked now (to exist; semantic PNGs also
    for their format, from the headers), so that bad input stops the run before hours of writing, not in the middle.
    """
    images = {image["id"]: image for image in annotations["images"]}
    samples, problems = [], []
    for index, annotation in enumerate(annotations["annotations"]):
        image = images.get(annotation["image_id"])
        if image is None:
            raise PreparationError(
                f"annotation {index} ({annotation.get('file_name')}) of {annotations_path} has image_id "
                f"{annotation['image_id']!r}, which is not in its 'images': the JSON is inconsistent; use an images "
                "list and annotations of the same split (e.g. the unmodified panoptic JSON)."
            )
        image_id = str(annotation["image_id"])
        sample = SampleFiles(
            image_id=image_id,
            image_path=images_folder / image["file_name"],
            label_path=png_folder / annotation["file_name"],
            semantic_path=semantic_folder / f"{Path(image['file_name']).stem}.png" if semantic_folder else None,
            segments_info=annotation["segments_info"],
        )
        if not sample.image_path.is_file():
            problems.append(
                f"image file for image_id {image_id} not found: {sample.image_path} (check --images_folder)"
            )
        if not sample.label_path.is_file():
            problems.append(
                f"panoptic PNG for image_id {image_id} not found: {sample.label_path} (check --png_folder)"
            )
        if sample.semantic_path is not None:
            if not sample.semantic_path.is_file():
                problems.append(
                    f"semantic PNG for image {image['file_name']} (image_id {image_id}) not found: {sample.semantic_path} "
                    f"(--semantic_folder {semantic_folder} needs <image file stem>.png for every image)"
                )
            elif sample.image_path.is_file() and (problem := semantic_png_problem(sample)):
                problems.append(problem)
        samples.append(sample)
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise PreparationError(
            f"{len(problems)} problem(s) with the files named by {annotations_path}:\n  {shown}{more}"
        )
    return samples


def semantic_png_problem(sample: SampleFiles) -> str | None:
    """
    What is wrong with a sample's semantic PNG, if anything: it must be one 8-bit channel of category ids, of the
    image's size. Only the headers are read (PIL opens lazily).
    """
    try:
        with PILImage.open(sample.semantic_path) as semantic, PILImage.open(sample.image_path) as image:
            semantic_mode, semantic_size, image_size = semantic.mode, semantic.size, image.size
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        return (
            f"semantic PNG {sample.semantic_path} or image {sample.image_path} (image_id {sample.image_id}): {error}"
        )
    if semantic_mode not in SEMANTIC_MODES:
        return (
            f"semantic PNG {sample.semantic_path} (image_id {sample.image_id}) has mode {semantic_mode}, not one 8-bit channel "
            "of category ids: pass --semantic_folder the semantic maps (e.g. ADE20K's annotations_detectron2/ from "
            "Mask2Former's prepare_ade20k_sem_seg.py), not the RGB panoptic PNGs"
        )
    if semantic_size != image_size:
        return (
            f"semantic PNG {sample.semantic_path} is {semantic_size[0]}x{semantic_size[1]} but its image "
            f"{sample.image_path} (image_id {sample.image_id}) is {image_size[0]}x{image_size[1]}: they must match"
        )
    return None


def choose_num_shards(requested: int, num_rows: int) -> tuple[int, str | None]:
    """
    The shard count: `requested`, capped at `num_rows` (a shard must hold a row), and a note when it does not divide
    evenly over the usual process counts; then `split_dataset_by_node` makes every process read every shard.
    """
    num_shards = min(requested, num_rows)
    uneven = [count for count in PROCESS_COUNTS if num_shards % count]
    if not uneven:
        return num_shards, None
    reason = (
        f"{num_rows} rows make only {num_shards} non-empty shard(s), not {requested}; "
        if num_shards < requested
        else ""
    )
    counts = ", ".join(str(count) for count in uneven)
    return num_shards, (
        f"note: {reason}{num_shards} shard(s) do not divide evenly over {counts} training processes "
        "(each process would then read every shard and keep 1 row in world_size)."
    )


def shard_slices(num_rows: int, num_shards: int) -> list[slice]:
    """Contiguous row ranges whose sizes differ by at most one."""
    return [slice(index * num_rows // num_shards, (index + 1) * num_rows // num_shards) for index in range(num_shards)]


def read_file(path: Path, what: str, image_id: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:  # removed or unreadable since the check in collect_samples
        raise PreparationError(f"cannot read the {what} of image_id {image_id}: {path} ({error})") from error


def read_row(sample: SampleFiles) -> dict:
    """The row of one sample, with the files' bytes as they are on disk now."""
    row = {
        "image": read_file(sample.image_path, "image", sample.image_id),
        "label": read_file(sample.label_path, "panoptic PNG", sample.image_id),
        "image_id": sample.image_id,
        "segments_info": [
            {
                "id": s["id"],
                "category_id": s["category_id"],
                "iscrowd": s.get("iscrowd", 0),
                "area": s.get("area", 0),
                "bbox": [int(v) for v in s.get("bbox", [0, 0, 0, 0])],
            }
            for s in sample.segments_info
        ],
    }
    if sample.semantic_path is not None:
        row[SEMANTIC_COLUMN] = read_file(sample.semantic_path, "semantic PNG", sample.image_id)
    return row


def row_groups(samples: list[SampleFiles]) -> Iterator[list[dict]]:
    """The rows of `samples`, read from disk in lists of about `ROW_GROUP_BYTES`: one list is in memory at a time."""
    group, group_bytes = [], 0
    for sample in samples:
        row = read_row(sample)
        group.append(row)
        group_bytes += sum(len(value) for value in row.values() if isinstance(value, bytes))
        if group_bytes >= ROW_GROUP_BYTES:
            yield group
            group, group_bytes = [], 0
    if group:
        yield group


def parquet_writer_options(features: Features, schema: pa.Schema) -> dict:
    """
    The `pq.ParquetWriter` options `Dataset.to_parquet` uses in the installed datasets (5.x: image bytes stored
    uncompressed and PLAIN, content-defined chunking so that re-uploads to the Hub deduplicate); an older datasets
    without them gets pyarrow's defaults, which read back the same.
    """
    try:
        from datasets.arrow_writer import get_parquet_column_options
        from datasets.config import DEFAULT_CDC_OPTIONS
    except ImportError:
        return {}
    return {
        "use_content_defined_chunking": DEFAULT_CDC_OPTIONS,
        "write_page_index": True,
        **get_parquet_column_options(features, schema),
    }


def write_shard(samples: list[SampleFiles], path: Path, features: Features) -> None:
    """
    Write one parquet shard, a row group (~100 MB) at a time. The schema carries datasets' feature metadata, so
    `load_dataset("parquet", ...)` decodes the `Image` columns.
    """
    schema = features.arrow_schema
    with pq.ParquetWriter(path, schema, **parquet_writer_options(features, schema)) as writer:
        for rows in row_groups(samples):
            batch = features.encode_batch({name: [row[name] for row in rows] for name in features})
            writer.write_table(pa.Table.from_pydict(batch, schema=schema))


def publish_shards(staging: Path, output_dir: Path) -> list[Path]:
    """Move the complete new shards into `output_dir`, then remove the old `*.parquet` the loader would also read."""
    new_names = sorted(path.name for path in staging.glob("*.parquet"))
    for name in new_names:
        os.replace(staging / name, output_dir / name)
    for old in output_dir.glob("*.parquet"):
        if old.name not in new_names:
            old.unlink()
    return [output_dir / name for name in new_names]


def write_shards(samples: list[SampleFiles], features: Features, output_dir: Path, num_shards: int) -> list[Path]:
    """Write all shards into a staging folder inside `output_dir`; the old shards stay until every new one is complete."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    try:
        for index, rows in enumerate(shard_slices(len(samples), num_shards)):
            shard = samples[rows]
            write_shard(shard, staging / f"data-{index:05d}-of-{num_shards:05d}.parquet", features)
            print(f"shard {index + 1}/{num_shards}: {len(shard)} rows", flush=True)
        return publish_shards(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def at_least_one(text: str) -> int:
    """argparse type of --num_shards."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {value} (the default {DEFAULT_NUM_SHARDS} divides evenly over 8, 16, 32 and 64 processes)"
        )
    return value


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations_json", required=True, help="COCO-format panoptic JSON")
    parser.add_argument(
        "--png_folder", default=None, help="panoptic PNGs; default: the JSON path without .json (panopticapi's rule)"
    )
    parser.add_argument("--images_folder", required=True, help="the images named by the JSON's images[].file_name")
    parser.add_argument(
        "--semantic_folder",
        default=None,
        help="optional semantic PNGs (<image file stem>.png: uint8 category ids, 255 = ignore) "
        "for a semantic_label column",
    )
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocabulary", choices=["coco", "ade20k"], default=None)
    parser.add_argument(
        "--num_shards",
        type=at_least_one,
        default=DEFAULT_NUM_SHARDS,
        help=f"parquet shards (default {DEFAULT_NUM_SHARDS}: even over 8/16/32/64 processes); capped at the row count",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_arguments(argv)
    annotations_path = Path(args.annotations_json)
    annotations = load_annotations(annotations_path)
    images_folder = require_folder(
        Path(args.images_folder), "images", "Pass --images_folder the folder holding the JSON's images[].file_name."
    )
    png_folder = require_folder(
        Path(args.png_folder) if args.png_folder else annotations_path.with_suffix(""),
        "panoptic PNG",
        "Unzip the PNGs next to the JSON under its name without .json (panopticapi's layout) or pass --png_folder.",
    )
    semantic_folder = None
    if args.semantic_folder:
        semantic_folder = require_folder(
            Path(args.semantic_folder),
            "semantic PNG",
            "Pass --semantic_folder the folder of <image file stem>.png semantic maps.",
        )
    samples = collect_samples(annotations, annotations_path, images_folder, png_folder, semantic_folder)
    num_shards, note = choose_num_shards(args.num_shards, len(samples))
    if note:
        print(note, flush=True)
    # the table before the long part, so that a problem with the package or its vocabularies shows at once
    table = category_table(annotations["categories"], args.vocabulary)
    from transformers_possam.data import save_category_table  # after the input checks, like in category_table

    output_dir = Path(args.output_dir)
    write_shards(samples, features_for(semantic_folder is not None), output_dir, num_shards)
    save_category_table(table, output_dir)
    save_category_table(table, output_dir.parent)
    print(
        f"wrote {len(samples)} rows in {num_shards} shard(s) and categories.json ({len(table)} classes) to {output_dir}"
    )
    return output_dir


if __name__ == "__main__":
    try:
        main()
    except PreparationError as error:
        sys.exit(f"error: {error}")
