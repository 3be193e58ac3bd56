"""
Decoding and checking training samples, and the category table. Two row schemas are read:

- COCO panoptic, as `nielsr/coco-panoptic-val2017`: `image`, `label` (the RGB panoptic PNG, id = R + 256 G + 256^2 B)
  and `segments_info` (`[{"id", "category_id", "iscrowd", ...}]`);
- instance segmentation, as transformers' `examples/pytorch/instance-segmentation` datasets (e.g. `qubvel-hf/ade20k-mini`):
  `image` and `annotation`, a PNG whose first channel is the semantic class id and whose second is the instance id
  (any further channel is ignored, as the example does). Each distinct (class, instance) pair is one segment.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.image_transforms import rgb_to_id


__all__ = [
    "BadSample",
    "CATEGORY_TABLE_FILE",
    "OneChannelAnnotation",
    "REDUCE_LABELS_COLUMN",
    "TooManyBadSamples",
    "categories_from_id2label",
    "check_bad_fraction",
    "coco_panoptic_categories",
    "decode_instance_annotation",
    "decode_panoptic_sample",
    "decode_semantic_label",
    "load_category_table",
    "load_label_file",
    "save_category_table",
    "without_image_decoding",
]

# A local parquet folder carries its categories next to the shards in this file:
# a JSON list of {"id": int, "name": "synonym,synonym,...", "isthing": 0|1}, in class-index order.
CATEGORY_TABLE_FILE = "categories.json"
# A column `load_panoptic_dataset` adds to instance-segmentation rows under --do_reduce_labels (read by the decoder).
REDUCE_LABELS_COLUMN = "do_reduce_labels"


class BadSample(ValueError):
    """A sample that cannot be trained on (undecodable image or PNG, or segments_info that does not match the PNG)."""


class OneChannelAnnotation(BadSample):
    """An instance-segmentation `annotation` PNG with one channel: a semantic map alone, without instance ids."""


class TooManyBadSamples(RuntimeError):
    """More bad samples than a run tolerates (`max_bad_fraction`)."""


def check_bad_fraction(seen: int, bad: int, bad_ids: list, max_bad_fraction: float, min_seen: int) -> None:
    """
    The one rule for bad data, in training and evaluation alike: bad samples are skipped and counted; once `min_seen`
    samples were seen, more than `max_bad_fraction` of them bad stops with `TooManyBadSamples` naming the last ones.
    """
    if seen >= min_seen and bad > max_bad_fraction * seen:
        raise TooManyBadSamples(
            f"{bad} of {seen} samples were bad ({100 * bad / seen:.1f}% > {100 * max_bad_fraction:.1f}%), last: "
            f"{bad_ids[-5:]}. Fix the data or raise --max_bad_fraction."
        )


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


def decode_instance_annotation(row: dict) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """
    A row of the instance-segmentation schema (`image`, `annotation`) as `decode_panoptic_sample` returns it: the RGB
    image, `(H, W)` int64 segment ids (1.. for the distinct (semantic id, instance id) pairs of the annotation's first
    two channels, in sorted order) and `segments_info` whose `category_id` is the semantic id (what the label file /
    `id2label` names). Raises `BadSample` for an undecodable file, a size mismatch or an annotation with fewer than two
    channels (a semantic map alone says nothing about instances).
    """
    image_id = row.get("image_id")
    for column in ("image", "annotation"):
        if row.get(column) is None:
            raise BadSample(f"sample {image_id}: no {column!r} column value")
    image = _open_image(row["image"], "image", image_id).convert("RGB")
    annotation = _open_image(row["annotation"], "annotation PNG", image_id)
    array = np.asarray(annotation)
    if array.ndim != 3 or array.shape[2] < 2:
        raise OneChannelAnnotation(
            f"sample {image_id}: the annotation PNG has one channel (PIL mode {annotation.mode!r}, shape {array.shape}), "
            "but the instance-segmentation format needs two: channel 0 = semantic class id, channel 1 = instance id "
            "(as in transformers' examples/pytorch/instance-segmentation). Save it as an RGB PNG with those channels "
            "(the third is ignored), or convert the data to the COCO panoptic schema (image, label, segments_info)."
        )
    if array.shape[:2] != (image.height, image.width):
        raise BadSample(
            f"sample {image_id}: annotation PNG {array.shape[1::-1]} and image {image.size} differ in size"
        )
    semantic_and_instance = array[..., :2].astype(np.int64)
    pairs, inverse = np.unique(semantic_and_instance.reshape(-1, 2), axis=0, return_inverse=True)
    ids = (inverse.reshape(array.shape[:2]) + 1).astype(np.int64)
    segments = [
        {"id": index + 1, "category_id": int(semantic), "iscrowd": 0} for index, (semantic, _) in enumerate(pairs)
    ]
    if row.get(REDUCE_LABELS_COLUMN):
        # the example's --do_reduce_labels: class 0 (background / void) is left unlabeled, the others shift down by 1
        background = [segment["id"] for segment in segments if segment["category_id"] == 0]
        ids[np.isin(ids, background)] = 0
        segments = [
            dict(segment, category_id=segment["category_id"] - 1) for segment in segments if segment["category_id"]
        ]
    return image, ids, segments


def decode_panoptic_sample(row: dict) -> tuple[Image.Image, np.ndarray, list[dict]]:
    """
    Returns (RGB image, `(H, W)` int64 segment ids, segments_info) or raises `BadSample` naming the `image_id`.
    Checks that the PNG has the image's size and that every segment of `segments_info` (each with an `id` and a
    `category_id`) occurs in the PNG. A row of the instance-segmentation schema (an `annotation` column and no
    `label`) is read by `decode_instance_annotation`.
    """
    image_id = row.get("image_id")
    if "label" not in row and "annotation" in row:
        return decode_instance_annotation(row)
    for column in ("image", "label"):
        if row.get(column) is None:
            raise BadSample(f"sample {image_id}: no {column!r} column value")
    image = _open_image(row["image"], "image", image_id).convert("RGB")
    label = _open_image(row["label"], "panoptic PNG", image_id)
    ids = rgb_to_id(np.asarray(label.convert("RGB"))).astype(np.int64)  # transformers gives int32 for uint8 colours
    if ids.shape != (image.height, image.width):
        raise BadSample(f"sample {image_id}: panoptic PNG {ids.shape[::-1]} and image {image.size} differ in size")
    segments = list(row.get("segments_info") or [])
    incomplete = [
        index
        for index, segment in enumerate(segments)
        if not isinstance(segment, dict) or not {"id", "category_id"} <= set(segment)
    ]
    if incomplete:
        raise BadSample(f"sample {image_id}: segments_info entries {incomplete} lack 'id' or 'category_id'")
    listed = [segment["id"] for segment in segments]
    repeated = sorted({segment_id for segment_id in listed if listed.count(segment_id) > 1})
    if repeated:
        raise BadSample(f"sample {image_id}: segments_info lists segment ids {repeated} more than once")
    present = set(np.unique(ids).tolist())
    missing = [segment["id"] for segment in segments if segment["id"] not in present]
    if missing:
        raise BadSample(f"sample {image_id}: segments_info ids {missing} do not occur in the panoptic PNG")
    return image, ids, segments


def decode_semantic_label(row: dict, size: tuple[int, int]) -> np.ndarray | None:
    """
    The row's own semantic ground truth (`semantic_label` column: a single-channel PNG of dataset category ids, 255 =
    ignore, e.g. ADE20K's `annotations_detectron2`), as an `(H, W)` int64 array of the image's `size`; None when the
    row has none. Raises `BadSample` when it does not decode or has another size.
    """
    value = row.get("semantic_label")
    if value is None:
        return None
    image_id = row.get("image_id")
    label = _open_image(value, "semantic label PNG", image_id)
    array = np.asarray(label)
    if array.ndim != 2:
        raise BadSample(f"sample {image_id}: the semantic label PNG must have one channel, got shape {array.shape}")
    if array.shape != tuple(size):
        raise BadSample(
            f"sample {image_id}: semantic label PNG {array.shape[::-1]} and image {tuple(size)[::-1]} differ in size"
        )
    return array.astype(np.int64)


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
    form = '(a JSON list of {"id": int, "name": "synonym,synonym", "isthing": 0 or 1} in class-index order)'
    try:
        categories = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); it must be {form}.") from None
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{path} must be a non-empty JSON list {form}, got {type(categories).__name__}.")
    seen_ids = set()
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not {"id", "name", "isthing"} <= set(category):
            raise ValueError(f"Category {index} of {path} needs 'id', 'name' and 'isthing' {form}, got {category!r}.")
        identifier, name, isthing = category["id"], category["name"], category["isthing"]
        if isinstance(identifier, bool) or not isinstance(identifier, int):
            raise ValueError(f"Category {index} of {path}: 'id' must be an integer, got {identifier!r}.")
        if identifier in seen_ids:
            raise ValueError(f"Category {index} of {path}: id {identifier} appears twice.")
        seen_ids.add(identifier)
        if not isinstance(name, str) or not name.strip(" ,"):
            raise ValueError(
                f"Category {index} of {path}: 'name' must be a non-empty string of synonyms, got {name!r}."
            )
        if isthing not in (0, 1) or isinstance(isthing, float):  # True / False / 0 / 1, not "false" or 0.5
            raise ValueError(
                f"Category {index} of {path}: 'isthing' must be 0 or 1 (or a JSON boolean), got {isthing!r}."
            )
    return categories


def coco_panoptic_categories() -> list[dict]:
    """The 133 COCO panoptic categories (COCO's ids 1..200, names with synonyms, isthing) of the shipped vocabulary."""
    from ..vocabularies import load_vocabulary

    return load_vocabulary("coco_panoptic_133").to_categories()


def categories_from_id2label(id2label: dict, source: str) -> list[dict]:
    """
    A category table from an `id2label` mapping (`{id: name}`, ids as ints or digit strings as in a model config's
    JSON) or a `label2id` mapping (`{name: id}`, as the instance-segmentation example's `semantic_class_to_id`), in id
    order. Every class counts as a thing (the mapping has no thing/stuff flag; give a category list for that). `source`
    names the mapping in errors.
    """
    if not isinstance(id2label, dict) or not id2label:
        raise ValueError(f"{source} must be a non-empty mapping {{id: name}} or {{name: id}}, got {id2label!r}.")
    keys_are_ids = all(
        isinstance(k, int) or (isinstance(k, str) and k.strip().lstrip("-").isdigit()) for k in id2label
    )
    values_are_ids = all(isinstance(v, int) and not isinstance(v, bool) for v in id2label.values())
    if keys_are_ids and all(isinstance(v, str) for v in id2label.values()):
        pairs = [(int(k), v) for k, v in id2label.items()]
    elif values_are_ids and all(isinstance(k, str) for k in id2label):
        pairs = [(v, k) for k, v in id2label.items()]
    else:
        raise ValueError(
            f'{source} is neither id2label ({{"0": "cat", ...}}) nor label2id ({{"cat": 0, ...}}): {id2label!r}.'
        )
    ids = [identifier for identifier, _ in pairs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source} gives an id twice: {sorted(ids)}.")
    return [{"id": identifier, "name": name, "isthing": 1} for identifier, name in sorted(pairs)]


def load_label_file(path: str | Path) -> list[dict]:
    """
    The category table of a JSON label file: an `id2label` mapping (`{"0": "background", "1": "person"}`, as the
    `id2label.json` files of Hub datasets), a `label2id` mapping, or a list of `{"id", "name", "isthing"}` (this
    package's `categories.json`, the only form that carries thing/stuff flags).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--label_file {path}: no such file.")
    form = (
        'an id2label JSON object ({"0": "background", "1": "person"}), a label2id object ({"person": 1}) or a JSON '
        'list of {"id", "name", "isthing"}'
    )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"Label file {path} is not valid JSON ({error}); it must be {form}.") from None
    if isinstance(content, list):
        return load_category_table(path)
    if isinstance(content, dict):
        return categories_from_id2label(content, f"Label file {path}")
    raise ValueError(f"Label file {path} holds a JSON {type(content).__name__}; it must be {form}.")


def save_category_table(categories: list[dict], folder: str | Path) -> Path:
    path = Path(folder) / CATEGORY_TABLE_FILE
    path.write_text(json.dumps([{k: c[k] for k in ("id", "name", "isthing")} for c in categories], indent=1))
    return path


def without_image_decoding(dataset):
    """
    Let the caller decode `image` / `label` / `annotation` / `semantic_label` itself (`decode_panoptic_sample`): 🤗 datasets would
    decode them while iterating, and a corrupt file would then raise inside the dataset iterator, where the sample
    cannot be skipped (in training or in evaluation).
    """
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None)
    for column in ("image", "label", "annotation", "semantic_label"):
        if features is not None and isinstance(features.get(column), ImageFeature) and features[column].decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset
