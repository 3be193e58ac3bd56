"""PosSAM image processors: SAM's preprocessing (longest side -> 1024, rescale, SAM mean/std, pad bottom/right to
1024x1024) plus `pixel_mask`, panoptic annotations -> `mask_labels`/`class_labels`, and PosSAM post-processing.

`PosSAMImageProcessor` is the torchvision backend (subclass of transformers' `SamImageProcessor`),
`PosSAMImageProcessorPil` the PIL/numpy backend (subclass of `SamImageProcessorPil`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.models.sam.image_processing_sam import SamImageProcessor, SamImageProcessorKwargs

from .postprocessing import PosSAMPostProcessingMixin, check_ensemble_weight

__all__ = [
    "PosSAMImageProcessor",
    "PosSAMImageProcessorPil",
    "encode_panoptic_annotation",
    "nearest_indices",
    "nearest_resize_ids",
    "rgb_to_id",
]


class PosSAMImageProcessorKwargs(SamImageProcessorKwargs, total=False):
    r"""
    label_map (`dict[int, int]`, *optional*):
        Maps annotation category ids (e.g. COCO's 1..200) to class indices of the vocabulary. Default: identity.
    ignore_index (`int`, *optional*, defaults to 255):
        Semantic value of unlabeled pixels in two-channel (semantic, instance) annotation maps.
    mase_alpha (`float`, *optional*, defaults to 0.4):
        CLIP's weight on classes seen in training, in MASE and in FC-CLIP's geometric ensemble (post-processing).
    mase_beta (`float`, *optional*, defaults to 0.8):
        CLIP's weight on unseen classes (post-processing).
    """

    label_map: dict
    ignore_index: int
    mase_alpha: float
    mase_beta: float


def rgb_to_id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colour -> segment id: R + 256 G + 256^2 B (panopticapi's `rgb2id`)."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def _as_array(image: Any, name: str) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image)
    if torch.is_tensor(image):
        return image.cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    raise ValueError(f"{name} must be a PIL image, numpy array or torch tensor, got {type(image).__name__}.")


def _map_label(category: int, label_map: dict | None) -> int:
    if label_map is None:
        return int(category)
    if category not in label_map:
        raise ValueError(f"Category id {category} is not in label_map ({len(label_map)} entries): add it or fix the annotation.")
    return int(label_map[category])


def _segments_from_annotation(
    annotation: Any, label_map: dict | None, ignore_index: int, allow_absent_segments: bool = False
) -> tuple[np.ndarray, list[int], list[int]]:
    """
    One annotation -> (segment id map (H, W) int64, segment ids, class indices), crowd segments left out (FC-CLIP's
    mapper: one target per non-crowd segment of `segments_info`).

    Accepted forms:
    - COCO panoptic: `{"panoptic_map" or "png" or "label": RGB image, "segments_info": [{"id", "category_id",
      "iscrowd"?}]}`;
    - a two-channel map (H, W, >=2) or (>=2, H, W): channel 0 = semantic class, channel 1 = instance id (the format
      of transformers' segmentation examples); `ignore_index` pixels are unlabeled.

    A `segments_info` id missing from the PNG is an error, unless `allow_absent_segments` (an augmentation cropped it
    away: FC-CLIP still builds its target, an empty mask).
    """
    if isinstance(annotation, dict):
        if "segments_info" not in annotation:
            raise ValueError("A panoptic annotation dict needs 'segments_info' next to the PNG ('panoptic_map').")
        png = next((annotation[key] for key in ("panoptic_map", "png", "label") if key in annotation), None)
        if png is None:
            raise ValueError("A panoptic annotation dict needs its PNG under 'panoptic_map' (or 'png' / 'label').")
        array = _as_array(png, "panoptic_map")
        ids = rgb_to_id(array[..., :3]) if array.ndim == 3 else array.astype(np.int64)
        present = set(np.unique(ids).tolist())
        segment_ids, classes = [], []
        for segment in annotation["segments_info"]:
            if segment["id"] not in present and not allow_absent_segments:
                raise ValueError(f"segments_info names segment id {segment['id']}, which does not occur in the panoptic PNG.")
            if segment.get("iscrowd", 0):
                continue
            category = int(segment["category_id"])
            segment_ids.append(int(segment["id"]))
            classes.append(_map_label(category, label_map))
        return ids, segment_ids, classes
    array = _as_array(annotation, "annotation")
    if array.ndim == 3 and array.shape[0] in (2, 3, 4) and array.shape[-1] not in (2, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] < 2:
        raise ValueError(
            f"An annotation map must have two channels (semantic class, instance id), got shape {array.shape}; for COCO "
            "panoptic PNGs pass {'panoptic_map': png, 'segments_info': [...]}."
        )
    semantic, instance = array[..., 0].astype(np.int64), array[..., 1].astype(np.int64)
    divisor = int(instance.max()) + 1
    combined = semantic * divisor + instance + 1
    combined[semantic == ignore_index] = 0
    segment_ids = [int(v) for v in np.unique(combined) if v != 0]
    classes = [(v - 1) // divisor for v in segment_ids]
    classes = [_map_label(c, label_map) for c in classes]
    return combined, segment_ids, classes


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """
    Source index of each of `out_size` outputs for a nearest-neighbour resize from `in_size`, with the pixel-centre
    convention of the image resize (output k samples input position (k + 0.5) * in / out). The positions are
    accumulated in double precision the way Pillow's `Image.resize(..., NEAREST)` does, so id maps resized here equal
    PIL-resized panoptic PNGs exactly (what FC-CLIP's detectron2 transforms produce).
    """
    step = in_size / out_size
    positions = np.cumsum(np.concatenate([[0.5 * step], np.full(out_size - 1, step)]))
    return np.minimum(positions.astype(np.int64), in_size - 1)


def nearest_resize_ids(ids, size: tuple[int, int]):
    """
    Nearest-neighbour resize of an `(H, W)` id map (numpy or torch) to `size` by index gathering: exact for ids
    beyond float precision, and pixel-centred like the image resize (see `nearest_indices`).
    """
    height, width = ids.shape[-2:]
    rows, cols = nearest_indices(height, size[0]), nearest_indices(width, size[1])
    if torch.is_tensor(ids):
        rows, cols = torch.from_numpy(rows), torch.from_numpy(cols)
    return ids[..., rows[:, None], cols[None, :]]


def encode_panoptic_annotation(
    annotation: Any,
    reshaped_size: tuple[int, int],
    padded_size: tuple[int, int],
    label_map: dict | None = None,
    ignore_index: int = 255,
    allow_absent_segments: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Annotation -> `mask_labels` `(N, padH, padW)` uint8 and `class_labels` `(N,)` int64, resized like the image
    (nearest, pixel-centred: `nearest_resize_ids`) and padded bottom/right with background. A segment that vanishes
    at the new size is kept (empty mask): nothing is dropped silently; Mask2Former's losses handle empty targets.
    """
    ids, segment_ids, classes = _segments_from_annotation(annotation, label_map, ignore_index, allow_absent_segments)
    ids = torch.from_numpy(np.ascontiguousarray(ids))
    resized = ids if tuple(ids.shape) == tuple(reshaped_size) else nearest_resize_ids(ids, reshaped_size)
    padded = torch.zeros(padded_size, dtype=torch.int64)
    padded[: reshaped_size[0], : reshaped_size[1]] = resized
    if not segment_ids:
        return torch.zeros((0, *padded_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    masks = torch.stack([(padded == segment_id) for segment_id in segment_ids]).to(torch.uint8)
    return masks, torch.tensor(classes, dtype=torch.int64)


class _PosSAMPreprocessingMixin(PosSAMPostProcessingMixin):
    valid_kwargs = PosSAMImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_mask"]
    # The one home of MASE's alpha / beta: saved in preprocessor_config.json and read by every post-processing path
    # (and so by the pipeline and training/evaluate.py); a post-processing call may override them.
    mase_alpha = 0.4
    mase_beta = 0.8

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("mase_alpha", "mase_beta"):
            check_ensemble_weight(getattr(self, name), name)

    def preprocess(self, images, annotations=None, **kwargs) -> BatchFeature:
        r"""
        images: one image or a list (PIL, numpy HWC/CHW, torch CHW; grayscale and RGBA become RGB).
        annotations (*optional*): one per image, a COCO panoptic `{"panoptic_map", "segments_info"}` dict or a
            two-channel (semantic, instance) map; gives `mask_labels` (uint8) and `class_labels`.

        Returns `pixel_values` `(B, 3, 1024, 1024)`, `pixel_mask` `(B, 1024, 1024)` (1 on the image, 0 on padding),
        `original_sizes`, `reshaped_input_sizes`, and with annotations `mask_labels` / `class_labels` (lists).
        """
        label_map = kwargs.pop("label_map", None)
        ignore_index = kwargs.pop("ignore_index", 255)
        for name in ("mase_alpha", "mase_beta"):  # post-processing settings: no effect on preprocessing
            kwargs.pop(name, None)
        single = not isinstance(images, (list, tuple))
        image_list = [images] if single else list(images)
        if not image_list:
            raise ValueError("No image given: pass an image or a non-empty list of images.")
        image_list = [self._check_image(image, index) for index, image in enumerate(image_list)]
        return_tensors = kwargs.pop("return_tensors", "pt")
        data = super().preprocess(image_list, return_tensors=return_tensors, **kwargs)
        padded = self._padded_size()
        reshaped = [tuple(int(v) for v in size) for size in data["reshaped_input_sizes"]]
        pixel_mask = torch.zeros(len(reshaped), *padded, dtype=torch.int64)
        for index, (height, width) in enumerate(reshaped):
            pixel_mask[index, :height, :width] = 1
        data["pixel_mask"] = pixel_mask
        if annotations is not None:
            annotation_list = [annotations] if single else list(annotations)
            if len(annotation_list) != len(image_list):
                raise ValueError(f"Got {len(annotation_list)} annotations for {len(image_list)} images: give one per image.")
            encoded = [
                encode_panoptic_annotation(annotation, size, padded, label_map, ignore_index)
                for annotation, size in zip(annotation_list, reshaped)
            ]
            data["mask_labels"] = [masks for masks, _ in encoded]
            data["class_labels"] = [labels for _, labels in encoded]
        return data

    @staticmethod
    def _check_image(image, index: int):
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"Image {index} is empty ({image.width}x{image.height}).")
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                # 16-bit / float PIL modes: scale to 8 bit so the usual 1/255 rescale applies
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
                image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8))
            return image
        if isinstance(image, (np.ndarray, torch.Tensor)):
            array = image.cpu().numpy() if torch.is_tensor(image) else image
            if array.size == 0:
                raise ValueError(f"Image {index} is empty (shape {tuple(array.shape)}).")
            if array.dtype == np.uint16:
                array = (array / 257.0).round().astype(np.uint8)
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            return array
        raise ValueError(
            f"Image {index} is a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor (the pipeline "
            "also takes paths and URLs)."
        )


class PosSAMImageProcessor(_PosSAMPreprocessingMixin, SamImageProcessor):
    """Torchvision-backend PosSAM image processor."""


class PosSAMImageProcessorPil(_PosSAMPreprocessingMixin, SamImageProcessorPil):
    """PIL/numpy-backend PosSAM image processor."""
