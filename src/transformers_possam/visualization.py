"""Pictures of segmentation results that a person can read.

`draw_segmentation(image, result, labels)` draws any result of this package over its image: the panoptic and
instance results of `post_process_panoptic_segmentation` / `post_process_instance_segmentation` (`{"segmentation",
"segments_info"}`), the `(H, W)` class-id maps of `post_process_semantic_segmentation`, and the list of `{"score",
"label", "mask"}` returned by the pipeline. Each segment is tinted with its label's colour from a fixed palette of
well-separated colours (Kelly's colours of maximum contrast), outlined with a darker contour (so touching instances
of one class stay apart) and named by a tag whose text is black or white, whichever contrasts more with the tag's
colour (WCAG contrast ratio). A legend below the picture lists the labels drawn. Pixels outside every segment are
left exactly as in the input image.

`side_by_side(pictures, titles)` puts pictures next to each other, e.g. input | prediction | ground truth.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage


__all__ = [
    "PALETTE",
    "Segment",
    "contrast_ratio",
    "draw_segmentation",
    "label_colour",
    "legend_entries",
    "segments_from_result",
    "side_by_side",
    "text_colour",
]

# Kelly's 22 colours of maximum contrast (K. L. Kelly, "Twenty-two colors of maximum contrast", 1965) without white,
# black and grey (they read as "no colour"), ordered so that the first classes get the most different hues.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 103, 165),  # strong blue
    (243, 132, 0),  # vivid orange
    (0, 136, 86),  # vivid green
    (135, 86, 146),  # strong purple
    (243, 195, 0),  # vivid yellow
    (190, 0, 50),  # vivid red
    (161, 202, 241),  # very light blue
    (230, 143, 172),  # strong purplish pink
    (141, 182, 0),  # vivid yellowish green
    (136, 45, 23),  # strong reddish brown
    (96, 78, 151),  # strong violet
    (194, 178, 128),  # greyish yellow
    (249, 147, 121),  # strong yellowish pink
    (43, 61, 38),  # dark olive green
    (246, 166, 0),  # vivid orange yellow
    (179, 68, 108),  # strong purplish red
    (220, 211, 0),  # vivid greenish yellow
    (101, 69, 34),  # deep yellowish brown
    (226, 88, 34),  # vivid reddish orange
)

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Segment:
    """One drawable segment: `mask` `(H, W)` bool, the label's display name, its score (None for semantic maps) and
    the class index the colour is taken from (None when only the name is known, e.g. pipeline output without
    `labels`)."""

    mask: np.ndarray
    label: str
    score: float | None = None
    label_id: int | None = None


def _relative_luminance(colour: Sequence[int]) -> float:
    """WCAG 2.x relative luminance of an sRGB colour given as 0-255 integers."""
    channels = []
    for value in colour[:3]:
        c = value / 255
        channels.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    return 0.2126 * channels[0] + 0.7152 * channels[1] + 0.0722 * channels[2]


def contrast_ratio(first: Sequence[int], second: Sequence[int]) -> float:
    """WCAG 2.x contrast ratio between two sRGB colours (1 to 21; 4.5 is the AA threshold for normal text)."""
    lighter, darker = sorted((_relative_luminance(first), _relative_luminance(second)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def text_colour(background: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher contrast ratio with `background` (never white on yellow)."""
    return BLACK if contrast_ratio(BLACK, background) >= contrast_ratio(WHITE, background) else WHITE


def label_colour(label: str, label_id: int | None = None) -> tuple[int, int, int]:
    """The palette colour of a label: by class index when known (so the classes of one vocabulary get distinct colours
    up to the palette's size), else by a stable hash of the name; the same label always gets the same colour."""
    index = label_id if label_id is not None else zlib.crc32(label.encode("utf-8"))
    return PALETTE[index % len(PALETTE)]


def _label_names(labels: Any) -> dict[int, str]:
    """Class index -> display name from a list of names (or `{"name": ...}` dicts), an `id2label` mapping or a
    `Vocabulary`."""
    if labels is None:
        return {}
    display_names = getattr(labels, "display_names", None)
    if display_names is not None:  # a Vocabulary
        return dict(enumerate(display_names))
    if isinstance(labels, Mapping):
        return {int(key): str(value) for key, value in labels.items()}
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(
            f"labels must be a list of class names, an id2label mapping or a Vocabulary, got {type(labels).__name__}."
        )
    names = {}
    for index, entry in enumerate(labels):
        if isinstance(entry, Mapping) and "name" in entry:
            entry = entry["name"]
        if not isinstance(entry, str):
            raise TypeError(f"labels[{index}] must be a class name (str) or a {{'name': ...}} dict, got {entry!r}.")
        names[index] = entry
    return names


