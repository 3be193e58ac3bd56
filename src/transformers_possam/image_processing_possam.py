"""PosSAM image processors: SAM's preprocessing (longest side -> 1024, rescale, SAM mean/std, pad bottom/right to
1024x1024) plus `pixel_mask`, panoptic annotations -> `mask_labels`/`class_labels`, and PosSAM post-processing.

`PosSAMImageProcessor` is the torchvision backend (subclass of transformers' `SamImageProcessor`),
`PosSAMImageProcessorPil` the PIL/numpy backend (subclass of `SamImageProcessorPil`).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import rgb_to_id
from transformers.image_utils import ChannelDimension, SizeDict
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.models.sam.image_processing_sam import SamImageProcessor, SamImageProcessorKwargs

from .postprocessing import PosSAMPostProcessingMixin, check_ensemble_weight
from .remote_code_hooks import saving_checkpoint, write_json_with_auto_map


__all__ = [
    "PosSAMImageProcessor",
    "PosSAMImageProcessorPil",
    "encode_panoptic_annotation",
    "encode_segmentation_map",
    "nearest_indices",
    "nearest_resize_ids",
]


class PosSAMImageProcessorKwargs(SamImageProcessorKwargs, total=False):
    r"""
    label_map (`dict[int, int]`, *optional*):
        Maps annotation category ids (e.g. COCO's 1..200) to class indices of the vocabulary. Default: identity.
    ignore_index (`int`, *optional*, defaults to 255):
        Value of unlabeled pixels: in two-channel (semantic, instance) annotation maps, the semantic value; in
        `segmentation_maps`, the map value (after `do_reduce_labels`), as Mask2Former's `ignore_index`. None: no
        pixel is unlabeled (Mask2Former's default; PosSAM's is 255, the usual "void" of semantic maps).
    do_reduce_labels (`bool`, *optional*, defaults to `False`):
        As Mask2Former's: `segmentation_maps` values are decremented by 1 and 0 (background) becomes `ignore_index`
        (ADE20k-style maps whose class 0 is "other").
    mase_alpha (`float`, *optional*, defaults to 0.4):
        CLIP's weight on classes seen in training, in MASE and in FC-CLIP's geometric ensemble (post-processing).
    mase_beta (`float`, *optional*, defaults to 0.8):
        CLIP's weight on unseen classes (post-processing).
    """

    label_map: dict
    ignore_index: int | None
    do_reduce_labels: bool
    mase_alpha: float
    mase_beta: float


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
        raise ValueError(
            f"Category id {category} is not in label_map ({len(label_map)} entries): add it or fix the annotation."
        )
    return int(label_map[category])


def _segments_from_annotation(
    annotation: Any, label_map: dict | None, ignore_index: int | None, allow_absent_segments: bool = False
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
        # int64 before the colour sum: transformers' rgb_to_id keeps dtypes other than uint8 (uint16 would overflow)
        ids = rgb_to_id(array[..., :3].astype(np.int64)) if array.ndim == 3 else array.astype(np.int64)
        present = set(np.unique(ids).tolist())
        segment_ids, classes = [], []
        for segment in annotation["segments_info"]:
            if segment["id"] not in present and not allow_absent_segments:
                raise ValueError(
                    f"segments_info names segment id {segment['id']}, which does not occur in the panoptic PNG."
                )
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
            "panoptic PNGs pass {'panoptic_map': png, 'segments_info': [...]}; a 2-D map of class or instance ids is "
            "a segmentation map: pass it as segmentation_maps= (with instance_id_to_semantic_id for instance ids), as "
            "to Mask2Former's image processor."
        )
    semantic, instance = array[..., 0].astype(np.int64), array[..., 1].astype(np.int64)
    divisor = int(instance.max()) + 1
    combined = semantic * divisor + instance + 1
    if ignore_index is not None:
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


IdMap = TypeVar("IdMap", np.ndarray, torch.Tensor)


def nearest_resize_ids(ids: IdMap, size: tuple[int, int]) -> IdMap:
    """
    Nearest-neighbour resize of an `(H, W)` id map (numpy or torch) to `size` by index gathering: exact for ids
    beyond float precision, and pixel-centred like the image resize (see `nearest_indices`).
    """
    height, width = ids.shape[-2:]
    rows, cols = nearest_indices(height, size[0]), nearest_indices(width, size[1])
    if torch.is_tensor(ids):
        return ids[..., torch.from_numpy(rows)[:, None], torch.from_numpy(cols)[None, :]]
    return ids[..., rows[:, None], cols[None, :]]


def encode_panoptic_annotation(
    annotation: Any,
    reshaped_size: tuple[int, int],
    padded_size: tuple[int, int],
    label_map: dict | None = None,
    ignore_index: int | None = 255,
    allow_absent_segments: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Annotation -> `mask_labels` `(N, padH, padW)` uint8 and `class_labels` `(N,)` int64, resized like the image
    (nearest, pixel-centred: `nearest_resize_ids`) and padded bottom/right with background. A segment that vanishes
    at the new size is kept (empty mask): nothing is dropped silently; Mask2Former's losses handle empty targets.
    """
    id_array, segment_ids, classes = _segments_from_annotation(
        annotation, label_map, ignore_index, allow_absent_segments
    )
    ids = torch.from_numpy(np.ascontiguousarray(id_array))
    resized = ids if tuple(ids.shape) == tuple(reshaped_size) else nearest_resize_ids(ids, reshaped_size)
    padded = torch.zeros(padded_size, dtype=torch.int64)
    padded[: reshaped_size[0], : reshaped_size[1]] = resized
    if not segment_ids:
        return torch.zeros((0, *padded_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    masks = torch.stack([(padded == segment_id) for segment_id in segment_ids]).to(torch.uint8)
    return masks, torch.tensor(classes, dtype=torch.int64)


def _segmentation_map_ids(segmentation_map: Any, index: int, image_size: tuple[int, int]) -> np.ndarray:
    """
    `segmentation_maps[index]` as an `(H, W)` int64 array of the image's size. Accepts a PIL image (modes "L", "I",
    "P", "1", "I;16"...), a numpy array or a torch tensor, `(H, W)`, `(1, H, W)` or `(H, W, 1)`, of integers or bools.

    Raises:
        ValueError: another type, float values (ids are integers: a map read with `ToTensor()` is divided by 255),
            more than one channel (a COCO panoptic RGB PNG goes to `annotations=`), another size than the image.
    """
    where = f"segmentation_maps[{index}]"
    if isinstance(segmentation_map, Image.Image):
        array = np.asarray(segmentation_map)
    elif isinstance(segmentation_map, (np.ndarray, torch.Tensor)):
        array = _array_from(segmentation_map)
    else:
        raise ValueError(
            f"{where} is a {type(segmentation_map).__name__}: pass a 2-D map of ids as a PIL image, numpy array or "
            "torch tensor."
        )
    if array.dtype.kind not in "iub":
        raise ValueError(
            f"{where} has dtype {array.dtype}: a segmentation map holds integer class or instance ids. Convert it with "
            "np.asarray(..., dtype=np.int64) if its values are ids (a map read with ToTensor() was divided by 255: read "
            "it with np.asarray(Image.open(path)) instead)."
        )
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise ValueError(
            f"{where} has shape {tuple(array.shape)}: a segmentation map is 2-D, one id per pixel. A COCO panoptic RGB "
            "PNG goes to annotations={'panoptic_map': png, 'segments_info': [...]}, a two-channel (semantic, instance) "
            "map to annotations=."
        )
    if tuple(array.shape) != tuple(image_size):
        raise ValueError(
            f"{where} has size {tuple(array.shape)} but image {index} is {tuple(image_size)} (height, width): each map "
            "must label its image's pixels one to one."
        )
    return array.astype(np.int64)


def _instance_mapping(instance_id_to_semantic_id: Any, index: int, num_images: int) -> dict[int, int] | None:
    """Image `index`'s `{instance id: class id}` from one dict for all images or a list of one per image."""
    if instance_id_to_semantic_id is None:
        return None
    if isinstance(instance_id_to_semantic_id, (list, tuple)):
        if len(instance_id_to_semantic_id) != num_images:
            raise ValueError(
                f"instance_id_to_semantic_id is a list of {len(instance_id_to_semantic_id)} dicts for {num_images} "
                "images: give one dict per image, or one dict for all."
            )
        mapping, where = instance_id_to_semantic_id[index], f"instance_id_to_semantic_id[{index}]"
    else:
        mapping, where = instance_id_to_semantic_id, "instance_id_to_semantic_id"
    if not isinstance(mapping, dict):
        raise ValueError(f"{where} must be a dict {{instance id: class id}}, got {type(mapping).__name__}.")
    checked = {}
    for key, value in mapping.items():
        for name, number in (("instance id", key), ("class id", value)):
            if isinstance(number, (bool, np.bool_)) or not isinstance(number, (int, np.integer)):
                raise ValueError(f"{where} maps {key!r} to {value!r}: each {name} must be an int.")
        if value < 0:
            raise ValueError(f"{where} maps instance {key} to class {value}: class ids are >= 0.")
        checked[int(key)] = int(value)
    return checked


def encode_segmentation_map(
    ids: np.ndarray,
    reshaped_size: tuple[int, int],
    padded_size: tuple[int, int],
    instance_id_to_semantic_id: dict[int, int] | None = None,
    ignore_index: int | None = 255,
    do_reduce_labels: bool = False,
    label_map: dict | None = None,
    index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    A 2-D segmentation map `(H, W)` (int64) -> `mask_labels` `(N, padH, padW)` uint8 and `class_labels` `(N,)`
    int64, by Mask2Former's rule (`convert_segmentation_map_to_binary_masks`): with `do_reduce_labels` the values are
    decremented and 0 becomes `ignore_index`; one mask per distinct value other than `ignore_index` (ascending), the
    map being resized like the image first (nearest, pixel-centred: `nearest_resize_ids`, as Mask2Former resizes its
    maps with nearest-exact), so a value that vanishes at the new size has no mask, as in Mask2Former; its class is
    the value itself (a semantic map) or `instance_id_to_semantic_id[value]` (an instance map; with
    `do_reduce_labels` looked up at value + 1 and decremented, as Mask2Former). `label_map`, when given, then maps the
    classes. Padding (bottom / right) belongs to no mask.

    Raises:
        ValueError: `do_reduce_labels` without `ignore_index`, negative ids other than `ignore_index`, map values
            missing from `instance_id_to_semantic_id`, a class that `label_map` lacks, a negative class.
    """
    where = f"segmentation_maps[{index}]"
    if do_reduce_labels:
        if ignore_index is None:
            raise ValueError("do_reduce_labels=True needs an ignore_index (the value background 0 becomes).")
        ids = np.where(ids == 0, ignore_index, ids - 1)
    values = np.unique(ids)
    labeled = values[values != ignore_index] if ignore_index is not None else values
    if labeled.size and labeled[0] < 0:
        reduced = " (after do_reduce_labels)" if do_reduce_labels else ""
        raise ValueError(
            f"{where} holds the negative id {int(labeled[0])}{reduced}: ids are >= 0; mark unlabeled pixels with "
            f"ignore_index (now {ignore_index})."
        )
    if instance_id_to_semantic_id is not None:
        offset = 1 if do_reduce_labels else 0
        missing = [int(value) + offset for value in labeled if int(value) + offset not in instance_id_to_semantic_id]
        if missing:
            raise ValueError(
                f"{where} holds instance ids {missing[:10]}{' ...' if len(missing) > 10 else ''} that "
                f"instance_id_to_semantic_id does not map to a class: add them, or mark their pixels with ignore_index "
                f"(now {ignore_index})."
            )
    resized = ids if tuple(ids.shape) == tuple(reshaped_size) else nearest_resize_ids(ids, reshaped_size)
    present = np.unique(resized)
    present = present[present != ignore_index] if ignore_index is not None else present
    if instance_id_to_semantic_id is not None:
        offset = 1 if do_reduce_labels else 0
        classes = [instance_id_to_semantic_id[int(value) + offset] - offset for value in present]
    else:
        classes = [int(value) for value in present]
    if any(class_id < 0 for class_id in classes):
        raise ValueError(
            f"{where}: instance_id_to_semantic_id maps an instance to class 0, which do_reduce_labels makes -1 "
            "(background): map instances to classes >= 1 with do_reduce_labels, or leave it off."
        )
    classes = [_map_label(class_id, label_map) for class_id in classes]
    if not len(present):
        return torch.zeros((0, *padded_size), dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    resized_tensor = torch.from_numpy(np.ascontiguousarray(resized))
    masks = torch.zeros((len(present), *padded_size), dtype=torch.uint8)
    masks[:, : reshaped_size[0], : reshaped_size[1]] = (
        resized_tensor[None] == torch.from_numpy(present)[:, None, None]
    ).to(torch.uint8)
    return masks, torch.tensor(classes, dtype=torch.int64)


# Channel counts an image array may have: grayscale, RGB, RGBA (transformers' `infer_channel_dimension_format` set).
IMAGE_CHANNEL_COUNTS = (1, 3, 4)
# PIL modes whose pixels are not 8-bit: read as arrays and scaled like numpy input (PIL's own RGB conversion clips
# them at 255, so a 16-bit picture would turn white).
HIGH_DEPTH_PIL_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALREADY_RESCALED_WARNING = (
    "A float image has all its pixels in [0, 1]: it is read as already rescaled and is not divided by 255 again. A "
    "float image whose pixels are really 0..255 but all <= 1 (nearly black) is misread this way: pass it as uint8."
)


def _images_as_list(images: Any) -> list:
    """
    `images` -> flat list of single images. A 4-D array or tensor is a batch, alone or inside a list, as in
    transformers' `make_flat_list_of_images`. Raises ValueError when no image is given.
    """
    if images is None:
        raise ValueError("No image given (images is None): pass an image or a non-empty list of images.")
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(
            f"No image given (an empty {type(images).__name__}): pass an image or a non-empty list of images."
        )
    flat: list[Any] = []  # images of any accepted kind; `_check_image` validates each
    for item in items:
        if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
            flat.extend(item)
        else:
            flat.append(item)
    if not flat:
        raise ValueError("No image given: the 4-D batch holds no image.")
    return flat


def _array_from(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """numpy view of an array or tensor (any device, with or without grad; dtypes numpy lacks become float32)."""
    if not torch.is_tensor(image):
        return image
    image = image.detach().cpu()
    if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
        image = image.float()  # bfloat16 / float8 have no numpy dtype
    return image.numpy()


def _channel_axis_candidates(shape: tuple[int, ...]) -> tuple[int, bool] | None:
    """
    (channel axis, ambiguous?) of an (A, B, C) array without a declared layout, by transformers' rule
    (`infer_channel_dimension_format`: the first axis if it holds 1 or 3 values, else the last), extended to RGBA:
    4 counts only when neither end holds 1 or 3 (so a 4-pixel-high RGB strip stays channels last). None: no end fits.
    """
    first, last = shape[0], shape[-1]
    for counts in ((1, 3), (4,)):
        if first in counts:
            return 0, last in counts
        if last in counts:
            return -1, False
    return None


def _channels_first(array: np.ndarray, index: int, input_data_format: str | ChannelDimension | None) -> np.ndarray:
    """
    (H, W), (H, W, C) or (C, H, W) -> (C, H, W). Without `input_data_format` the channel axis follows
    `_channel_axis_candidates` (transformers' rule); when both ends qualify equally (e.g. 3x3x3, or an RGB strip 3
    pixels high) it is the first, as in transformers, with a warning.
    """
    if array.ndim == 2:
        return array[None]
    if input_data_format is not None:
        layout = ChannelDimension(input_data_format)
        channel_axis = 0 if layout == ChannelDimension.FIRST else -1
        if array.shape[channel_axis] not in IMAGE_CHANNEL_COUNTS:
            raise ValueError(
                f"Image {index} has {array.shape[channel_axis]} channels (shape {array.shape}, {layout.value}): pass 1 "
                "(grayscale), 3 (RGB) or 4 (RGBA) channels."
            )
    elif (candidates := _channel_axis_candidates(array.shape)) is not None:
        channel_axis, ambiguous = candidates
        if ambiguous:
            warnings.warn(
                f"Image {index} has shape {array.shape}, whose first and last axes could both be channels: read as "
                f"{'channels first (C, H, W)' if channel_axis == 0 else 'channels last (H, W, C)'}. Pass input_data_format "
                "to choose.",
                UserWarning,
                stacklevel=2,
            )
    else:
        raise ValueError(
            f"Image {index} has shape {array.shape}: neither its first nor its last axis holds 1, 3 or 4 channels "
            "(grayscale, RGB, RGBA). Pass an (H, W), (H, W, C) or (C, H, W) image with one of those channel counts."
        )
    return np.moveaxis(array, channel_axis, 0)


def _in_8bit_units(array: np.ndarray, index: int) -> np.ndarray:
    """
    Pixels on the 0..255 scale that the 1/255 rescale expects: uint8 unchanged; uint16 (16-bit, 0..65535) scaled by
    255 / 65535 to float32; other integers must already be 0..255 (made uint8); floats must be finite and in [0, 1]
    (read as already rescaled: multiplied by 255, with a warning, like transformers' `is_scaled_image` check) or in
    [0, 255]. Anything else is a ValueError: it cannot be read without guessing.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:
        return array.astype(np.float32) * np.float32(255 / 65535)
    if array.dtype.kind in "iu":
        int_low, int_high = int(array.min()), int(array.max())
        if int_low < 0 or int_high > 255:
            raise ValueError(
                f"Image {index} has {array.dtype} pixels in [{int_low}, {int_high}]: integer images must lie in [0, 255]. Scale or "
                "clip it to 0..255, or pass 16-bit data as uint16 (0..65535)."
            )
        return array.astype(np.uint8)
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"Image {index} has NaN or infinite pixels: pixels must be finite numbers.")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(
            f"Image {index} has float pixels in [{low:.4g}, {high:.4g}]: float images must lie in [0, 1] or [0, 255]. "
            "Pass the picture itself (not a normalized one), or clip it."
        )
    if high <= 1:
        warnings.warn(ALREADY_RESCALED_WARNING, UserWarning, stacklevel=2)
        return array * np.float32(255)
    return array


def _composited_on_white(array: np.ndarray) -> np.ndarray:
    """(4, H, W) RGBA in 8-bit units -> (3, H, W) over a white background, as transformers converts uint8 RGBA."""
    alpha = array[3:].astype(np.float32) / 255
    return array[:3] * alpha + 255 * (1 - alpha)


if TYPE_CHECKING:
    from transformers.image_processing_utils import BaseImageProcessor

    class _SamBackend(BaseImageProcessor):
        """
        For the type checker only: what `_PosSAMPreprocessingMixin` uses from the SAM image processor it is combined
        with (`SamImageProcessor` or `SamImageProcessorPil`, which share no base that declares these). At run time the
        mixin's base is `object`, so its `super()` calls reach that SAM processor.
        """

        do_rescale: bool

        @property
        def backend(self) -> str: ...

        def _get_preprocess_shape(self, old_shape: tuple[int, int], longest_edge: int) -> tuple[int, int]: ...

else:
    _SamBackend = object


class _PosSAMPreprocessingMixin(PosSAMPostProcessingMixin, _SamBackend):
    model_input_names = ["pixel_values", "pixel_mask"]
    # The one home of MASE's alpha / beta: saved in preprocessor_config.json and read by every post-processing path
    # (and so by the pipeline and training/evaluate.py); a post-processing call may override them.
    mase_alpha = 0.4
    mase_beta = 0.8

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Saved by `save_pretrained`, the file also gets `auto_map` and the checkpoint its code (remote_code.py)."""
        write_json_with_auto_map(self, json_file_path, ("AutoImageProcessor",), super().to_json_file)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        with saving_checkpoint():
            return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs: Any):
        """`ImageProcessingMixin.from_dict`, leaving out `auto_map`: where the code is, not a setting (to_json_file)."""
        image_processor_dict = {key: value for key, value in image_processor_dict.items() if key != "auto_map"}
        return super().from_dict(image_processor_dict, **kwargs)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("mase_alpha", "mase_beta"):
            check_ensemble_weight(getattr(self, name), name)

    def _get_preprocess_shape(self, old_shape: tuple[int, int], longest_edge: int) -> tuple[int, int]:
        """SAM's resize target (longest side -> `longest_edge`), with at least one pixel on the short side: a strip
        such as 40000x10 would otherwise round to 0 rows at 1024 (several transformers image processors keep 1 pixel
        the same way)."""
        height, width = super()._get_preprocess_shape(old_shape, longest_edge)
        return max(height, 1), max(width, 1)

    def preprocess(
        self, images, annotations=None, segmentation_maps=None, instance_id_to_semantic_id=None, **kwargs
    ) -> BatchFeature:
        r"""
        images: one image or a list; a 4-D array / tensor is a batch (as in transformers). An image is a PIL image
            (any mode: grayscale, palette, RGBA, 16-bit and float modes become RGB) or a numpy array / torch tensor
            `(H, W)`, `(H, W, C)` or `(C, H, W)` with 1, 3 or 4 channels (RGBA is composited on white). The channel
            axis is the one with 1, 3 or 4 entries; when both ends qualify (e.g. 3x3x3) it is the first, like
            transformers, with a warning: pass `input_data_format` to choose. Pixel values, when rescaling (the
            default): uint8 as is; uint16 is 16-bit (0..65535, like PIL's "I;16"); other integers must be 0..255;
            floats must be finite and in [0, 255], except that a float image with every pixel in [0, 1] is read as
            already rescaled (warning) and not divided by 255 again, so a [0, 255] float image that is all <= 1 is
            misread: pass such data as uint8. With `do_rescale=False` the values are used as given.
        annotations (*optional*): one per image, a COCO panoptic `{"panoptic_map", "segments_info"}` dict or a
            two-channel (semantic, instance) map; gives `mask_labels` (uint8) and `class_labels`.
        segmentation_maps (*optional*): Mask2Former's form of labels: one 2-D map of integer ids per image (PIL
            image, numpy array or torch tensor of the image's height and width). Without
            `instance_id_to_semantic_id` a semantic map (each value is a class); with it an instance map. Gives
            `mask_labels` / `class_labels` as Mask2Former's image processor does (see `encode_segmentation_map`;
            `ignore_index`, default 255 here, and `do_reduce_labels` as there), resized and padded like the image.
            Not together with `annotations`.
        instance_id_to_semantic_id (*optional*): `{instance id: class id}`, one dict for all images or a list of
            one per image, as Mask2Former's; every id of a map (other than `ignore_index`) must be in it.

        return_tensors (*optional*): `"pt"` for torch tensors (what the model takes), `"np"` for numpy arrays; the
            default, None, returns per-image lists as transformers' image processors do (torch tensors from this
            torchvision backend, numpy arrays from the PIL backend).

        Returns `pixel_values` `(B, 3, 1024, 1024)`, `pixel_mask` `(B, 1024, 1024)` int64 (1 on the image, 0 on
        padding), `original_sizes` and `reshaped_input_sizes` `(B, 2)` (longest side 1024, at least 1 pixel on the
        other), each a list of B per-image entries when `return_tensors` is None; with annotations also
        `mask_labels` / `class_labels`, lists of per-image torch tensors whatever `return_tensors` (their number of
        segments differs between images).

        Raises `ValueError` for every unusable input, wrong types included, naming the image's index and the problem:
        no image, None, a path (the pipeline loads those), an unsupported dtype (bool, complex, object), NaN / inf,
        values outside the ranges above, a rank other than 2-4, an empty image, a channel count other than 1, 3, 4.
        """
        label_map = kwargs.pop("label_map", None)
        ignore_index = kwargs.pop("ignore_index", 255)
        do_reduce_labels = kwargs.pop("do_reduce_labels", False)
        if segmentation_maps is not None and annotations is not None:
            raise ValueError(
                "Give annotations (COCO panoptic or two-channel maps) or segmentation_maps (2-D id maps), not both."
            )
        if instance_id_to_semantic_id is not None and segmentation_maps is None:
            raise ValueError("instance_id_to_semantic_id was given without segmentation_maps: it maps their ids.")
        if not isinstance(do_reduce_labels, (bool, np.bool_)):
            raise ValueError(f"do_reduce_labels must be True or False, got {do_reduce_labels!r}.")
        if ignore_index is not None and (
            isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer))
        ):
            raise ValueError(f"ignore_index must be an int (or None: no unlabeled pixels), got {ignore_index!r}.")
        ignore_index = None if ignore_index is None else int(ignore_index)
        for name in ("mase_alpha", "mase_beta"):  # post-processing settings: no effect on preprocessing
            kwargs.pop(name, None)
        image_list = _images_as_list(images)
        do_rescale = kwargs.get("do_rescale")
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        input_data_format = kwargs.pop("input_data_format", None)
        image_list = [
            self._check_image(image, index, input_data_format, do_rescale) for index, image in enumerate(image_list)
        ]
        kwargs["input_data_format"] = (
            ChannelDimension.FIRST
        )  # every array is (C, H, W) now; PIL images carry their own
        # transformers' convention: no tensor type unless asked for (lists of per-image arrays, as SAM returns them)
        return_tensors = kwargs.pop("return_tensors", None)
        data = super().preprocess(image_list, return_tensors=return_tensors, **kwargs)
        padded = self._padded_size()
        reshaped = [(int(height), int(width)) for height, width in data["reshaped_input_sizes"]]
        pixel_masks = []
        for height, width in reshaped:
            pixel_mask = np.zeros(padded, dtype=np.int64)
            pixel_mask[:height, :width] = 1
            pixel_masks.append(pixel_mask)
        if return_tensors is not None:
            data["pixel_mask"] = BatchFeature({"pixel_mask": np.stack(pixel_masks)}, tensor_type=return_tensors)[
                "pixel_mask"
            ]
        else:
            # like the pixel values of this backend: torch tensors (torchvision) or numpy arrays (PIL)
            as_pixels = torch.from_numpy if torch.is_tensor(data["pixel_values"][0]) else np.asarray
            data["pixel_mask"] = [as_pixels(pixel_mask) for pixel_mask in pixel_masks]
        if annotations is not None:
            annotation_list = list(annotations) if isinstance(annotations, (list, tuple)) else [annotations]
            if len(annotation_list) != len(image_list):
                raise ValueError(
                    f"Got {len(annotation_list)} annotations for {len(image_list)} images: give one per image."
                )
            encoded = [
                encode_panoptic_annotation(annotation, size, padded, label_map, ignore_index)
                for annotation, size in zip(annotation_list, reshaped)
            ]
            data["mask_labels"] = [masks for masks, _ in encoded]
            data["class_labels"] = [labels for _, labels in encoded]
        if segmentation_maps is not None:
            map_list = (
                list(segmentation_maps)
                if isinstance(segmentation_maps, (list, tuple))
                or (
                    isinstance(segmentation_maps, (np.ndarray, torch.Tensor))
                    and segmentation_maps.ndim == 3
                    and len(image_list) > 1
                )
                else [segmentation_maps]
            )
            if len(map_list) != len(image_list):
                raise ValueError(
                    f"Got {len(map_list)} segmentation maps for {len(image_list)} images: give one per image."
                )
            original_sizes = [(int(height), int(width)) for height, width in data["original_sizes"]]
            encoded = [
                encode_segmentation_map(
                    _segmentation_map_ids(segmentation_map, index, original_sizes[index]),
                    reshaped[index],
                    padded,
                    _instance_mapping(instance_id_to_semantic_id, index, len(image_list)),
                    ignore_index,
                    bool(do_reduce_labels),
                    label_map,
                    index,
                )
                for index, segmentation_map in enumerate(map_list)
            ]
            data["mask_labels"] = [masks for masks, _ in encoded]
            data["class_labels"] = [labels for _, labels in encoded]
        return data

    def _check_image(
        self, image: Any, index: int, input_data_format: str | ChannelDimension | None = None, do_rescale: bool = True
    ) -> Image.Image | np.ndarray:
        """
        One image -> what SAM's preprocessing reads correctly: an 8-bit PIL image as is, anything else a contiguous
        `(C, H, W)` numpy array with 3 channels (4 for uint8 RGBA, which transformers composites) on the 0..255 scale
        (see `preprocess`); the PIL backend gets uint8, as it resizes through 8-bit PIL images anyway. Raises
        ValueError naming image `index` and the problem.
        """
        if isinstance(image, Image.Image):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"Image {index} is empty ({image.width}x{image.height}).")
            try:
                image.load()  # a lazily opened file decodes here, so a broken one fails with its index
            except Exception as error:
                raise ValueError(f"Image {index} (a PIL image) could not be decoded: {error}") from error
            if image.mode not in HIGH_DEPTH_PIL_MODES:
                return image
            array = np.asarray(image)
            array = array.astype(array.dtype.newbyteorder("="))  # "I;16B" is big-endian
            if image.mode == "I" and array.size and 255 < int(array.max()) <= 65535 and int(array.min()) >= 0:
                # Pillow opens 16-bit PGM / PPM (and `.convert("I")` of 16-bit PNGs) as 32-bit "I": values above 255
                # that fit 16 bits are 16-bit data; values within 0..255 stay 8-bit (a 16-bit image that dark cannot
                # be told apart; it would read brighter)
                array = array.astype(np.uint16)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            array = _array_from(image)
        else:
            raise ValueError(
                f"Image {index} is a {type(image).__name__}; pass a PIL image, a numpy array or a torch tensor (the pipeline "
                "also takes paths and URLs)."
            )
        if array.dtype.kind not in "uif":
            raise ValueError(
                f"Image {index} has dtype {array.dtype}: pass uint8 (0..255), uint16 (0..65535) or float (0..1 or 0..255) "
                "pixels."
            )
        if array.size == 0:
            raise ValueError(f"Image {index} is empty (shape {tuple(array.shape)}).")
        if array.ndim not in (2, 3):
            raise ValueError(
                f"Image {index} has {array.ndim} dimension(s) (shape {tuple(array.shape)}): pass (H, W), (H, W, C) or (C, H, W) "
                "images, or a 4-D array for a batch."
            )
        array = _channels_first(array, index, input_data_format)
        if do_rescale:
            array = _in_8bit_units(array, index)
            if array.shape[0] == 4 and array.dtype != np.uint8:
                array = _composited_on_white(array)
            if self.backend == "pil" and array.dtype != np.uint8:
                array = np.clip(np.round(array), 0, 255).astype(np.uint8)
        elif array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(f"Image {index} has NaN or infinite pixels: pixels must be finite numbers.")
        if array.shape[0] == 1:
            array = np.repeat(array, 3, axis=0)
        return np.ascontiguousarray(array)


# transformers' SAM processors infer `pad_size` as `dict[str, int]` from their class default, but their __init__
# (`_standardize_kwargs`) stores a `SizeDict` on every instance: the re-declarations below state what instances hold.


class PosSAMImageProcessor(_PosSAMPreprocessingMixin, SamImageProcessor):
    """Torchvision-backend PosSAM image processor."""

    valid_kwargs = PosSAMImageProcessorKwargs
    pad_size: dict[str, int] | SizeDict  # type: ignore[assignment]  # SamImageProcessor's inferred type is too narrow
    size: dict[str, int] | SizeDict  # type: ignore[assignment]  # as pad_size


class PosSAMImageProcessorPil(_PosSAMPreprocessingMixin, SamImageProcessorPil):
    """PIL/numpy-backend PosSAM image processor."""

    valid_kwargs = PosSAMImageProcessorKwargs
    pad_size: dict[str, int] | SizeDict  # type: ignore[assignment]  # SamImageProcessorPil's inferred type is too narrow
    size: dict[str, int] | SizeDict  # type: ignore[assignment]  # as pad_size
