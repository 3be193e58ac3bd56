"""Panoptic training streams: 🤗 datasets (streaming) -> checked, augmented, processed samples, with bad-sample counting.

Determinism: sample k of epoch e is augmented with a generator seeded by (seed, epoch, rank, k), so a run resumed at a
known position (epoch, samples consumed) sees exactly the samples an uninterrupted run would.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..image_processing_possam import encode_panoptic_annotation
from .augmentation import large_scale_jitter
from .panoptic import (
    CATEGORY_TABLE_FILE,
    REDUCE_LABELS_COLUMN,
    BadSample,
    OneChannelAnnotation,
    TooManyBadSamples,
    categories_from_id2label,
    check_bad_fraction,
    coco_panoptic_categories,
    decode_instance_annotation,
    decode_panoptic_sample,
    load_category_table,
    load_label_file,
    without_image_decoding,
)
from .synthetic import TOY_CATEGORIES, toy_panoptic_rows


__all__ = [
    "StreamPosition",
    "PanopticTrainStream",
    "load_panoptic_dataset",
    "collate_panoptic",
    "shard_for_process",
    "TooManyBadSamples",
    "UnknownCategory",
    "dataset_format",
]

logger = logging.getLogger(__name__)


PANOPTIC_COLUMNS = ("image", "label", "segments_info")
INSTANCE_COLUMNS = ("image", "annotation")
# the instance-segmentation example's per-row label2id column (`semantic_class_to_id`)
LABEL2ID_COLUMN = "semantic_class_to_id"


def dataset_format(column_names, where: str) -> str:
    """`"panoptic"` (image, label, segments_info) or `"instance"` (image, annotation), from a dataset's columns."""
    columns = set(column_names or ())
    if set(PANOPTIC_COLUMNS) <= columns:
        return "panoptic"
    if set(INSTANCE_COLUMNS) <= columns:
        return "instance"
    raise ValueError(
        f"{where} has the columns {sorted(columns)}, which match neither accepted schema: COCO panoptic "
        f"{list(PANOPTIC_COLUMNS)} (as nielsr/coco-panoptic-val2017) or instance segmentation {list(INSTANCE_COLUMNS)} "
        "(as transformers' examples/pytorch/instance-segmentation; annotation: channel 0 = class id, 1 = instance id)."
    )


def check_annotation_channels(dataset, where: str) -> None:
    """
    Fail early, with the fix, when the first row's `annotation` is a one-channel PNG (a semantic map alone, no
    instance ids): every row would otherwise be skipped as bad. A row that does not decode is left to the stream,
    which skips and counts it.
    """
    first = next(iter(without_image_decoding(dataset).select_columns(["annotation"])))
    try:
        decode_instance_annotation({"image": first["annotation"], "annotation": first["annotation"]})
    except OneChannelAnnotation as error:
        raise ValueError(f"{where}, first row: {error}") from None
    except BadSample:
        pass  # an undecodable row: skipped and counted by the stream


def class_label_features(features) -> dict[str, list[str]]:
    """{column: class names} of the `ClassLabel` features (also inside a list / `Sequence`) of a dataset."""
    from datasets import ClassLabel, Sequence

    found: dict[str, list[str]] = {}
    for column, feature in (features or {}).items():
        inner = feature.feature if isinstance(feature, Sequence) else feature
        inner = inner[0] if isinstance(inner, list) and len(inner) == 1 else inner
        if isinstance(inner, ClassLabel):
            found[column] = list(inner.names)
    return found


def dataset_categories(
    dataset, form: str, where: str, label_file: str | None, bundled_table: Path | None
) -> tuple[list[dict], str]:
    """
    (category table, where it came from) of a dataset of schema `form`, in this order: `label_file`; the dataset's own
    table (`bundled_table`, its `categories.json`); for the instance schema, the `semantic_class_to_id` (label2id)
    column of its first row, as the instance-segmentation example reads it, else its one `ClassLabel` feature (class
    id i = `names[i]`); for the COCO panoptic schema, the shipped
    COCO-133 categories (COCO's ids), which is what a COCO panoptic dataset without its own table uses.
    """
    if label_file is not None:
        return load_label_file(label_file), f"--label_file {label_file}"
    if bundled_table is not None:
        return load_category_table(bundled_table), str(bundled_table)
    if form == "instance":
        columns = getattr(dataset, "column_names", None) or []
        if LABEL2ID_COLUMN in columns:
            first = next(iter(dataset.select_columns([LABEL2ID_COLUMN])))
            source = f"the {LABEL2ID_COLUMN!r} column of {where}"
            mapping = {key: value for key, value in first[LABEL2ID_COLUMN].items() if value is not None}
            return categories_from_id2label(mapping, source), source
        class_labels = class_label_features(getattr(dataset, "features", None))
        if len(class_labels) == 1:
            ((column, names),) = class_labels.items()
            source = f"the ClassLabel feature {column!r} of {where}"
            return categories_from_id2label(dict(enumerate(names)), source), source
        if len(class_labels) > 1:
            raise ValueError(
                f"{where} has several ClassLabel features {sorted(class_labels)}: which one names the annotation's "
                "class ids is ambiguous. Pass --label_file with the id2label of the annotation's first channel."
            )
        raise ValueError(
            f"{where} (image + annotation) names no classes: pass --label_file with an id2label JSON "
            '({"0": "background", "1": "person", ...}, the ids of the annotation\'s first channel), add a '
            f"{LABEL2ID_COLUMN!r} column (label2id, as transformers' instance-segmentation example) or a "
            f"{CATEGORY_TABLE_FILE} beside the data."
        )
    logger.info("%s ships no category table: using the built-in COCO panoptic 133 categories (COCO's ids).", where)
    return coco_panoptic_categories(), "the built-in COCO panoptic 133 categories (the dataset ships none)"