def _as_array(values: Any, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if isinstance(values, Image.Image):
        return np.asarray(values)
    if isinstance(values, np.ndarray):
        return values
    raise TypeError(f"{what} must be a torch.Tensor, numpy array or PIL image, got {type(values).__name__}.")


def _name_of(label_id: int, names: dict[int, str], where: str) -> str:
    if label_id not in names:
        if not names:
            raise ValueError(f"{where} has class index {label_id}: pass `labels` (the vocabulary the result used).")
        raise ValueError(
            f"{where} has class index {label_id}, but `labels` has no entry for it ({len(names)} labels): pass the "
            "vocabulary the result was computed with."
        )
    return names[label_id]


def segments_from_result(result: Any, labels: Any = None, ignore_index: int | None = None) -> list[Segment]:
    """Turn a panoptic / instance / semantic result or pipeline output into a list of `Segment`s (non-empty masks only).

    Args:
        result: `{"segmentation": (H, W) ids, "segments_info": [{"id", "label_id", "score"?}]}` (panoptic or
            instance post-processing; ids absent from `segments_info`, e.g. 0 or -1, are unsegmented), a `(H, W)`
            integer class-id map (semantic post-processing), or the pipeline's list of `{"label", "score", "mask"}`.
        labels: class names by class index (a list, an `id2label` mapping or a `Vocabulary`); required for
            post-processing results, optional for pipeline output (where it only fixes the colours).
        ignore_index: for a semantic map, the value of unsegmented pixels (e.g. 255), if any.
    """
    names = _label_names(labels)
    if isinstance(result, Mapping):
        if "segmentation" not in result or "segments_info" not in result:
            raise ValueError(
                "A result dict must have 'segmentation' and 'segments_info' (post_process_panoptic_segmentation / "
                f"post_process_instance_segmentation output); got keys {sorted(result)}."
            )
        segmentation = _as_array(result["segmentation"], "result['segmentation']")
        if segmentation.ndim != 2:
            raise ValueError(f"result['segmentation'] must be (H, W), got shape {tuple(segmentation.shape)}.")
        segments = []
        for index, info in enumerate(result["segments_info"]):
            if "id" not in info or "label_id" not in info:
                raise ValueError(f"result['segments_info'][{index}] needs 'id' and 'label_id', got {sorted(info)}.")
            mask = segmentation == info["id"]
            if not mask.any():
                continue
            label_id = int(info["label_id"])
            name = _name_of(label_id, names, f"result['segments_info'][{index}]")
            score = info.get("score")
            segments.append(Segment(mask, name, None if score is None else float(score), label_id))
        return segments
    if isinstance(result, (torch.Tensor, np.ndarray)):
        class_map = _as_array(result, "result")
        if class_map.ndim != 2 or not np.issubdtype(class_map.dtype, np.integer):
            raise ValueError(
                f"A semantic result must be an (H, W) integer class-id map, got shape {tuple(class_map.shape)} and "
                f"dtype {class_map.dtype}."
            )
        segments = []
        for label_id in np.unique(class_map).tolist():
            if label_id == ignore_index:
                continue
            name = _name_of(int(label_id), names, "the semantic map")
            segments.append(Segment(class_map == label_id, name, None, int(label_id)))
        return segments
    if isinstance(result, Sequence) and not isinstance(result, str):
        ids = {name: index for index, name in names.items()}
        segments = []
        for index, entry in enumerate(result):
            if not isinstance(entry, Mapping) or "mask" not in entry or "label" not in entry:
                raise ValueError(
                    f"result[{index}] must be a pipeline segment {{'score', 'label', 'mask'}}, got "
                    f"{type(entry).__name__}: for a batch of images, draw each image's list separately."
                )
            mask = _as_array(entry["mask"], f"result[{index}]['mask']")
            if mask.ndim != 2:
                raise ValueError(f"result[{index}]['mask'] must be (H, W), got shape {tuple(mask.shape)}.")
            mask = mask > 0
            if not mask.any():
                continue
            score = entry.get("score")
            label = str(entry["label"])
            segments.append(Segment(mask, label, None if score is None else float(score), ids.get(label)))
        return segments
    raise TypeError(
        "result must be a post-processing result dict, an (H, W) semantic class map or the pipeline's list of "
        f"segments, got {type(result).__name__}."
    )


def legend_entries(segments: Sequence[Segment]) -> list[tuple[str, tuple[int, int, int]]]:
    """The legend: each drawn label once with its colour, by class index (then name), so that pictures drawn with the
    same labels list their classes in the same order."""
    entries: dict[str, tuple[int, int, int]] = {}
    order: dict[str, tuple[float, str]] = {}
    for segment in segments:
        entries.setdefault(segment.label, label_colour(segment.label, segment.label_id))
        order.setdefault(segment.label, (math.inf if segment.label_id is None else segment.label_id, segment.label))
    return sorted(entries.items(), key=lambda item: order[item[0]])


def _visible_parts(segments: list[Segment]) -> list[Segment]:
    """Overlapping segments (pipeline instances): higher scores are drawn on top, as instance post-processing paints
    them; each segment keeps only its visible pixels, and segments hidden entirely are left out (of the legend too)."""
    if not any(segment.score is not None for segment in segments):
        order = list(range(len(segments)))
    else:  # a stable sort: ties keep the result's order
        order = sorted(
            range(len(segments)), key=lambda index: -math.inf if (s := segments[index].score) is None else s
        )
    visible: list[Segment] = []
    covered: np.ndarray | None = None
    for index in reversed(order):  # from the top of the stack down
        segment = segments[index]
        mask = segment.mask if covered is None else segment.mask & ~covered
        covered = segment.mask.copy() if covered is None else covered | segment.mask
        if mask.any():
            visible.append(Segment(mask, segment.label, segment.score, segment.label_id))
    return visible[::-1]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image).convert("RGB")
    raise TypeError(
        f"image must be a PIL image or an (H, W, 3) / (H, W) uint8 numpy array, got {type(image).__name__}"
        + (f" of dtype {image.dtype}" if isinstance(image, np.ndarray) else "")
        + "."
    )


