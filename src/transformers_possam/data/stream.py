"""Panoptic training streams: 🤗 datasets (streaming) -> checked, augmented, processed samples, with bad-sample counting.

Determinism: sample k of epoch e is augmented with a generator seeded by (seed, epoch, rank, k), so a run resumed at a
known position (epoch, samples consumed) sees exactly the samples an uninterrupted run would.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

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


class UnknownCategory(ValueError):
    """A sample's class / category id that the run's category table does not name: the table is wrong, not the row."""


# rows per window when the stream does not shuffle (`shuffle_buffer=0`): only how often the reading state is recorded
UNSHUFFLED_WINDOW = 64
STATE_FORMAT = 2  # 1: (epoch, rows consumed), resumed by re-reading them (before issue 14)


@dataclass
class ReaderPosition:
    """
    Where one reader (the in-process one, or one DataLoader worker) is in its part of the process's shard, and its
    bad-row counts. A reader's epoch is a list of units (a shard, or every `stride`-th row of one) read in windows of
    `shuffle_buffer` rows: `source_state` (the unit dataset's own `state_dict()` before the window) lets a resumed
    reader seek to the window without reading the rows before it; `offset` rows of the window were taken.
    """

    epoch: int = 0
    unit: int = 0  # index into the reader's units of this epoch
    window: int = 0  # index of the window inside the unit
    window_row: int = 0  # rows of the unit's shard read before the window (kept by the stride or not)
    source_state: dict | None = None  # the unit dataset's `state_dict()` before the window's first row
    offset: int = 0  # rows of the window taken, bad ones included
    produced: bool = False  # whether this epoch gave a usable sample yet
    seen: int = 0  # rows seen in total
    bad: int = 0  # rows skipped as bad in total
    bad_ids: list = field(default_factory=list)  # the last few bad image ids

    def state_dict(self) -> dict:
        state = asdict(self)
        state["source_state"] = copy.deepcopy(self.source_state)
        state["bad_ids"] = list(self.bad_ids[-20:])
        return state

    @classmethod
    def from_state(cls, state: dict) -> ReaderPosition:
        return cls(**copy.deepcopy(state))


@dataclass
class StreamPosition:
    """
    Where a process is in its shard of the stream; saved with checkpoints. `readers[k]` is reader k's resume point:
    right after the last batch it gave, with `skip_bad_reports[k]` bad-row reports it gave after that batch (replayed
    silently on resume); `next_reader` gives the next batch (DataLoader workers take turns in order). `seen`, `bad`
    and `bad_ids` count every reader's rows up to its latest report.
    """

    readers: list[ReaderPosition] = field(default_factory=list)
    skip_bad_reports: list[int] = field(default_factory=list)
    next_reader: int = 0
    counts: list[dict] = field(default_factory=list)  # each reader's latest {seen, bad, bad_ids}

    @property
    def seen(self) -> int:
        return sum(count["seen"] for count in self.counts)

    @property
    def bad(self) -> int:
        return sum(count["bad"] for count in self.counts)

    @property
    def bad_ids(self) -> list:
        return [image_id for count in self.counts for image_id in count["bad_ids"]]

    @property
    def epoch(self) -> int:
        """The epoch the slowest reader is in."""
        return min((reader.epoch for reader in self.readers), default=0)

    def reset(self, num_readers: int) -> None:
        self.readers = [ReaderPosition() for _ in range(num_readers)]
        self.skip_bad_reports = [0] * num_readers
        self.next_reader = 0
        self.counts = [reader_counts(reader) for reader in self.readers]

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "readers": [reader.state_dict() for reader in self.readers],
            "skip_bad_reports": list(self.skip_bad_reports),
            "next_reader": self.next_reader,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                "This stream position was saved by an older version of the training stream (it re-read the consumed "
                "rows, in another order); it cannot be resumed exactly here. Resume with the version that wrote it, "
                "or start a new run."
            )
        self.readers = [ReaderPosition.from_state(reader) for reader in state["readers"]]
        self.skip_bad_reports = [int(skip) for skip in state["skip_bad_reports"]]
        self.next_reader = int(state["next_reader"])
        self.counts = [reader_counts(reader) for reader in self.readers]


def reader_counts(reader: ReaderPosition) -> dict:
    return {"seen": reader.seen, "bad": reader.bad, "bad_ids": list(reader.bad_ids[-5:])}


def _identity(item):
    return item


class _WorkerBatches(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its reader's batches (and bad-row reports), from its saved position."""

    def __init__(self, stream: PanopticTrainStream, batch_size: int, position: StreamPosition):
        self.stream, self.batch_size = stream, batch_size
        self.readers = [reader.state_dict() for reader in position.readers]
        self.skip_bad_reports = list(position.skip_bad_reports)
        self.first = position.next_reader

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is None or info.num_workers != len(self.readers):
            raise RuntimeError("_WorkerBatches runs in a DataLoader with one worker per reader.")
        import fsspec.asyn  # type: ignore[import-untyped]

        # as 🤗 datasets does in its own DataLoader workers: fsspec's event loop (Hub / remote files) does not survive
        # the fork and would hang the worker
        fsspec.asyn.reset_lock()
        # workers give items in turns 0, 1, ...: worker w is reader first + w, so the first item is the next reader's
        reader = (self.first + info.id) % len(self.readers)
        yield from self.stream._reader_batches(
            reader,
            len(self.readers),
            ReaderPosition.from_state(self.readers[reader]),
            self.batch_size,
            self.skip_bad_reports[reader],
        )


class PanopticTrainStream:
    """
    An endless iterator of processed training samples from one process's shard of a dataset (`iter(stream)`), or of
    collated batches read by DataLoader workers (`stream.batches(batch_size, num_workers)`).

    Each sample: decode and check (bad ones are skipped with a warning naming the image id and counted; more than
    `max_bad_fraction` bad among the rows seen, once `min_seen` rows were seen, stops with `TooManyBadSamples`),
    large-scale jitter (FC-CLIP's), then normalization and padding only (`augment=False`: the image processor's
    resize, as at inference); uint8 `mask_labels` for every non-crowd segment of `segments_info` (empty where the
    crop removed it, as FC-CLIP; `drop_cropped_segments=True` leaves those out) and `class_labels`.

    Reading: process `rank` of `world_size` takes the shards `rank, rank + world_size, ...` of `dataset` (every
    `world_size`-th row of every shard when the shard count does not divide, with a warning). Each epoch the process's
    shards are permuted (seeded by seed, epoch, rank) and dealt to the readers in turn (every reader takes every
    k-th row of every shard when there are fewer shards than readers); each shard is read in windows of
    `shuffle_buffer` rows, each window permuted (seeded by seed, epoch, rank, shard, window). `shuffle_buffer=0`:
    shards and rows in order. The sample of row i of shard s in epoch e is augmented with a generator seeded by (seed,
    e, rank, s, i), so a sample does not depend on the number of readers. A position is (epoch, unit, window, offset)
    plus the shard dataset's own `state_dict()` at the window's start: resuming reads one window, never the rows
    before it.
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
        world_size: int = 1,
    ):
        from datasets import IterableDataset

        if not isinstance(dataset, IterableDataset):  # a map-style Dataset, read in order as one shard
            dataset = dataset.to_iterable_dataset(num_shards=1)
        self.dataset = without_image_decoding(dataset)
        self.num_shards = self.dataset.num_shards
        self.image_processor = image_processor
        self.label_map = label_map
        self.category_source = category_source
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not a process of world_size {world_size}.")
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
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
        if world_size > 1 and self.num_shards % world_size != 0:
            logger.warning(
                "The dataset has %d shards, which does not divide over %d processes: every process will read every "
                "row (and keep 1 in %d). Re-shard it (training/prepare_panoptic_parquet.py --num_shards, default 64) "
                "to a multiple of the process count.",
                self.num_shards,
                world_size,
                world_size,
            )
        self.position = StreamPosition()
        self.record_ids: list | None = None  # set to [] to record the image id of every sample produced

    # --- reading ---------------------------------------------------------------------------------------------------

    def process_units(self) -> list[tuple[int, int, int]]:
        """This process's units (shard, stride, phase): the rows i of shard `shard` with i % stride == phase."""
        if self.world_size > 1 and self.num_shards % self.world_size == 0:
            return [(shard, 1, 0) for shard in range(self.rank, self.num_shards, self.world_size)]
        return [(shard, self.world_size, self.rank) for shard in range(self.num_shards)]

    def reader_units(self, epoch: int, reader: int, num_readers: int) -> list[tuple[int, int, int]]:
        """Reader `reader`'s units in `epoch`: over the readers, disjoint and together exactly `process_units()`."""
        units = self.process_units()
        if self.shuffle_buffer:
            order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(units))
            units = [units[i] for i in order]
        if len(units) >= num_readers:
            return units[reader::num_readers]
        # fewer shards than readers: each reader takes every num_readers-th row of every unit
        return [(shard, stride * num_readers, phase + stride * reader) for shard, stride, phase in units]

    def _read(self, position: ReaderPosition, reader: int, num_readers: int) -> Iterator[tuple[dict | None, object]]:
        """
        Reader `reader`'s rows from `position` on, endlessly: (sample, image id) per usable row, (None, image id) per
        bad row (counted in `position`, which follows every row).
        """
        window_size = self.shuffle_buffer or UNSHUFFLED_WINDOW
        while True:
            units = self.reader_units(position.epoch, reader, num_readers)
            while position.unit < len(units):
                shard, stride, phase = units[position.unit]
                source = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
                if position.source_state is not None:
                    source.load_state_dict(position.source_state)
                # `iter(batch_size=1)`, not `iter(source)`: in a DataLoader worker the latter would split the one shard
                # over the workers again
                rows = source.iter(batch_size=1)
                row_index = position.window_row
                while True:
                    window = []
                    for batch in rows:
                        index, row_index = row_index, row_index + 1
                        if index % stride == phase:
                            window.append((index, {column: values[0] for column, values in batch.items()}))
                            if len(window) == window_size:
                                break
                    if not window:
                        break
                    order = (
                        np.random.default_rng(
                            [self.seed, position.epoch, self.rank, shard, position.window]
                        ).permutation(len(window))
                        if self.shuffle_buffer
                        else range(len(window))
                    )
                    for taken in range(position.offset, len(window)):
                        index, row = window[order[taken]]
                        position.offset = taken + 1
                        position.seen += 1
                        rng = np.random.default_rng([self.seed, position.epoch, self.rank, shard, index])
                        try:
                            sample = self._process(row, rng)
                        except BadSample as error:
                            position.bad += 1
                            position.bad_ids = [*position.bad_ids[-19:], row.get("image_id")]
                            logger.warning("Skipping bad sample: %s", error)
                            yield None, row.get("image_id")
                            continue
                        position.produced = True
                        yield sample, row.get("image_id")
                    position.window, position.offset = position.window + 1, 0
                    position.window_row, position.source_state = row_index, source.state_dict()
                position.unit, position.window, position.window_row, position.source_state = (
                    position.unit + 1,
                    0,
                    0,
                    None,
                )
            if not position.produced:
                # an empty shard, or one whose every sample is bad, would otherwise loop over epochs forever
                raise RuntimeError(
                    f"A whole epoch of reader {reader} of {num_readers} (process {self.rank}) gave no usable sample "
                    f"({position.bad} bad rows in total): give every process (and every --dataloader_num_workers "
                    "worker: one shard each at least) valid samples."
                )
            position.epoch, position.unit, position.produced = position.epoch + 1, 0, False

    def _reader_batches(
        self, reader: int, num_readers: int, position: ReaderPosition, batch_size: int, skip_bad_reports: int
    ) -> Iterator[dict]:
        """
        Reader `reader`'s collated batches of `batch_size` samples, and a report per bad row (`batch` None) so that
        the training process counts bad rows even of a reader that gives no batch. Each item carries its resume point:
        the position after the reader's last batch and how many reports came after it (`skip_bad_reports` of them
        are given again, silently, when resuming from such a point).
        """
        start, reports, samples, ids = position.state_dict(), 0, [], []
        for sample, image_id in self._read(position, reader, num_readers):
            if sample is None:
                if skip_bad_reports:
                    skip_bad_reports -= 1
                    continue
                reports += 1
                yield {
                    "reader": reader,
                    "batch": None,
                    "ids": [],
                    "resume": {"position": start, "skip_bad_reports": reports},
                    "counts": reader_counts(position),
                }
                continue
            samples.append(sample)
            ids.append(image_id)
            if len(samples) == batch_size:
                start, reports = position.state_dict(), 0
                yield {
                    "reader": reader,
                    "batch": collate_panoptic(samples),
                    "ids": ids,
                    "resume": {"position": start, "skip_bad_reports": 0},
                    "counts": reader_counts(position),
                }
                samples, ids = [], []

    def _prepare_readers(self, num_readers: int) -> None:
        if not self.position.readers:
            self.position.reset(num_readers)
        elif len(self.position.readers) != num_readers:
            raise ValueError(
                f"The stream position was saved with {len(self.position.readers)} reader(s) "
                f"(--dataloader_num_workers {len(self.position.readers)}, or 0 for 1) and is resumed with "
                f"{num_readers}: the sample order depends on it. Resume with the same --dataloader_num_workers."
            )

    def __iter__(self) -> Iterator[dict]:
        """Samples, read in this process (one reader)."""
        self._prepare_readers(1)
        position = self.position.readers[0]
        skip = self.position.skip_bad_reports[0]
        for sample, image_id in self._read(position, 0, 1):
            self.position.counts[0] = reader_counts(position)
            if sample is None:
                if skip:
                    skip -= 1
                    continue
                self._check_bad_fraction()
                continue
            if self.record_ids is not None:
                self.record_ids.append(image_id)
            yield sample

    def batches(
        self, batch_size: int, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False
    ) -> Iterator[dict]:
        """
        Endless collated batches (`collate_panoptic`) of `batch_size` samples. `num_workers` 0: read in this process;
        else by as many DataLoader workers (one reader each; they take turns, in order, so the batch order is fixed by
        the seed and the position). `self.position` follows the batches taken, ready for `state_dict()`.
        `pin_memory` (with workers): the DataLoader's pin thread copies each batch into page-locked memory, off the
        training thread, so that its host-to-CUDA copies are fast and can be asynchronous (`train.py` sets it when
        training on CUDA); with `num_workers` 0 nothing could pin off the training thread, and batches stay pageable.
        """
        num_readers = max(1, num_workers)
        self._prepare_readers(num_readers)
        position = self.position
        if num_workers == 0:
            reader = position.next_reader  # 0
            items: Iterator[dict] = self._reader_batches(
                reader,
                1,
                ReaderPosition.from_state(position.readers[reader].state_dict()),
                batch_size,
                position.skip_bad_reports[reader],
            )
        else:
            loader = torch.utils.data.DataLoader(
                _WorkerBatches(self, batch_size, position),
                batch_size=None,
                num_workers=num_workers,
                collate_fn=_identity,
                prefetch_factor=prefetch_factor,
                pin_memory=pin_memory,
                # the workers' base seed from a generator of their own: drawn from the global one, as by default, it
                # would shift the training process's random stream (the loss's point sampling) whenever a loader
                # starts, so a resumed run would sample other points than an uninterrupted one
                generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank),
            )
            items = iter(loader)
        for item in items:
            reader = item["reader"]
            position.counts[reader] = item["counts"]
            position.next_reader = (reader + 1) % num_readers
            position.readers[reader] = ReaderPosition.from_state(item["resume"]["position"])
            position.skip_bad_reports[reader] = item["resume"]["skip_bad_reports"]
            if item["batch"] is None:
                self._check_bad_fraction()
                continue
            if self.record_ids is not None:
                self.record_ids.extend(item["ids"])
            yield item["batch"]

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)

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

    def _check_bad_fraction(self) -> None:
        position = self.position
        check_bad_fraction(position.seen, position.bad, position.bad_ids, self.max_bad_fraction, self.min_seen)


def preview_ids(label_map: dict[int, int], limit: int = 12) -> str:
    ids = sorted(label_map)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def collate_panoptic(samples: list[dict]) -> dict:
    """
    Stack pixels; keep per-image `mask_labels` / `class_labels` as lists (their lengths differ). The stacking is
    torch's `default_collate`: in a DataLoader worker it stacks straight into shared memory, sparing the copy that
    sending the batch would make (about 40 MB per batch of 2 at 1024x1024).
    """
    return {
        "pixel_values": default_collate([s["pixel_values"] for s in samples]),
        "pixel_mask": default_collate([s["pixel_mask"] for s in samples]),
        "mask_labels": [s["mask_labels"] for s in samples],
        "class_labels": [s["class_labels"] for s in samples],
    }
