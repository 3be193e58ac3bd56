"""Decoding and checking panoptic samples in the `nielsr/coco-panoptic-val2017` schema, and the category table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..image_processing_possam import rgb_to_id

__all__ = ["BadSample", "decode_panoptic_sample", "load_category_table", "save_category_table", "CATEGORY_TABLE_FILE"]

# A local parquet folder carries its categories next to the shards in this file:
# a JSON list of {"id": int, "name": "synonym,synonym,...", "isthing": 0|1}, in class-index order.
CATEGORY_TABLE_FILE = "categories.json"


class BadSample(ValueError):
    """A sample that cannot be trained on (undecodable image or PNG, or segments_info that does not match the PNG)."""


def _open_image(value, what: str, image_id) -> Image.Image:
    try:
        if isinstance(value, Image.Image):
            value.load()
            return value
        if isinstance(value, dict):  # datasets' undecoded Image: {"bytes", "path"}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            image = Image.open(value)
        image.load()
        return image
    except Exception as error:  # PIL raises many types for corrupt data
        raise BadSample(f"sample {image_id}: the {what} does not decode ({error})") from error


def decode_panoptic_sample(row: dict) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """
    Returns (RGB image, `(H, W)` int64 segment ids, segments_info) or raises `BadSample` naming the `image_id`.
    Checks that the PNG has the image's size and that every segment of `segments_info` occurs in the PNG.
    """
    image_id = row.get("image_id")
    image = _open_image(row["image"], "image", image_id).convert("RGB")
    label = _open_image(row["label"], "panoptic PNG", image_id)
    ids = rgb_to_id(np.asarray(label.convert("RGB")))
    if ids.shape != (image.height, image.width):
        raise BadSample(f"sample {image_id}: panoptic PNG {ids.shape[::-1]} and image {image.size} differ in size")
    segments = list(row.get("segments_info") or [])
    present = set(np.unique(ids).tolist())
    missing = [segment["id"] for segment in segments if segment["id"] not in present]
    if missing:
        raise BadSample(f"sample {image_id}: segments_info ids {missing} do not occur in the panoptic PNG")
    return image, ids, segments


def load_category_table(path: str | Path) -> list[dict]:
    """Read a category table (`categories.json`); a folder means the file of that name inside it."""
    path = Path(path)
    if path.is_dir():
        path = path / CATEGORY_TABLE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"No category table at {path}: a local dataset folder needs {CATEGORY_TABLE_FILE} beside its shards "
            '(a JSON list of {"id", "name", "isthing"} in class-index order).'
        )
    categories = json.loads(path.read_text())
    for index, category in enumerate(categories):
        if not {"id", "name", "isthing"} <= set(category):
            raise ValueError(f"Category {index} of {path} needs 'id', 'name' and 'isthing'.")
    return categories


def save_category_table(categories: list[dict], folder: str | Path) -> Path:
    path = Path(folder) / CATEGORY_TABLE_FILE
    path.write_text(json.dumps([{k: c[k] for k in ("id", "name", "isthing")} for c in categories], indent=1))
    return path
