"""FC-CLIP's large-scale jitter (LSJ) for panoptic training samples."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..image_processing_possam import nearest_resize_ids


__all__ = ["large_scale_jitter"]


def large_scale_jitter(
    image: Image.Image,
    segment_ids: np.ndarray,
    rng: np.random.Generator,
    target_size: int = 1024,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    flip: bool = True,
) -> tuple[Image.Image, np.ndarray]:
    """
    FC-CLIP's training augmentation (`coco_panoptic_new_baseline_dataset_mapper.py`: detectron2's `RandomFlip` ->
    `ResizeScale(min_scale, max_scale, target_size)` -> `FixedSizeCrop(target_size)`), with the same draws:

    - horizontal flip with probability 0.5;
    - scale s ~ U(min_scale, max_scale); the image is resized to fit `s * target_size` (aspect kept, size
      `round(side * factor)`; bilinear for the image, nearest with the pixel-centre convention for the id map, as
      detectron2 does through PIL);
    - a `target_size` crop where larger, its offset `round(max_offset * u)` with one u ~ U(0, 1) for both axes.

    The result is *not* resized again: the caller only normalizes and pads it (bottom/right) to `target_size`, so a
    zoomed-out sample (s < 1) stays small on the canvas, as in FC-CLIP (its padded area is void, not a segment).

    Args:
        image: RGB PIL image.
        segment_ids: `(H, W)` int panoptic segment ids (0 = void).

    Returns:
        the augmented image and id map (same geometry, each side <= `target_size`).
    """
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        segment_ids = segment_ids[:, ::-1]
    scale = rng.uniform(min_scale, max_scale)
    height, width = segment_ids.shape
    factor = min(scale * target_size / height, scale * target_size / width)
    # np.round (half to even) as detectron2; at least one pixel per side
    new_height, new_width = (max(1, int(v)) for v in np.round(np.multiply((height, width), factor)))
    image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    segment_ids = nearest_resize_ids(np.ascontiguousarray(segment_ids), (new_height, new_width))
    max_offset = np.maximum(np.subtract((new_height, new_width), target_size), 0)
    top, left = (int(v) for v in np.round(max_offset * rng.uniform(0.0, 1.0)))
    bottom, right = min(top + target_size, new_height), min(left + target_size, new_width)
    return image.crop((left, top, right, bottom)), np.ascontiguousarray(segment_ids[top:bottom, left:right])