def _draw_legend(
    width: int, entries: list[tuple[str, tuple[int, int, int]]], has_unsegmented: bool, font_size: int
) -> Image.Image:
    font = _font(font_size)
    pad = max(4, font_size // 2)
    items: list[tuple[str, tuple[int, int, int] | None]] = list(entries)
    if has_unsegmented:
        items.append(("no segment (image as is)", None))
    if not items:
        items.append(("no segments", None))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [font_size + pad + int(measure.textlength(text, font=font)) + 2 * pad for text, _ in items]
    rows: list[list[int]] = [[]]
    used = pad
    for index, item_width in enumerate(widths):
        if rows[-1] and used + item_width > width:
            rows.append([])
            used = pad
        rows[-1].append(index)
        used += item_width
    row_height = font_size + pad
    legend = Image.new("RGB", (width, pad + row_height * len(rows)), WHITE)
    draw = ImageDraw.Draw(legend)
    for row_index, row in enumerate(rows):
        x, y = pad, pad + row_index * row_height
        for index in row:
            text, colour = items[index]
            box = (x, y, x + font_size - 1, y + font_size - 1)
            if colour is None:  # an empty swatch: what is left clear
                draw.rectangle(box, fill=WHITE, outline=(110, 110, 110))
            else:
                draw.rectangle(box, fill=colour, outline=BLACK)
            draw.text((x + font_size + pad // 2, y + font_size // 2), text, fill=BLACK, font=font, anchor="lm")
            x += widths[index]
    return legend


def draw_segmentation(
    image: Any,
    result: Any,
    labels: Any = None,
    *,
    alpha: float = 0.6,
    scale: int | None = None,
    min_size: int = 480,
    show_scores: bool = True,
    show_tags: bool = True,
    show_legend: bool = True,
    ignore_index: int | None = None,
) -> Image.Image:
    """Draw a segmentation result over its image.

    Each segment is tinted with its label's palette colour (`(1 - alpha) * grey image + alpha * colour`: the grey
    keeps the image's shading without mixing its hues into the legend's colours), outlined by a
    contour in a darker shade of that colour, and tagged with its label (and score, if any) in black or white text,
    whichever contrasts more with the tag. Pixels outside every segment keep the input's values. A legend below the
    picture lists each drawn label once with its colour (plus an empty swatch when some pixels are unsegmented).

    Args:
        image: the image the result was computed for (PIL image or `(H, W, 3)` uint8 array).
        result: see `segments_from_result` (panoptic / instance dict, `(H, W)` semantic map, pipeline list).
        labels: class names by class index (list, `id2label` or `Vocabulary`); needed unless `result` is pipeline
            output. Give the same labels to pictures you compare (e.g. prediction and ground truth): colours follow
            the class index.
        alpha: opacity of the tint, in (0, 1].
        scale: integer upscaling of the picture (nearest neighbour, so the image's pixels stay as they are);
            default: the smallest factor that makes the longer side at least `min_size` pixels.
        show_scores: add the score to each tag.
        show_tags: tag each segment with its label (tags may cover a few pixels around small segments).
        show_legend: add the legend below the picture.
        ignore_index: for a semantic map, the value of unsegmented pixels.

    Returns:
        A PIL RGB image of `(W * scale, H * scale + legend height)`; the picture is its top `H * scale` rows.
        Where segments overlap (the pipeline's instances), the higher score is drawn on top; segments hidden
        entirely are neither drawn nor listed.

    Raises:
        ValueError: masks whose size differs from the image's, a class index without a label, a bad `alpha`/`scale`.
        TypeError: an image or result of an unsupported type.
    """
    picture = _to_rgb(image)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}.")
    segments = segments_from_result(result, labels, ignore_index=ignore_index)
    width, height = picture.size
    for segment in segments:
        if segment.mask.shape != (height, width):
            raise ValueError(
                f"The result's masks are {segment.mask.shape[0]}x{segment.mask.shape[1]} (H x W) but the image is "
                f"{height}x{width}: pass the image the result was computed for (post-process with "
                "target_sizes=[(H, W)] of that image)."
            )
    segments = _visible_parts(segments)
    if scale is None:
        scale = max(1, math.ceil(min_size / max(width, height)))
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}.")

    pixels = np.asarray(picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)).astype(np.float32)
    # segments tint a grey version of the image, so their hue is the legend's and not mixed with the image's own
    # colours; unsegmented pixels keep the image's colours and stand out
    grey = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    canvas = pixels.copy()
    covered = np.zeros((height, width), dtype=bool)
    thickness = max(1, round(scale / 2)) if scale > 1 else 1
    structure = ndimage.generate_binary_structure(2, 1)
    big_masks = []
    for segment in segments:
        covered |= segment.mask
        mask = segment.mask.repeat(scale, 0).repeat(scale, 1) if scale > 1 else segment.mask
        big_masks.append(mask)
        tint = np.array(label_colour(segment.label, segment.label_id), dtype=np.float32)
        canvas[mask] = (1 - alpha) * grey[mask] + alpha * tint
    for segment, mask in zip(segments, big_masks):
        # the contour: mask pixels within `thickness` of a pixel outside the mask (the image's edge is not a border)
        inner = ndimage.binary_erosion(mask, structure, iterations=thickness, border_value=1)
        shade = np.array(label_colour(segment.label, segment.label_id), dtype=np.float32)
        canvas[mask & ~inner] = 0.45 * shade
    drawn = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))

    font_size = max(12, round(max(drawn.size) / 34))
    font = _font(font_size)
    draw = ImageDraw.Draw(drawn)
    pad = max(2, font_size // 5)
    for segment, mask in zip(segments, big_masks) if show_tags else ():
        # the tag goes at the pixel deepest inside the segment (largest distance to its border)
        distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        text = segment.label if not show_scores or segment.score is None else f"{segment.label} {segment.score:.2f}"
        colour = label_colour(segment.label, segment.label_id)
        left, top, right, bottom = draw.textbbox((int(x), int(y)), text, font=font, anchor="mm")
        shift_x = max(0, pad - left) - max(0, right + pad - (drawn.width - 1))
        shift_y = max(0, pad - top) - max(0, bottom + pad - (drawn.height - 1))
        box = (left + shift_x - pad, top + shift_y - pad, right + shift_x + pad, bottom + shift_y + pad)
        draw.rectangle(box, fill=colour, outline=BLACK)
        draw.text((int(x) + shift_x, int(y) + shift_y), text, fill=text_colour(colour), font=font, anchor="mm")

    if not show_legend:
        return drawn
    legend = _draw_legend(drawn.width, legend_entries(segments), bool((~covered).any()), font_size)
    output = Image.new("RGB", (drawn.width, drawn.height + legend.height), WHITE)
    output.paste(drawn, (0, 0))
    output.paste(legend, (0, drawn.height))
    return output


def side_by_side(pictures: Sequence[Image.Image], titles: Sequence[str] | None = None, gap: int = 12) -> Image.Image:
    """Pictures next to each other on a white background, top-aligned, each under its title (if given)."""
    if not pictures:
        raise ValueError("side_by_side needs at least one picture.")
    if titles is not None and len(titles) != len(pictures):
        raise ValueError(f"Got {len(titles)} titles for {len(pictures)} pictures: give one title per picture.")
    font_size = max(14, round(max(max(p.size) for p in pictures) / 30))
    font = _font(font_size)
    title_height = font_size + 2 * gap if titles is not None else 0
    width = sum(p.width for p in pictures) + gap * (len(pictures) + 1)
    height = max(p.height for p in pictures) + title_height + 2 * gap
    panel = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(panel)
    x = gap
    for index, picture in enumerate(pictures):
        if titles is not None:
            draw.text(
                (x + picture.width // 2, gap + font_size // 2), titles[index], fill=BLACK, font=font, anchor="mm"
            )
        panel.paste(picture.convert("RGB"), (x, gap + title_height))
        x += picture.width + gap
    return panel
