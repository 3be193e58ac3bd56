"""FC-CLIP's large-scale jitter (LSJ) for panoptic training samples."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["large_scale_jitter"]


def large_scale_jitter(
    image: Image.Image, segment_ids: np.ndarray, rng: np.random.Generator, target_size: int = 1024,
    min_scale: float = 0.1, max_scale: float = 2.0, flip: bool = True,
) -> tuple[Image.Image, np.ndarray]:
    """
    Random horizontal flip, resize by s ~ U(min_scale, max_scale) so the image fits `s * target_size` (aspect kept;
    bilinear for the image, nearest for the segment-id map), then a random `target_size` crop where larger. Padding to
    `target_size` happens in the image processor (as for inference), so the returned sample can be smaller.

    Args:
        image: RGB PIL image.
        segment_ids: `(H, W)` int panoptic segment ids (0 = void).

    Returns:
        the augmented image and id map (same geometry).
    """
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        segment_ids = segment_ids[:, ::-1]
    scale = rng.uniform(min_scale, max_scale)
    height, width = segment_ids.shape
    factor = min(scale * target_size / height, scale * target_size / width)
    new_height, new_width = max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))
    image = image.resize((new_width, new_height), Image.BILINEAR)
    rows = np.minimum((np.arange(new_height) * (height / new_height)).astype(np.int64), height - 1)
    cols = np.minimum((np.arange(new_width) * (width / new_width)).astype(np.int64), width - 1)
    segment_ids = segment_ids[rows[:, None], cols[None, :]]
    top = int(rng.integers(0, new_height - target_size + 1)) if new_height > target_size else 0
    left = int(rng.integers(0, new_width - target_size + 1)) if new_width > target_size else 0
    bottom, right = min(top + target_size, new_height), min(left + target_size, new_width)
    return image.crop((left, top, right, bottom)), np.ascontiguousarray(segment_ids[top:bottom, left:right])
