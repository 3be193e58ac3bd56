"""The embedded toy panoptic dataset (`make demo`'s default): deterministic, in the schema of
`nielsr/coco-panoptic-val2017` (`image`, `label` RGB panoptic PNG, `image_id`, `segments_info`) plus a category table.

Stuff classes are background regions (a horizon splits "sky" from "grass"/"sand"); thing classes are 1-5 instances of
class-coloured shapes that touch and overlap (later shapes occlude earlier ones).
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from PIL import Image, ImageDraw
from transformers.image_transforms import id_to_rgb


__all__ = ["TOY_CATEGORIES", "toy_panoptic_rows"]


class ToyCategory(TypedDict):
    """A COCO-style category table entry: id, name (comma-separated synonyms), isthing, colour (RGB)."""

    id: int
    name: str
    isthing: int
    color: tuple[int, int, int]


TOY_CATEGORIES: list[ToyCategory] = [
    {"id": 0, "name": "ball,sphere", "isthing": 1, "color": (220, 40, 40)},
    {"id": 1, "name": "box,crate", "isthing": 1, "color": (40, 60, 220)},
    {"id": 2, "name": "tent,pyramid", "isthing": 1, "color": (240, 200, 30)},
    {"id": 3, "name": "sky", "isthing": 0, "color": (130, 190, 240)},
    {"id": 4, "name": "grass,lawn", "isthing": 0, "color": (50, 150, 60)},
    {"id": 5, "name": "sand,beach", "isthing": 0, "color": (200, 170, 120)},
]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if kind == 0:
        draw.ellipse(box, fill=fill)
    elif kind == 1:
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def toy_panoptic_rows(num_images: int, size: int = 128, seed: int = 0, split: str = "train"):
    """Yield `num_images` rows; the same (seed, split) always gives the same images."""
    rng = np.random.default_rng([seed, {"train": 0, "validation": 1}.get(split, 2)])
    for index in range(num_images):
        height = width = size
        ids = np.zeros((height, width), np.int64)
        image = np.zeros((height, width, 3), np.float32)
        segments: list[dict[str, int]] = []  # segments_info being built: {"id", "category_id"}
        horizon = int(rng.integers(height // 4, 3 * height // 4))
        ground = int(rng.choice([4, 5]))
        for category, rows in ((3, slice(0, horizon)), (ground, slice(horizon, height))):
            segment_id = len(segments) + 1
            ids[rows] = segment_id
            image[rows] = TOY_CATEGORIES[category]["color"]
            segments.append({"id": segment_id, "category_id": category})
        label_canvas = Image.fromarray(ids.astype(np.int32), mode="I")
        colour_canvas = Image.fromarray(image.astype(np.uint8))
        label_draw, colour_draw = ImageDraw.Draw(label_canvas), ImageDraw.Draw(colour_canvas)
        for _ in range(int(rng.integers(1, 6))):
            category = int(rng.integers(0, 3))
            extent = rng.uniform(0.15, 0.4) * size
            cx, cy = rng.uniform(0.15, 0.85, size=2) * size
            box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
            segment_id = len(segments) + 1
            _draw_shape(label_draw, category, box, segment_id)
            jitter = rng.integers(-25, 26, size=3)
            colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(TOY_CATEGORIES[category]["color"], jitter))
            _draw_shape(colour_draw, category, box, colour)
            segments.append({"id": segment_id, "category_id": category})
        ids = np.asarray(label_canvas, dtype=np.int64)
        pixels = np.asarray(colour_canvas, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
        segments_info = []
        for segment in segments:
            mask = ids == segment["id"]
            if not mask.any():  # fully occluded
                continue
            ys, xs = np.nonzero(mask)
            segments_info.append(
                {
                    "id": segment["id"],
                    "category_id": segment["category_id"],
                    "iscrowd": 0,
                    "area": int(mask.sum()),
                    "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
                }
            )
        yield {
            "image": Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)),
            "label": Image.fromarray(id_to_rgb(ids)),
            "image_id": f"toy_{split}_{index:05d}",
            "segments_info": segments_info,
        }
