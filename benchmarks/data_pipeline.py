"""
Target 8: the training input pipeline (issue 14).

- the data path (JPEG + PNG decode, large-scale jitter, labels, collation) at COCO-like size, 640x480 images to a
  1024x1024 canvas, batch 2, read in the training process and by 1, 2 and `os.cpu_count()` DataLoader workers
  (`PanopticTrainStream.batches`, train.py's `--dataloader_num_workers`);
- resuming at row 45,000 of a 50,000-row synthetic parquet (tiny images): the stream's state (seek to the window)
  against the former resume, which re-read every consumed row through the 🤗 datasets shuffle buffer.
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import resource
import tempfile
import time
from pathlib import Path


RESUME_ROWS, RESUME_AT = 50_000, 45_000


def _cropped_rows(count: int, width: int = 640, height: int = 480) -> list[dict]:
    """Toy panoptic rows cropped to `width` x `height` (segments the crop removed are dropped), JPEG images, PNG labels."""
    import numpy as np
    from PIL import Image
    from transformers.image_transforms import rgb_to_id

    from transformers_possam.data.synthetic import toy_panoptic_rows

    rows = []
    for row in toy_panoptic_rows(count, size=max(width, height), seed=2):
        image, label = row["image"].crop((0, 0, width, height)), row["label"].crop((0, 0, width, height))
        ids = rgb_to_id(np.asarray(label))
        present = set(np.unique(ids).tolist())
        segments = [dict(s, area=int((ids == s["id"]).sum())) for s in row["segments_info"] if s["id"] in present]
        jpeg, png = io.BytesIO(), io.BytesIO()
        image.save(jpeg, format="JPEG", quality=90)
        label.save(png, format="PNG")
        rows.append(
            dict(
                row,
                image=Image.open(io.BytesIO(jpeg.getvalue())),
                label=Image.open(io.BytesIO(png.getvalue())),
                segments_info=segments,
            )
        )
    return rows


def _stream(dataset, size: int, **kwargs):
    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.data.stream import PanopticTrainStream
    from transformers_possam.data.synthetic import TOY_CATEGORIES
    from transformers_possam.vocabularies import Vocabulary

    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    return PanopticTrainStream(dataset, processor, Vocabulary.from_categories(TOY_CATEGORIES).label_map, **kwargs)


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the children that ended (the workers, once shut down)
    return usage.ru_utime + usage.ru_stime


def data_path(num_workers: int, batches: int = 40, batch_size: int = 2) -> dict:
    """
    Steady-state samples/s of `stream.batches` (the first batch, with the workers' start, is not timed); the training
    process's CPU seconds per sample (the whole data path when `num_workers` is 0) and the workers' (their whole
    life, start and prefetched batches included, over the timed samples). Torch runs 1 thread in the training process
    here, as in each DataLoader worker.
    """
    import torch
    from datasets import Dataset

    dataset = Dataset.from_list(_cropped_rows(32)).to_iterable_dataset(num_shards=8)
    stream = _stream(dataset, 1024, shuffle_buffer=16, max_bad_fraction=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        children_start = _children_cpu_seconds()
        iterator = stream.batches(batch_size, num_workers)
        next(iterator)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(iterator)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        del iterator
        gc.collect()  # shuts the workers down, so that their CPU time is counted
        time.sleep(1)
    finally:
        torch.set_num_threads(threads)
    samples = batches * batch_size
    return {
        "images_per_second": samples / seconds,
        "training_process_cpu_seconds_per_image": cpu_seconds / samples,
        "workers_cpu_seconds_per_image": (_children_cpu_seconds() - children_start) / samples,
    }


def _synthetic_parquet(folder: Path, rows: int, num_shards: int = 4) -> None:
    """`rows` tiny (32x32) panoptic rows in `num_shards` parquet files: 64 distinct images repeated, unique ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    from transformers_possam.data.synthetic import toy_panoptic_rows

    table = Dataset.from_list(list(toy_panoptic_rows(64, size=32))).data.table
    per_shard = rows // num_shards
    for shard in range(num_shards):
        part = pa.concat_tables([table] * (per_shard // len(table) + 1)).slice(0, per_shard)
        ids = pa.array([f"synthetic_{shard * per_shard + i:06d}" for i in range(per_shard)])
        part = part.set_column(part.schema.get_field_index("image_id"), "image_id", ids)
        part = part.replace_schema_metadata(table.schema.metadata)  # keeps the 🤗 features (Image columns)
        pq.write_table(part, folder / f"train-{shard:05d}-of-{num_shards:05d}.parquet", row_group_size=1000)


def resume_seconds(folder: Path) -> dict:
    """Seconds to the first sample after row RESUME_AT: from the stream's state, and by re-reading (as before)."""
    from transformers_possam.data.stream import load_panoptic_dataset

    dataset, _ = load_panoptic_dataset(str(folder))
    # the position after RESUME_AT rows, reached by the real reader with the per-sample processing left out
    walker = _stream(dataset, 64, augment=False)
    walker._process = lambda row, rng: {}
    rows = iter(walker)
    for _ in range(RESUME_AT):
        next(rows)
    state = walker.state_dict()

    start = time.perf_counter()
    resumed = _stream(dataset, 64, augment=False)
    resumed.load_state_dict(state)
    next(iter(resumed))
    from_state = time.perf_counter() - start

    # the former resume: the epoch's rows through the 🤗 datasets shuffle buffer, the consumed ones skipped by reading
    start = time.perf_counter()
    shuffled = dataset.shuffle(seed=0, buffer_size=256)
    row = next(itertools.islice(iter(shuffled), RESUME_AT, None))
    _stream(dataset, 64, augment=False)._process(row, None)
    rereading = time.perf_counter() - start
    return {"from_state_s": from_state, "rereading_s": rereading}


def run() -> list[dict]:
    cores = os.cpu_count() or 1
    rows = []
    for num_workers in sorted({0, 1, 2, cores}):
        load_before = os.getloadavg()[0]
        measured = data_path(num_workers)
        rows.append(
            {
                "target": 8,
                "figure": (
                    f"data path, {'in the training process' if num_workers == 0 else f'{num_workers} DataLoader worker(s)'}: "
                    f"640x480 JPEG + PNG decode, large-scale jitter, labels, collation, 1024x1024 canvas, batch 2 "
                    f"({cores} CPU cores, 1 torch thread per process)"
                ),
                "num_workers": num_workers,
                "cpu_count": cores,
                **measured,
                # the machine is shared: its load (1-minute average) says how much of the cores the figure had
                "load_average": [load_before, os.getloadavg()[0]],
                "goal": "reported (more workers, more images/s, up to the cores)",
                "pass": None,
            }
        )
    with tempfile.TemporaryDirectory() as folder:
        _synthetic_parquet(Path(folder), RESUME_ROWS)
        seconds = resume_seconds(Path(folder))
    rows.append(
        {
            "target": 8,
            "figure": f"resume at row {RESUME_AT:,} of a {RESUME_ROWS:,}-row parquet (4 shards, 32x32 images): "
            "the stream's state vs re-reading the consumed rows",
            **seconds,
            "ratio": seconds["rereading_s"] / seconds["from_state_s"],
            "goal": "resume from the stream's state faster than re-reading",
            "pass": seconds["from_state_s"] < seconds["rereading_s"],
        }
    )
    return rows


if __name__ == "__main__":
    import argparse

    # no options: `--help` says what it measures instead of starting it
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    for row in run():
        print(row)
