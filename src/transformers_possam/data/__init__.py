"""Training data: the embedded toy panoptic set, sample decoding (COCO panoptic and instance-segmentation rows) and
checks, category tables, large-scale jitter."""

from .augmentation import large_scale_jitter
from .panoptic import (
    CATEGORY_TABLE_FILE,
    BadSample,
    OneChannelAnnotation,
    TooManyBadSamples,
    categories_from_id2label,
    check_bad_fraction,
    coco_panoptic_categories,
    decode_instance_annotation,
    decode_panoptic_sample,
    decode_semantic_label,
    load_category_table,
    load_label_file,
    save_category_table,
    without_image_decoding,
)
from .synthetic import TOY_CATEGORIES, toy_panoptic_rows


__all__ = [
    "BadSample",
    "CATEGORY_TABLE_FILE",
    "OneChannelAnnotation",
    "TOY_CATEGORIES",
    "TooManyBadSamples",
    "categories_from_id2label",
    "check_bad_fraction",
    "coco_panoptic_categories",
    "decode_instance_annotation",
    "decode_panoptic_sample",
    "decode_semantic_label",
    "large_scale_jitter",
    "load_category_table",
    "load_label_file",
    "save_category_table",
    "toy_panoptic_rows",
    "without_image_decoding",
]
