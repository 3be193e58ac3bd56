"""Training data: the embedded toy panoptic set, sample decoding and checks, large-scale jitter."""

from .augmentation import large_scale_jitter
from .panoptic import (
    CATEGORY_TABLE_FILE,
    BadSample,
    TooManyBadSamples,
    check_bad_fraction,
    decode_panoptic_sample,
    decode_semantic_label,
    load_category_table,
    save_category_table,
    without_image_decoding,
)
from .synthetic import TOY_CATEGORIES, toy_panoptic_rows


__all__ = [
    "BadSample",
    "CATEGORY_TABLE_FILE",
    "TOY_CATEGORIES",
    "TooManyBadSamples",
    "check_bad_fraction",
    "decode_panoptic_sample",
    "decode_semantic_label",
    "large_scale_jitter",
    "load_category_table",
    "save_category_table",
    "toy_panoptic_rows",
    "without_image_decoding",
]