def load_panoptic_dataset(
    dataset_name: str | None,
    split: str = "train",
    streaming: bool = True,
    toy_size: int = 256,
    seed: int = 0,
    label_file: str | None = None,
    return_source: bool = False,
    do_reduce_labels: bool = False,
):
    """
    Returns (iterable dataset, category table), and where the table came from when `return_source`:
    - `None`: the embedded toy set (`toy_size` images of the split, generated deterministically);
    - a local folder: a `save_to_disk` dataset (`DatasetDict`: the split; `Dataset`: its one split, whatever `split`
      says), or the `*.parquet` shards of `folder/split/`, or, in a folder without split subfolders, the shards
      directly in it (one split);
    - a Hub id: `load_dataset(id, split=split, streaming=True)`.

    Rows follow one of two schemas (`dataset_format`): COCO panoptic (`image`, `label`, `segments_info`) or
    instance segmentation (`image`, `annotation`). The category table comes from `dataset_categories`: `label_file`,
    else the dataset's `categories.json`, else (instance schema) its `semantic_class_to_id` column, else (COCO panoptic
    schema) the built-in COCO-133 categories. `do_reduce_labels` (instance schema only, as the instance-segmentation
    example's flag): class 0 of the annotations is left unlabeled and the other ids, in the annotations and the
    table alike, shift down by one.

    Image columns come undecoded (`without_image_decoding`): `decode_panoptic_sample` decodes each row, so a corrupt
    file is a skippable bad sample in training and evaluation instead of an exception inside the dataset iterator.
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if dataset_name is None:
        rows = list(toy_panoptic_rows(toy_size, seed=seed, split=split))
        dataset = Dataset.from_list(rows)
        dataset = dataset.to_iterable_dataset(num_shards=min(8, len(rows))) if streaming else dataset
        categories: list[dict] = [dict(category) for category in TOY_CATEGORIES]
        if label_file is not None:
            categories = load_label_file(label_file)
        result = (without_image_decoding(dataset), categories)
        return (*result, "the embedded toy set") if return_source else result
    path = Path(dataset_name)
    bundled_table: Path | None = None
    if path.is_dir():
        where = str(path)
        bundled_table = path / CATEGORY_TABLE_FILE if (path / CATEGORY_TABLE_FILE).is_file() else None
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            saved = load_from_disk(str(path))
            if isinstance(saved, DatasetDict):
                if split not in saved:
                    raise FileNotFoundError(f"{path} has the splits {sorted(saved)}, not {split!r}: pass one of them.")
                dataset = saved[split]
                where = f"{path} (split {split!r})"
            else:
                logger.info("Split %r: %s is a single saved Dataset, read as that split.", split, path)
                dataset = saved
            if streaming:
                dataset = dataset.to_iterable_dataset(num_shards=max(1, min(8, len(dataset))))
        else:
            splits = sorted(
                child.name
                for child in path.iterdir()
                if child.is_dir() and not child.name.startswith(".") and any(child.glob("*.parquet"))
            )
            if splits and split not in splits:
                # never fall back to the root's shards here: they could be another split's (e.g. evaluating on train)
                raise FileNotFoundError(f"{path} has the splits {splits}, not {split!r}: pass one of them.")
            folder = path / split if split in splits else path
            if folder == path:
                logger.info("Split %r: reading the shards directly in %s (no split folders there).", split, path)
            files = sorted(str(p) for p in folder.glob("*.parquet"))
            if not files:
                raise FileNotFoundError(
                    f"No *.parquet shards in {folder}, and {path} is no save_to_disk dataset (dataset_dict.json / "
                    "state.json)."
                )
            dataset = load_dataset("parquet", data_files=files, split="train", streaming=streaming)
    else:
        where = f"{dataset_name} (split {split!r})"
        dataset = load_dataset(dataset_name, split=split, streaming=streaming)
        if label_file is None:
            bundled_table = hub_category_table(dataset_name)
    columns = getattr(dataset, "column_names", None) or list(next(iter(dataset)).keys())
    form = dataset_format(columns, where)
    if form == "instance":
        check_annotation_channels(dataset, where)
    categories, source = dataset_categories(dataset, form, where, label_file, bundled_table)
    if do_reduce_labels:
        if form != "instance":
            raise ValueError(
                f"--do_reduce_labels applies to instance-segmentation rows (image, annotation); {where} holds COCO "
                "panoptic rows, whose unlabeled pixels are already those no segment covers. Drop the flag."
            )
        # as the example reduces label2id: class 0 goes, the others move down by one
        categories = [dict(c, id=c["id"] - 1) for c in categories if c["id"] != 0]
        source = f"{source}, reduced (--do_reduce_labels)"
    dataset = without_image_decoding(dataset)
    if do_reduce_labels:  # after the cast: images stay undecoded bytes (a corrupt file stays a skippable bad sample)
        dataset = dataset.map(lambda row: {REDUCE_LABELS_COLUMN: True})
    result = (dataset, categories)
    return (*result, source) if return_source else result


def hub_category_table(dataset_name: str) -> Path | None:
    """The dataset repo's `categories.json`, or None when the repo has none (any other Hub failure is raised)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(dataset_name, CATEGORY_TABLE_FILE, repo_type="dataset"))
    except RemoteEntryNotFoundError:
        return None
    except LocalEntryNotFoundError as error:
        # offline: whether the repo has a table is unknown, so the COCO-133 default would be a guess
        raise FileNotFoundError(
            f"Cannot tell whether {dataset_name} ships a {CATEGORY_TABLE_FILE} (the Hub cannot be reached and none is "
            f"cached: {error}). Pass --label_file with its category table."
        ) from None


