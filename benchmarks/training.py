"""Target 6: training throughput of the tiny config (the real `training/train.py` loop, CPU) and the data path alone."""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]


def _loop_seconds(steps: int, folder: str) -> float:
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import train
    finally:
        sys.path.pop(0)
    start = time.perf_counter()
    train.main(
        [
            "--max_steps",
            str(steps),
            "--output_dir",
            folder,
            "--toy_train_size",
            "64",
            "--per_device_train_batch_size",
            "2",
        ]
    )
    return time.perf_counter() - start


def _jpeg_rows(size: int, count: int):
    """Toy panoptic rows at `size` x `size`, images stored as JPEG (like COCO) and labels as PNG."""
    from PIL import Image

    from transformers_possam.data.synthetic import toy_panoptic_rows

    rows = []
    for row in toy_panoptic_rows(count, size=size, seed=1):
        buffer = io.BytesIO()
        row["image"].save(buffer, format="JPEG", quality=90)
        row["image"] = Image.open(io.BytesIO(buffer.getvalue()))
        rows.append(row)
    return rows


def _data_path_images_per_second(size: int, processor_size: int, count: int) -> float:
    from datasets import Dataset

    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.data.stream import PanopticTrainStream
    from transformers_possam.data.synthetic import TOY_CATEGORIES
    from transformers_possam.vocabularies import Vocabulary

    dataset = Dataset.from_list(_jpeg_rows(size, count))
    processor = PosSAMImageProcessor(
        size={"longest_edge": processor_size}, pad_size={"height": processor_size, "width": processor_size}
    )
    stream = PanopticTrainStream(
        dataset, processor, Vocabulary.from_categories(TOY_CATEGORIES).label_map, shuffle_buffer=0
    )
    samples = iter(stream)
    next(samples)  # warm-up
    start = time.perf_counter()
    for _ in range(count - 1):
        next(samples)
    return (count - 1) / (time.perf_counter() - start)


def run(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as short, tempfile.TemporaryDirectory() as long:
        # the difference of two runs removes start-up (model, toy data, vocabulary encoding, saving)
        seconds_short, seconds_long = _loop_seconds(5, short), _loop_seconds(45, long)
    steps_per_second = 40 / (seconds_long - seconds_short)
    coco = _data_path_images_per_second(640, 1024, 24)
    toy = _data_path_images_per_second(128, 128, 64)
    training_images = 2 * steps_per_second
    return [
        {
            "target": 6,
            "figure": "training throughput, tiny config, batch 2 at 128x128 (training/train.py loop, CPU, 2 threads)",
            "steps_per_second": steps_per_second,
            "images_per_second": training_images,
            "data_path_images_per_second_toy_128": toy,
            "goal": "data path faster than training",
            "pass": toy > training_images,
        },
        {
            "target": 6,
            "figure": "data path alone per worker: JPEG + PNG decode, large-scale jitter, processor to 1024x1024 (640x640 COCO-size images)",
            "images_per_second": coco,
            "goal": "reported (one worker per GPU keeps up with the ~1 image/s/GPU training step)",
            "pass": None,
        },
    ]