def shard_for_process(dataset, rank: int, world_size: int):
    """
    This process's part of a streamed dataset (`datasets.distributed.split_dataset_by_node`). When the shard count
    divides by the number of processes each reads whole shards; otherwise every process reads every row and keeps one
    in `world_size`, which is slower by that factor: warn, naming the fix.
    """
    from datasets.distributed import split_dataset_by_node

    num_shards = getattr(dataset, "n_shards", None)
    if world_size > 1 and num_shards is not None and num_shards % world_size != 0:
        logger.warning(
            "The dataset has %d shards, which does not divide over %d processes: every process will read every row "
            "(and keep 1 in %d). Re-shard it (training/prepare_panoptic_parquet.py --num_shards, default 64) to a "
            "multiple of the process count.",
            num_shards,
            world_size,
            world_size,
        )
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


class UnknownCategory(ValueError):
    """A sample's class / category id that the run's category table does not name: the table is wrong, not the row."""


@dataclass
class StreamPosition:
    """Where a process is in its shard of the stream; saved with checkpoints."""

    epoch: int = 0
    consumed: int = 0  # rows of the current epoch taken from the stream, bad ones included
    seen: int = 0  # rows seen in total
    bad: int = 0  # rows skipped as bad in total
    bad_ids: list = field(default_factory=list)  # the last few bad image ids

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seen": self.seen,
            "bad": self.bad,
            "bad_ids": self.bad_ids[-20:],
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class PanopticTrainStream:
    """
    An endless iterator of processed training samples from one process's shard of a dataset.

    Each sample: decode and check (bad ones are skipped with a warning naming the image id and counted; more than
    `max_bad_fraction` bad among the rows seen, once `min_seen` rows were seen, stops with `TooManyBadSamples`),
    large-scale jitter (FC-CLIP's), then normalization and padding only (`augment=False`: the image processor's
    resize, as at inference); uint8 `mask_labels` for every non-crowd segment of `segments_info` (empty where the
    crop removed it, as FC-CLIP; `drop_cropped_segments=True` leaves those out) and `class_labels`.
    """

    def __init__(
        self,
        dataset,
        image_processor,
        label_map: dict[int, int],
        seed: int = 0,
        rank: int = 0,
        augment: bool = True,
        shuffle_buffer: int = 256,
        max_bad_fraction: float = 0.01,
        min_seen: int = 100,
        target_size: int | None = None,
        drop_cropped_segments: bool = False,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        category_source: str = "the category table",
    ):
        self.dataset = without_image_decoding(dataset)
        self.image_processor = image_processor
        self.label_map = label_map
        self.category_source = category_source
        self.seed, self.rank, self.augment = seed, rank, augment
        self.shuffle_buffer = shuffle_buffer
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.drop_cropped_segments = drop_cropped_segments
        if not 0 < min_scale <= max_scale:
            raise ValueError(
                f"The jitter's scales must satisfy 0 < min_scale <= max_scale, got {min_scale} and {max_scale}."
            )
        self.min_scale, self.max_scale = min_scale, max_scale
        size = image_processor.size
        self.target_size = target_size or (size["longest_edge"] if isinstance(size, dict) else size.longest_edge)
        self.padded_size = image_processor._padded_size()
        if self.target_size > min(self.padded_size):
            raise ValueError(
                f"target_size {self.target_size} exceeds the image processor's pad_size {self.padded_size}: jittered "
                "samples are padded, never resized, so the canvas must hold them."
            )
        self.position = StreamPosition()
        self.record_ids: list | None = None  # set to [] to record the image id of every sample produced

    def _epoch_rows(self, epoch: int) -> Iterator[dict]:
        dataset = self.dataset
        if self.shuffle_buffer and hasattr(dataset, "shuffle"):
            dataset = dataset.shuffle(seed=self.seed + epoch, buffer_size=self.shuffle_buffer)
        return iter(dataset)

    def _process(self, row: dict, rng: np.random.Generator) -> dict:
        image, ids, segments = decode_panoptic_sample(row)
        unknown = sorted({segment["category_id"] for segment in segments} - set(self.label_map))
        if unknown:
            # not a skippable bad sample: every row with these classes would be dropped, silently shrinking the data
            raise UnknownCategory(
                f"sample {row.get('image_id')}: class / category ids {unknown} are not in {self.category_source} "
                f"(ids {preview_ids(self.label_map)}). Pass a --label_file naming every id the annotations use "
                '(id2label JSON or a list of {"id", "name", "isthing"}).'
            )
        try:
            if self.augment:
                image, ids = large_scale_jitter(
                    image, ids, rng, target_size=self.target_size, min_scale=self.min_scale, max_scale=self.max_scale
                )
                # FC-CLIP's mapper: the jittered sample is only normalized and padded (resizing it again would undo
                # the zoom-out half of the jitter), and every non-crowd segment keeps its target, empty or not
                encoded = self.image_processor(image, do_resize=False, return_tensors="pt")
                if self.drop_cropped_segments:
                    present = set(np.unique(ids).tolist())
                    segments = [s for s in segments if s["id"] in present]
            else:
                encoded = self.image_processor(image, return_tensors="pt")
            height, width = encoded["reshaped_input_sizes"][0]
            reshaped_size = (int(height), int(width))
            mask_labels, class_labels = encode_panoptic_annotation(
                {"panoptic_map": ids, "segments_info": segments},
                reshaped_size,
                self.padded_size,
                self.label_map,
                allow_absent_segments=True,  # checked against the uncropped PNG by decode_panoptic_sample
            )
        except ValueError as error:
            raise BadSample(f"sample {row.get('image_id')}: {error}") from error
        return {
            "pixel_values": encoded["pixel_values"][0],
            "pixel_mask": encoded["pixel_mask"][0],
            "mask_labels": mask_labels,
            "class_labels": class_labels,
        }

    def __iter__(self) -> Iterator[dict]:
        while True:
            rows = itertools.islice(self._epoch_rows(self.position.epoch), self.position.consumed, None)
            produced, resumed_mid_epoch = False, self.position.consumed > 0
            for row in rows:
                index = self.position.consumed
                self.position.consumed += 1
                self.position.seen += 1
                rng = np.random.default_rng([self.seed, self.position.epoch, self.rank, index])
                try:
                    sample = self._process(row, rng)
                except BadSample as error:
                    self.position.bad += 1
                    self.position.bad_ids.append(row.get("image_id"))
                    logger.warning("Skipping bad sample: %s", error)
                    self._check_bad_fraction()
                    continue
                produced = True
                if self.record_ids is not None:
                    self.record_ids.append(row.get("image_id"))
                yield sample
            if not produced and not resumed_mid_epoch:
                # an empty shard, or one whose every sample is bad, would otherwise loop over epochs forever
                raise RuntimeError(
                    f"A whole epoch of this process's shard gave no usable sample ({self.position.consumed} rows, "
                    f"{self.position.bad} bad in total): give every process at least one valid sample."
                )
            self.position.epoch += 1
            self.position.consumed = 0

    def _check_bad_fraction(self) -> None:
        position = self.position
        check_bad_fraction(position.seen, position.bad, position.bad_ids, self.max_bad_fraction, self.min_seen)


def preview_ids(label_map: dict[int, int], limit: int = 12) -> str:
    ids = sorted(label_map)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def collate_panoptic(samples: list[dict]) -> dict:
    """Stack pixels; keep per-image `mask_labels` / `class_labels` as lists (their lengths differ)."""
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "pixel_mask": torch.stack([s["pixel_mask"] for s in samples]),
        "mask_labels": [s["mask_labels"] for s in samples],
        "class_labels": [s["class_labels"] for s in samples],
    }
