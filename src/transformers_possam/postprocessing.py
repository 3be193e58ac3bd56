"""Panoptic / semantic / instance post-processing of PosSAM outputs (shared by both image-processor backends).

Output format follows transformers' OneFormer post-processors, with one difference: a pixel that belongs to no
segment is always **0** (segment ids start at 1), also when no segment survives (OneFormer returns a map of -1 then).

Class scores (`class_scores`), with p_ldp = softmax over the K classes of the LDP logits (void column dropped first,
as FC-CLIP), p_clip = softmax of the CLIP logits, p_void = softmax over all K + 1 LDP logits, last column:

- `use_mase=True` (PosSAM): E = MASE(p_ldp, p_clip, IoU, seen_mask) (Algorithm 1); the score of class k is
  E_k * (1 - p_void), *not* renormalized, so MASE's IoU weighting ranks low-quality masks lower; a query is void
  when p_void exceeds every entry of E / sum(E) * (1 - p_void) (FC-CLIP's void rule);
- `use_mase=False`: exactly FC-CLIP's inference (`fcclip.py`, eval branch): the geometric ensemble
  G = p_ldp^(1 - a) * p_clip^a with a = alpha on seen and beta on unseen classes, renormalized (softmax of log G),
  times 1 - p_void, with p_void appended; FC-CLIP then takes log(. + 1e-8) and every inference softmaxes it again,
  which is reproduced too. Void = the void column is the largest. Paper Table 7's "w/o MASE" rows.

Without CLIP logits, E = p_ldp (IoU-weighted when `use_mase`).

Sizes. The masks cover the padded model input (`pad_size`). With `reshaped_input_sizes` (what the image processor
returns) they are upsampled to the padded size, cropped to the resized image and resized to `target_sizes`. Given
`target_sizes` alone (Mask2Former's and transformers' image-segmentation pipeline's habit), the crop is derived from
the processor's own resize rule, as if each image had its target size: SAM's longest side -> `size["longest_edge"]`
(`_get_preprocess_shape`) when `do_resize`, the image's size otherwise. That is exact when the target size is the
original image size and the image was preprocessed with this processor's settings; a target of another aspect ratio
than the image is read as an image of that size, and preprocessing options overridden at call time (`do_resize=`,
`size=`) are not known here: pass `reshaped_input_sizes` then. A processor with `do_pad=False` feeds the resized image
unpadded (the model only accepts that when it is already the padded size), so nothing is cropped. A `size` without
`longest_edge`, or a derived size beyond `pad_size`, raises `ValueError` rather than guessing.

Every argument is checked before any work: a value of the wrong type raises `TypeError`, a value of the right type
that cannot be right (a threshold outside [0, 1], a size of 0 pixels, a class id the outputs do not have, outputs of
two batch sizes, NaN logits) raises `ValueError`; each message names the argument and says what to pass instead.
(`mase_alpha` / `mase_beta` raise `ValueError` for every bad value, wrong types included, as the image processor's
constructor always has.)
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np
import torch
from torch._subclasses.fake_tensor import is_fake
from torch.nn import functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_utils import SizeDict
from transformers.utils import logging

from .dense_assignment_triton import pixel_assignment_triton
from .device_transfer import to_device
from .mase import mask_aware_selective_ensemble
from .mask_resampling import AxisResampling, assign_panoptic, axis_resampling, resize_matrix
from .triton_support import launch_or_fall_back, triton_runs_on
from .value_checks import all_finite, require


__all__ = ["PosSAMPostProcessingMixin", "class_scores", "check_ensemble_weight", "check_flag", "check_threshold"]

logger = logging.get_logger(__name__)

# masks resized at once by the instance inference: at most this many ...
RESIZE_CHUNK = 16
# ... and at most this many elements per full-size float32 temporary (128 MiB): large outputs go one mask at a time
RESIZE_ELEMENTS = 2**25
# full-size bool masks the instance inference keeps between scoring and painting (256 MiB); beyond, it resizes the
# painted masks a second time rather than holding N masks of the output size
INSTANCE_MASK_BYTES = 2**28
# bool entries counted at once (their int64 copy: 32 MiB)
COUNT_BLOCK_ELEMENTS = 2**22
# elements of one temporary of the semantic inference's row bands (queries x band rows x output width)
SEMANTIC_BAND_ELEMENTS = 2**23
# FC-CLIP's log(p + 1e-8) before its inference softmax
FCCLIP_LOG_EPSILON = 1e-8

# what each model output must look like (B images, Q queries, K classes)
OUTPUT_SHAPES = {
    "class_queries_logits": "(batch, queries, classes + 1)",
    "masks_queries_logits": "(batch, queries, height, width)",
    "clip_class_logits": "(batch, queries, classes)",
    "iou_scores": "(batch, queries)",
}

_short_repr = reprlib.Repr()
_short_repr.maxstring, _short_repr.maxother, _short_repr.maxlist = 40, 40, 6


def _describe(value) -> str:
    """`type value` for error messages, shortened (a hostile value may be huge)."""
    return f"{type(value).__name__} {_short_repr.repr(value)}"


def check_ensemble_weight(value, name: str) -> float:
    """MASE / geometric-ensemble weights are exponents of a geometric mean: a number in [0, 1] (else `ValueError`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (CLIP's weight in the ensemble), got {value!r}.")
    return float(value)


def check_threshold(value, name: str) -> float:
    """
    A threshold on scores or mask probabilities: a real number in [0, 1].

    Raises:
        TypeError: `value` is not a real number (a string, None, a bool).
        ValueError: `value` is NaN or outside [0, 1].
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1], got {_describe(value)}.")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1] (it is compared with probabilities), got {value!r}.")
    return number


def check_flag(value, name: str) -> bool:
    """`True` or `False` (numpy's bools too); anything else, truthy or not, raises `TypeError`."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {_describe(value)}.")


def _warn_if_threshold_removed_everything(method: str, threshold: float, best_score: float) -> None:
    """
    Says so when `threshold` alone left an image without segments although some scored above 0: PosSAM's scores are
    MASE class probabilities weighted by the predicted IoU and rarely pass 0.5, while transformers'
    `pipeline("image-segmentation")` passes `threshold=0.9` unless told otherwise, so an empty result would otherwise
    look like "nothing in the image".
    """
    logger.warning(
        f"{method}: threshold={threshold:g} removed every segment of an image (its best score is {best_score:.3g}). "
        "PosSAM's scores are class probabilities weighted by the predicted mask IoU and rarely exceed 0.5; "
        "FC-CLIP's and this processor's default is threshold=0.0. transformers' image-segmentation pipeline passes "
        "threshold=0.9 unless you pass threshold=0.0 to pipeline(...) or to the call."
    )


def _instance_mask_logit(mask_threshold: float) -> float:
    """The logit x with sigmoid(x) = `mask_threshold`: a pixel is in an instance mask when its logit exceeds it."""
    if mask_threshold <= 0.0:
        return -math.inf
    if mask_threshold >= 1.0:
        return math.inf
    return math.log(mask_threshold / (1.0 - mask_threshold))  # 0.0 exactly for 0.5: FC-CLIP's `logits > 0`


def _check_positive_int(value, name: str) -> int:
    """An int >= 1 (numpy ints too): `TypeError` for a float, a bool or a string, `ValueError` below 1."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {_describe(value)}.")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}.")
    return int(value)


def _class_ids(ids, name: str, num_classes: int) -> list[int] | None:
    """
    `ids` (an iterable of ints, or an integer tensor / array) as a list of class ids of outputs with `num_classes`
    classes; None stays None.

    Raises:
        TypeError: `ids` is not an iterable of ints (a string, a single int, a float id, a bool id).
        ValueError: an id is negative or >= `num_classes` (the vocabulary is not the one the model was run with).
    """
    if ids is None:
        return None
    if torch.is_tensor(ids) or isinstance(ids, np.ndarray):
        if isinstance(ids, np.ndarray):
            is_integer = ids.dtype.kind in "iu"
        else:
            is_integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
        if not is_integer:
            raise TypeError(f"{name} must hold integer class ids, got a {ids.dtype} array.")
        if ids.ndim == 0:
            raise TypeError(
                f"{name} must be a list of class ids (ints), e.g. [0, 3], got a single id {ids.item()}: wrap it in a list."
            )
        if ids.ndim > 1:
            raise ValueError(f"{name} must be a flat list of class ids, got shape {tuple(ids.shape)}.")
        values = ids.tolist()
    elif isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a list of class ids (ints), e.g. [0, 3], got {_describe(ids)}.")
    else:
        values = list(ids)
    checked = []
    for value in values:
        if (
            torch.is_tensor(value)
            and value.dim() == 0
            and not (value.is_floating_point() or value.dtype == torch.bool)
        ):
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} holds {_describe(value)}, which is not a class id: ids are ints from 0 to K - 1.")
        class_id = int(value)
        if not 0 <= class_id < num_classes:
            raise ValueError(
                f"{name} holds class id {class_id}, but the outputs have {num_classes} classes (ids 0 to {num_classes - 1}): "
                "pass the ids of the vocabulary the model was run with."
            )
        checked.append(class_id)
    return checked


def _seen_mask(seen_mask, num_classes: int, device) -> torch.Tensor | None:
    """
    `seen_mask` as a `(K,)` bool tensor on `device` (bool, or integers 0 / 1, as FC-CLIP's category_overlapping_mask);
    None stays None.

    Raises:
        TypeError: not a tensor, array or list of bools / 0-1 ints (a float tensor included).
        ValueError: not 1-D, values other than 0 / 1, or a length other than the outputs' class count K.
    """
    if seen_mask is None:
        return None
    if isinstance(seen_mask, (list, tuple, np.ndarray)):
        try:
            seen_mask = torch.as_tensor(seen_mask)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"seen_mask must be a bool tensor of shape (K,), got {_describe(seen_mask)}.") from error
    if not torch.is_tensor(seen_mask):
        raise TypeError(f"seen_mask must be a bool tensor of shape (K,), got {_describe(seen_mask)}.")
    if seen_mask.is_floating_point() or seen_mask.is_complex():
        raise TypeError(
            f"seen_mask must be a bool tensor (True = class of the training vocabulary), got dtype {seen_mask.dtype}."
        )
    if seen_mask.dim() != 1:
        raise ValueError(f"seen_mask must have shape (K,), one entry per class, got shape {tuple(seen_mask.shape)}.")
    if seen_mask.dtype != torch.bool:
        require(((seen_mask == 0) | (seen_mask == 1)).all(), "seen_mask must hold only True / False (or 1 / 0).")
        seen_mask = seen_mask != 0
    if seen_mask.shape[0] != num_classes:
        raise ValueError(
            f"seen_mask has {seen_mask.shape[0]} entries (a vocabulary of {seen_mask.shape[0]} classes), but the outputs "
            f"have {num_classes} classes (class_queries_logits has {num_classes + 1} columns, void last): post-process "
            "with the vocabulary the model was run with."
        )
    return to_device(seen_mask, device)


def _fetch_to_host(values: torch.Tensor) -> np.ndarray:
    """
    The one device-to-host transfer of the sync-free panoptic path (a host synchronization on an accelerator). From
    CUDA through page-locked staging memory: on an H200, 8 maps of 1024x1024 took 25 ms as a pageable copy and 8.2
    ms staged, the copy out included. The results are copied out of the staging block, so that segmentation maps a
    caller keeps hold no page-locked memory; PyTorch's caching host allocator keeps the block itself for the next
    call (for a batch of 8 such maps, a 64 MB block for the life of the process).
    """
    if values.device.type != "cuda":
        return values.cpu().numpy()
    # on the host explicitly: under `with torch.device("cuda")` a bare `torch.empty` would be a CUDA tensor, which
    # cannot be pinned
    staging = torch.empty(values.shape, dtype=values.dtype, device="cpu", pin_memory=True)
    staging.copy_(values)  # blocking: the copy is complete when it returns
    return staging.numpy().copy()


def _pixels_per_query(query_of_pixel: torch.Tensor, num_queries: int) -> torch.Tensor:
    """
    `(num_queries,)` int64 counts of a flat tensor of query ids in `[0, num_queries]` (`num_queries` itself is not
    counted: the id of pixels left out), with a fixed output size (`bincount` sizes its output from the data: a host
    synchronization on CUDA). On CUDA by `_count_by_histogram`, whose per-block shared-memory histogram avoids the
    contention of `scatter_add_`'s global atomics on a few hundred counters (0.7 ms per call on an H200 at
    1024x1024). `histc` has no deterministic CUDA kernel: under `torch.use_deterministic_algorithms`, and on other
    devices, `_count_by_scatter`.
    """
    if query_of_pixel.device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        return _count_by_histogram(query_of_pixel, num_queries)
    return _count_by_scatter(query_of_pixel, num_queries)


def _count_by_histogram(query_of_pixel: torch.Tensor, num_queries: int) -> torch.Tensor:
    """`_pixels_per_query` by `histc`: each id offset by 0.5 to the middle of its unit-wide bin, counted in float64
    (exact far beyond any image's pixel count; float32 would stop at 2**24 pixels of one query)."""
    counts = torch.histc(query_of_pixel.double() + 0.5, bins=num_queries + 1, min=0, max=num_queries + 1)
    return counts[:num_queries].long()


def _count_by_scatter(query_of_pixel: torch.Tensor, num_queries: int) -> torch.Tensor:
    """`_pixels_per_query` by a fixed-size `scatter_add_`."""
    counts = torch.zeros(num_queries + 1, dtype=torch.long, device=query_of_pixel.device)
    counts.scatter_add_(0, query_of_pixel.long(), torch.ones_like(query_of_pixel, dtype=torch.long))
    return counts[:num_queries]


@dataclass
class ModelPredictions:
    """
    The model outputs post-processing reads, checked by `read_outputs` (B images, Q queries, K classes):
    `class_queries_logits` `(B, Q, K + 1)`, `masks_queries_logits` `(B, Q, h, w)` (None when not needed),
    `clip_class_logits` `(B, Q, K)` and `iou_scores` `(B, Q)` (each None when the model gave none).
    """

    class_queries_logits: torch.Tensor
    masks_queries_logits: torch.Tensor | None
    clip_class_logits: torch.Tensor | None
    iou_scores: torch.Tensor | None

    @property
    def num_classes(self) -> int:
        return self.class_queries_logits.shape[-1] - 1


def read_outputs(outputs, with_masks: bool = True) -> ModelPredictions:
    """
    The tensors of `PosSAMForPanopticSegmentation`'s output (or any object or dict with the same names), checked.

    Raises:
        TypeError: `outputs` lacks `class_queries_logits` (or `masks_queries_logits` when `with_masks`), or one of
            them is not a floating-point tensor.
        ValueError: a tensor of the wrong number of dimensions, batch or query counts that differ between tensors,
            CLIP logits with another class count, NaN or infinite values, IoU scores outside [0, 1].
    """
    if isinstance(outputs, ModelPredictions):
        return outputs
    if outputs is None or isinstance(outputs, (str, bytes, tuple, list, torch.Tensor, np.ndarray)):
        raise TypeError(
            f"outputs must be the output of PosSAMForPanopticSegmentation (model(...) with return_dict=True), got {_describe(outputs)}."
        )
    tensors = {}
    required = ("class_queries_logits", "masks_queries_logits") if with_masks else ("class_queries_logits",)
    for name in OUTPUT_SHAPES:
        if name == "masks_queries_logits" and not with_masks:
            continue
        value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
        if value is None:
            if name in required:
                raise TypeError(
                    f"outputs has no {name}: pass the output of PosSAMForPanopticSegmentation (not of PosSAMModel), got {type(outputs).__name__}."
                )
            continue
        if not torch.is_tensor(value) or not value.is_floating_point():
            kind = f"a {value.dtype} tensor" if torch.is_tensor(value) else _describe(value)
            raise TypeError(
                f"outputs.{name} must be a floating-point tensor of shape {OUTPUT_SHAPES[name]}, got {kind}."
            )
        expected_dims = OUTPUT_SHAPES[name].count(",") + 1
        if value.dim() != expected_dims:
            raise ValueError(f"outputs.{name} must have shape {OUTPUT_SHAPES[name]}, got {tuple(value.shape)}.")
        tensors[name] = value
    class_logits = tensors["class_queries_logits"]
    batch_queries = tuple(class_logits.shape[:2])
    if class_logits.shape[-1] < 2:
        raise ValueError(
            f"outputs.class_queries_logits has {class_logits.shape[-1]} column(s): it needs one per class (at least one) plus void."
        )
    for name, value in tensors.items():
        if tuple(value.shape[:2]) != batch_queries:
            raise ValueError(
                f"outputs.{name} has shape {tuple(value.shape)}, whose (batch, queries) differ from class_queries_logits' "
                f"{batch_queries}: all outputs must come from one forward pass."
            )
    clip_logits = tensors.get("clip_class_logits")
    if clip_logits is not None and clip_logits.shape[-1] != class_logits.shape[-1] - 1:
        raise ValueError(
            f"outputs.clip_class_logits scores {clip_logits.shape[-1]} classes but class_queries_logits "
            f"{class_logits.shape[-1] - 1} (plus void): both must come from one vocabulary."
        )
    masks = tensors.get("masks_queries_logits")
    if masks is not None and 0 in masks.shape[-2:]:
        raise ValueError(
            f"outputs.masks_queries_logits has shape {tuple(masks.shape)}: masks need at least 1 x 1 pixels."
        )
    for name, value in tensors.items():
        # NaN would propagate to every score and mask it touches: refuse it rather than segment garbage (eagerly on
        # CPU; as an asynchronous device assert on CUDA, see `value_checks`)
        require(
            all_finite(value),
            f"outputs.{name} contains NaN or infinite values: the model's output is invalid (an overflow in half "
            "precision, or corrupt weights?); post-processing needs finite logits.",
        )
    iou = tensors.get("iou_scores")
    if iou is not None and iou.numel():
        low, high = torch.aminmax(iou)
        require(
            (low >= 0) & (high <= 1),
            "outputs.iou_scores must be predicted IoUs in [0, 1].",
            lambda: ValueError(
                f"outputs.iou_scores must be predicted IoUs in [0, 1], got values in [{float(low)}, {float(high)}]."
            ),
        )
    return ModelPredictions(class_logits, masks, clip_logits, iou)


def class_scores(
    outputs, seen_mask: torch.Tensor | None = None, use_mase: bool = True, alpha: float = 0.4, beta: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Returns `(scores, is_void)`: `(B, Q, K)` class scores and `(B, Q)` bool void flags (rules in the module doc).
    `seen_mask` `(K,)` defaults to all classes seen; `alpha` / `beta` weigh CLIP on seen / unseen classes.

    Raises:
        TypeError: `use_mase` not a bool, `seen_mask` or `outputs` of the wrong type (see `read_outputs`).
        ValueError: `alpha` / `beta` not numbers in [0, 1], `seen_mask` of another length than the outputs' K,
            invalid outputs (see `read_outputs`).
    """
    alpha, beta = check_ensemble_weight(alpha, "mase_alpha"), check_ensemble_weight(beta, "mase_beta")
    use_mase = check_flag(use_mase, "use_mase")
    predictions = read_outputs(outputs, with_masks=False)
    logits = predictions.class_queries_logits.float()
    num_classes = logits.shape[-1] - 1
    seen_mask = _seen_mask(seen_mask, num_classes, logits.device)
    void_prob = logits.softmax(-1)[..., num_classes]
    ldp_probs = logits[..., :num_classes].softmax(-1)
    if seen_mask is None:
        seen_mask = torch.ones(num_classes, dtype=torch.bool, device=logits.device)
    clip_logits = predictions.clip_class_logits
    if not use_mase:
        if clip_logits is None:
            ensemble = ldp_probs
        else:
            ensemble = mask_aware_selective_ensemble(
                ldp_probs, clip_logits.float().softmax(-1), None, seen_mask, alpha, beta
            )
        return _fcclip_class_probabilities(ensemble, void_prob)
    iou = predictions.iou_scores.float() if predictions.iou_scores is not None else None
    if clip_logits is None:
        ensemble = ldp_probs * iou.unsqueeze(-1) if iou is not None else ldp_probs
    else:
        ensemble = mask_aware_selective_ensemble(
            ldp_probs, clip_logits.float().softmax(-1), iou, seen_mask, alpha, beta
        )
    normalized = ensemble / ensemble.sum(-1, keepdim=True).clamp(min=torch.finfo(ensemble.dtype).tiny)
    is_void = void_prob > (normalized * (1 - void_prob).unsqueeze(-1)).amax(-1)
    return ensemble * (1 - void_prob).unsqueeze(-1), is_void


def _fcclip_class_probabilities(ensemble: torch.Tensor, void_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    FC-CLIP's final class probabilities from its geometric ensemble G `(B, Q, K)` and p_void `(B, Q)`:
    softmax(log G) * (1 - p_void) with p_void appended, then softmax(log(. + 1e-8)) as its inference functions do.
    Zeros in G stay zeros (FC-CLIP's `log(0) * 0` would give NaN there). Returns `(scores (B, Q, K), is_void)`.
    """
    normalized = ensemble / ensemble.sum(-1, keepdim=True).clamp(min=torch.finfo(ensemble.dtype).tiny)
    probabilities = torch.cat([normalized * (1 - void_prob).unsqueeze(-1), void_prob.unsqueeze(-1)], dim=-1)
    final = torch.log(probabilities + FCCLIP_LOG_EPSILON).softmax(-1)
    scores, void = final[..., :-1], final[..., -1]
    # argmax over K + 1 picks void only when it is strictly the largest (first index wins ties)
    return scores, void > scores.amax(-1)


def _resize_last_axis(values: torch.Tensor, steps: list[tuple[int, int | None]]) -> torch.Tensor:
    """`(N, C, L)` -> linear resize (align_corners=False) / crop of the last axis per `(resize_to, crop_to)` step."""
    for resize_to, crop_to in steps:
        if values.shape[-1] != resize_to:
            values = F.interpolate(values, size=resize_to, mode="linear", align_corners=False)
        if crop_to is not None:
            values = values[..., :crop_to]
    return values


def _row_bands(rows: torch.Tensor, band: int) -> list[tuple[int, int, int]]:
    """
    Host `(out, in)` resize matrix -> per band of `band` output rows, `(first output row, first input row read, past
    the last input row read)`: the input rows with a nonzero weight in the band.
    """
    support = rows != 0
    bands = []
    for first in range(0, rows.shape[0], band):
        used = support[first : first + band].any(0).nonzero().flatten()
        bands.append((first, int(used[0]), int(used[-1]) + 1))
    return bands


def _count_true(binary: torch.Tensor) -> torch.Tensor:
    """
    `(N, H, W)` bool -> `(N,)` int64 number of True entries, a block of columns at a time: summing a bool tensor at
    once first converts all of it to int64 (8 bytes per pixel, 512 MiB for one 8192 x 8192 mask).
    """
    flat = binary.flatten(1)
    block = max(1, COUNT_BLOCK_ELEMENTS // max(flat.shape[0], 1))
    counts = flat.new_zeros(flat.shape[0], dtype=torch.int64)
    for first in range(0, flat.shape[1], block):
        counts += flat[:, first : first + block].sum(-1)
    return counts


def _pixel_count(value, where: str) -> int:
    """One side of a size: an int >= 1, or a float holding one (a float tensor of sizes); errors name `where`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must hold two ints (height, width), got {_describe(value)} in it.")
    if not isinstance(value, numbers.Integral):
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"{where} must hold whole numbers of pixels, got {value!r}.")
        value = int(number)
    if value < 1:
        raise ValueError(f"{where} must hold sizes of at least 1 pixel, got {int(value)}.")
    return int(value)


def _sizes(values, batch_size: int, name: str) -> list[tuple[int, int] | None]:
    """
    `values`: None, or one `(height, width)` per image (a list / tuple of pairs, or a `(batch, 2)` tensor or array).

    Raises:
        TypeError: not a sequence of pairs (a single pair for one image included: wrap it in a list) or sizes that
            are not numbers.
        ValueError: a count other than `batch_size`, a pair of another length, a tensor of another shape, sizes < 1
            or fractional.
    """
    if values is None:
        return [None] * batch_size
    if torch.is_tensor(values) or isinstance(values, np.ndarray):
        if values.ndim != 2 or values.shape[-1] != 2:
            raise ValueError(
                f"{name} must have shape (batch, 2), one (height, width) row per image, got shape {tuple(values.shape)}."
            )
        rows = values.tolist()
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        rows = list(values)
    else:
        raise TypeError(f"{name} must be a list of (height, width) pairs, one per image, got {_describe(values)}.")
    sizes: list[tuple[int, int] | None] = []
    for position, size in enumerate(rows):
        where = f"{name}[{position}]"
        if torch.is_tensor(size) or isinstance(size, np.ndarray):
            size = size.tolist()
        if not isinstance(size, Sequence) or isinstance(size, (str, bytes)):
            raise TypeError(
                f"{where} must be a (height, width) pair, got {_describe(size)}: {name} takes one pair per image, e.g. [(480, 640)]."
            )
        if len(size) != 2:
            raise ValueError(
                f"{where} must be a (height, width) pair, got {len(size)} values: {_short_repr.repr(size)}."
            )
        sizes.append((_pixel_count(size[0], where), _pixel_count(size[1], where)))
    if len(sizes) != batch_size:
        raise ValueError(f"{name} needs one (height, width) per image: {batch_size} images, got {len(sizes)}.")
    return sizes


class SegmentInfo(TypedDict):
    """One entry of `post_process_panoptic_segmentation`'s `segments_info` (a plain dict at run time)."""

    id: int
    label_id: int
    was_fused: bool
    score: float


class PosSAMPostProcessingMixin:
    """Post-processing methods of `PosSAMImageProcessor` and `PosSAMImageProcessorPil`."""

    # set by the image processor this mixin is part of: SAM's padded input size (a SizeDict once the processor is
    # built, a dict when assigned later) and PosSAM's default MASE weights
    pad_size: dict[str, int] | SizeDict
    mase_alpha: float
    mase_beta: float
    # SAM's resize rule, which `_derived_reshaped_size` replays: longest side -> size["longest_edge"] when do_resize,
    # then bottom/right padding to pad_size when do_pad
    size: dict[str, int] | SizeDict
    do_resize: bool
    do_pad: bool

    if TYPE_CHECKING:

        def _get_preprocess_shape(self, old_shape: tuple[int, int], longest_edge: int) -> tuple[int, int]:
            """SAM's resized size of an image of `old_shape` (the image processor's method)."""
            ...

    def _padded_size(self) -> tuple[int, int]:
        pad = self.pad_size
        height, width = (pad["height"], pad["width"]) if isinstance(pad, dict) else (pad.height, pad.width)
        if height is None or width is None:
            raise ValueError(
                f"pad_size must give the padded input's height and width, e.g. {{'height': 1024, 'width': 1024}}, "
                f"got {pad}."
            )
        return height, width

    def _resize_steps(
        self, reshaped_size: tuple[int, int] | None, target_size: tuple[int, int] | None
    ) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
        """
        The resize from 1/4 of the padded input to the output, as `[(resize_to, crop_to)]`: bilinear resize to the
        padded size and crop the padding away (when `reshaped_size` is known), then resize to `target_size`.
        """
        steps: list[tuple[tuple[int, int], tuple[int, int] | None]] = []
        if reshaped_size is not None:
            if getattr(self, "do_pad", True):
                steps.append((self._padded_size(), reshaped_size))
            else:  # no padding: the model's input was the resized image itself, which the masks cover entirely
                steps.append((reshaped_size, None))
        if target_size is not None:
            steps.append((target_size, None))
        return steps

    def _derived_reshaped_size(self, target_size: tuple[int, int], position: int) -> tuple[int, int]:
        """
        The resized size inside the padding of an image of `target_size`, by this processor's own rule (the one its
        preprocessing applies): SAM's longest side -> `size["longest_edge"]` (`_get_preprocess_shape`) when
        `do_resize`, else the image's own size. Used when post-processing gets `target_sizes` without
        `reshaped_input_sizes`, so that the padding is cropped away rather than stretched into the image.

        Raises:
            ValueError: `size` has no `longest_edge` (the rule is unknown), or the derived size does not fit
                `pad_size` (the processor could not have produced that input).
        """
        longest_edge = None
        if getattr(self, "do_resize", True):
            size = self.size
            longest_edge = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
            if not longest_edge:
                raise ValueError(
                    f"target_sizes[{position}] = {target_size} given without reshaped_input_sizes, but the image "
                    f"processor's size {size} has no longest_edge, so the resized size inside the padding cannot be "
                    "derived: pass reshaped_input_sizes as the image processor returned them."
                )
            reshaped = self._get_preprocess_shape(target_size, int(longest_edge))
        else:
            reshaped = target_size
        padded = self._padded_size()
        if getattr(self, "do_pad", True) and (reshaped[0] > padded[0] or reshaped[1] > padded[1]):
            raise ValueError(
                f"target_sizes[{position}] = {target_size} given without reshaped_input_sizes: this processor "
                f"({'longest side -> ' + str(longest_edge) if getattr(self, 'do_resize', True) else 'do_resize=False'}) "
                f"would resize such an image to "
                f"{reshaped}, which does not fit its pad_size {padded}, so it cannot have produced the outputs: pass "
                "reshaped_input_sizes as the image processor returned them."
            )
        return reshaped

    def _masks_to_target(
        self,
        masks: torch.Tensor,
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
        writable: bool = False,
    ) -> torch.Tensor:
        """
        `(N, h, w)` logits at 1/4 of the padded input -> `(N, H, W)` after `_resize_steps`. With nothing to resize
        the result is `masks` itself or a crop of it; `writable` makes it a copy then, so that a caller may modify it
        in place without writing into `masks` (a resize always gives a new tensor).
        """
        if masks.shape[0] == 0:
            size = target_size or reshaped_size or tuple(masks.shape[-2:])
            return masks.new_zeros((0, *size))
        resized = False
        for resize_to, crop_to in self._resize_steps(reshaped_size, target_size):
            if tuple(masks.shape[-2:]) != resize_to:
                masks = F.interpolate(masks[None], size=resize_to, mode="bilinear", align_corners=False)[0]
                resized = True
            if crop_to is not None:
                masks = masks[:, : crop_to[0], : crop_to[1]]
        return masks.clone() if writable and not resized else masks

    def _masks_per_chunk(
        self, mask_size: tuple[int, int], reshaped_size: tuple[int, int] | None, target_size: tuple[int, int] | None
    ) -> int:
        """How many masks `_masks_to_target` may resize at once: `RESIZE_CHUNK`, fewer when a full-size map is large."""
        sizes = [mask_size] + [size for size, _ in self._resize_steps(reshaped_size, target_size)]
        largest = max(height * width for height, width in sizes)
        return max(1, min(RESIZE_CHUNK, RESIZE_ELEMENTS // largest))

    def _resampling(
        self,
        mask_size: tuple[int, int],
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
        device: torch.device,
    ) -> tuple[AxisResampling, AxisResampling]:
        """`_resize_steps` per axis, as banded linear maps (rows, cols) for the panoptic assignment."""
        steps = self._resize_steps(reshaped_size, target_size)
        rows, cols = (
            axis_resampling(
                mask_size[axis], tuple((size[axis], crop[axis] if crop else None) for size, crop in steps), str(device)
            )
            for axis in range(2)
        )
        return rows, cols

    def _prepare(self, outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta):
        """
        Checks the arguments every post-processor shares and scores the classes. Returns `(predictions, scores
        (B, Q, K), is_void (B, Q), target sizes, reshaped sizes)` (sizes: one `(height, width)` or None per image).
        """
        predictions = read_outputs(outputs)
        batch_size = predictions.class_queries_logits.shape[0]
        targets = _sizes(target_sizes, batch_size, "target_sizes")
        reshaped = _sizes(reshaped_input_sizes, batch_size, "reshaped_input_sizes")
        padded = self._padded_size()
        if reshaped_input_sizes is None:
            # Mask2Former's habit: target sizes alone. The masks cover the padded input; resizing all of it to the
            # target would stretch the padding into the picture, so the crop is derived from the resize rule
            reshaped = [
                None if target is None else self._derived_reshaped_size(target, position)
                for position, target in enumerate(targets)
            ]
        for position, size in enumerate(reshaped):
            # cropping "to" a size beyond the padding would silently keep the whole padded map
            if size is not None and (size[0] > padded[0] or size[1] > padded[1]):
                raise ValueError(
                    f"reshaped_input_sizes[{position}] = {size} is larger than the padded input {padded}: it is the resized "
                    "image's size inside the padding, as the image processor returns it in reshaped_input_sizes."
                )
        scores, is_void = class_scores(
            predictions,
            seen_mask=seen_mask,
            use_mase=use_mase,
            alpha=self.mase_alpha if mase_alpha is None else mase_alpha,
            beta=self.mase_beta if mase_beta is None else mase_beta,
        )
        return predictions, scores, is_void, targets, reshaped

    def post_process_panoptic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8,
        label_ids_to_fuse: Iterable[int] | None = None,
        seen_mask: torch.Tensor | None = None,
        use_mase: bool = True,
        reshaped_input_sizes: list[tuple[int, int]] | None = None,
        mase_alpha: float | None = None,
        mase_beta: float | None = None,
        dense_assignment: bool | None = None,
    ) -> list[dict]:
        """
        Mask2Former / FC-CLIP panoptic inference, vectorized over queries and pixels:

        1. keep the non-void queries whose score exceeds `threshold` (FC-CLIP uses 0.0);
        2. only the kept masks are upsampled, cropped to `reshaped_input_sizes` (the image inside the padding) and
           resized to `target_sizes` (default: the cropped size); see "Sizes" in the module doc for `target_sizes`
           without `reshaped_input_sizes`;
        3. each pixel goes to the kept query with the largest score * mask probability;
        4. a query becomes a segment when its pixels with probability >= `mask_threshold` are non-empty and cover at
           least `overlap_mask_area_threshold` of its own mask;
        5. segments of a class in `label_ids_to_fuse` (the stuff classes; `PosSAMProcessor` fills them from the
           vocabulary) share one id.

        Two implementations give the same segmentation (up to float rounding where two scores, or a probability and
        `mask_threshold`, are within about 1e-6), chosen by `dense_assignment`:

        - `False` (the default on CPU): the cell-bound assignment of `mask_resampling`, which upsamples only the
          kept masks' undecided cells; it reads values on the host (which queries are kept, which cells are
          undecided), cheap on CPU;
        - `True` (the default on other devices): every query's mask upsampled a chunk at a time on the device with
          fixed shapes (non-kept queries masked out rather than indexed away), segment ids and fusion computed there
          too, and the finished results of the whole batch fetched in one device-to-host transfer: no other host
          synchronization, so the GPU's queue never drains in between.

        Returns per image `{"segmentation": (H, W) int32 segment ids (0 = no segment), "segments_info": [{"id",
        "label_id", "was_fused", "score"}]}`.

        Raises:
            TypeError: a threshold that is not a number, `use_mase` not a bool, `dense_assignment` neither a bool nor
                None, `label_ids_to_fuse` not a list of ints, sizes / `seen_mask` / `outputs` of the wrong type.
            ValueError: a threshold outside [0, 1] or NaN, a class id outside the outputs' K classes, a `seen_mask`
                of another length than K, sizes < 1 or of another count than the batch, a reshaped size beyond the
                padding, outputs that disagree on the batch or contain NaN (on CUDA by default an asynchronous device
                assert instead, see `value_checks`).
        """
        threshold = check_threshold(threshold, "threshold")
        mask_threshold = check_threshold(mask_threshold, "mask_threshold")
        overlap_mask_area_threshold = check_threshold(overlap_mask_area_threshold, "overlap_mask_area_threshold")
        if dense_assignment is not None:
            dense_assignment = check_flag(dense_assignment, "dense_assignment")
        predictions, scores, is_void, targets, reshaped = self._prepare(
            outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta
        )
        fuse = set(_class_ids(label_ids_to_fuse, "label_ids_to_fuse", predictions.num_classes) or ())
        masks = predictions.masks_queries_logits
        if dense_assignment is None:
            dense_assignment = masks.device.type != "cpu"
        if dense_assignment:
            return self._panoptic_dense(
                masks, scores, is_void, fuse, threshold, mask_threshold, overlap_mask_area_threshold, targets, reshaped
            )
        results = []
        for index, mask_logits in enumerate(predictions.masks_queries_logits):
            query_scores, query_labels = scores[index].max(-1)
            keep = (~is_void[index]) & (query_scores > threshold)
            rows, cols = self._resampling(
                tuple(mask_logits.shape[-2:]), reshaped[index], targets[index], mask_logits.device
            )
            height, width = rows.size, cols.size
            if not keep.any():
                candidates = query_scores[~is_void[index]]
                if threshold > 0 and bool((candidates > 0).any()):
                    _warn_if_threshold_removed_everything(
                        "post_process_panoptic_segmentation", threshold, float(candidates.max())
                    )
                results.append({"segmentation": torch.zeros(height, width, dtype=torch.int32), "segments_info": []})
                continue
            kept_scores, kept_labels = query_scores[keep], query_labels[keep]
            kept_logits = mask_logits if bool(keep.all()) else mask_logits[keep]  # no copy when every query is kept
            assignment = assign_panoptic(
                kept_logits.float().contiguous(), kept_scores, mask_threshold, rows, cols, overlap_mask_area_threshold
            )
            count = kept_scores.shape[0]
            valid = assignment.is_segment

            segment_of_query = [0] * count
            segments_info: list[SegmentInfo] = []
            stuff_segment: dict[int, SegmentInfo] = {}
            for query, (is_valid, label, score) in enumerate(
                zip(valid.tolist(), kept_labels.tolist(), kept_scores.tolist())
            ):
                if not is_valid:
                    continue
                if label in fuse and label in stuff_segment:
                    segment = stuff_segment[label]
                    segment_of_query[query] = segment["id"]
                    segment["was_fused"] = True
                    continue
                segment = {
                    "id": len(segments_info) + 1,
                    "label_id": label,
                    "was_fused": False,
                    "score": round(score, 6),
                }
                segments_info.append(segment)
                segment_of_query[query] = segment["id"]
                if label in fuse:
                    stuff_segment[label] = segment
            lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_logits.device)
            segmentation = assignment.label_map(lookup, rows, cols)
            results.append({"segmentation": segmentation.cpu(), "segments_info": segments_info})
        return results

    def _panoptic_dense(
        self,
        masks: torch.Tensor,
        scores: torch.Tensor,
        is_void: torch.Tensor,
        fuse: set[int],
        threshold: float,
        mask_threshold: float,
        overlap_mask_area_threshold: float,
        targets: list[tuple[int, int] | None],
        reshaped: list[tuple[int, int] | None],
    ) -> list[dict]:
        """
        `post_process_panoptic_segmentation` without host synchronization: `(B, Q, h, w)` mask logits, `(B, Q, K)`
        scores, `(B, Q)` void flags. Every shape depends on the arguments only; the results of all images travel to
        the host in one int32 buffer (scores as their float32 bits), from which `segments_info` is built.
        """
        device = masks.device
        num_queries, num_classes = scores.shape[1:]
        # made on the host and copied without waiting: `flags[device_index] = True` on a GPU copies the value True
        # (a 0-dim host tensor) over with a blocking copy
        is_fuse_label = torch.zeros(num_classes, dtype=torch.bool)
        is_fuse_label[sorted(fuse)] = True
        is_fuse_label = to_device(is_fuse_label, device)
        parts, layouts = [], []
        for index, mask_logits in enumerate(masks):
            query_scores, query_labels = scores[index].max(-1)
            keep = (~is_void[index]) & (query_scores > threshold)
            segmentation, segment_of_query = self._dense_segments(
                mask_logits,
                query_scores,
                query_labels,
                keep,
                is_fuse_label,
                mask_threshold,
                overlap_mask_area_threshold,
                reshaped[index],
                targets[index],
            )
            # for the warning of a threshold that removed everything: was anything kept, the best non-void score
            candidates = torch.where(is_void[index], 0.0, query_scores)
            best_candidate = torch.cat([candidates, candidates.new_zeros(1)]).amax()  # 0 when there is no query
            flags = torch.stack([keep.any().int(), best_candidate.float().view(torch.int32)])
            parts += [
                segmentation.flatten(),
                segment_of_query,
                query_labels.int(),
                query_scores.float().view(torch.int32),
                flags,
            ]
            layouts.append(tuple(segmentation.shape))
        host = _fetch_to_host(torch.cat(parts))  # the one transfer (a host synchronization on a GPU)

        results, offset = [], 0
        for height, width in layouts:
            pieces = []
            for length in (height * width, num_queries, num_queries, num_queries, 2):
                pieces.append(host[offset : offset + length])
                offset += length
            host_map, host_segment_of_query, host_labels, host_score_bits, host_flags = pieces
            host_scores = host_score_bits.view(np.float32)
            if not host_flags[0] and threshold > 0:
                best = float(host_flags[1:].view(np.float32)[0])
                if best > 0:
                    _warn_if_threshold_removed_everything("post_process_panoptic_segmentation", threshold, best)
            segments_info: list[SegmentInfo] = []
            by_id: dict[int, SegmentInfo] = {}
            for query in range(num_queries):  # ids were given in query order: the first query of an id opens it
                segment_id = int(host_segment_of_query[query])
                if segment_id == 0:
                    continue
                if segment_id in by_id:
                    by_id[segment_id]["was_fused"] = True
                    continue
                by_id[segment_id] = {
                    "id": segment_id,
                    "label_id": int(host_labels[query]),
                    "was_fused": False,
                    "score": round(float(host_scores[query]), 6),
                }
                segments_info.append(by_id[segment_id])
            results.append(
                {"segmentation": torch.from_numpy(host_map.reshape(height, width)), "segments_info": segments_info}
            )
        return results

    def _dense_segments(
        self,
        mask_logits: torch.Tensor,
        query_scores: torch.Tensor,
        query_labels: torch.Tensor,
        keep: torch.Tensor,
        is_fuse_label: torch.Tensor,
        mask_threshold: float,
        overlap_mask_area_threshold: float,
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        One image of the sync-free panoptic inference: `(Q, h, w)` mask logits, `(Q,)` best class scores and labels,
        `(Q,)` kept queries, `(K,)` stuff classes to fuse. Returns `((H, W) int32 segment ids, (Q,) int32 segment id
        of each query (0: no segment))`.
        """
        num_queries = mask_logits.shape[0]
        if num_queries == 0:  # no query, no segment: an empty map of the output size
            empty = self._masks_to_target(mask_logits.float(), reshaped_size, target_size)
            return torch.zeros(empty.shape[-2:], dtype=torch.int32, device=mask_logits.device), keep.int()
        # the running argmax over queries of score * probability (non-kept queries at -1: below every kept one, so
        # they never win while any query is kept)
        kept_score = torch.where(keep, query_scores.float(), 0.0)
        kept_offset = torch.where(keep, 0.0, -1.0).float()
        best_query, best_probability, own_area = self._pixel_assignment(
            mask_logits, kept_score, kept_offset, mask_threshold, reshaped_size, target_size
        )
        won = keep[best_query]  # False everywhere when no query is kept
        inside = won & (best_probability >= mask_threshold)
        # pixels won by each query, and those of them inside its mask; a pixel no query wins (none kept) counts for
        # the extra id `num_queries`, which `_pixels_per_query` leaves out
        assigned_area = _pixels_per_query(torch.where(won, best_query, num_queries).flatten(), num_queries)
        segment_area = _pixels_per_query(torch.where(inside, best_query, num_queries).flatten(), num_queries)
        is_segment = (
            keep & (segment_area > 0) & (own_area > 0) & (assigned_area >= overlap_mask_area_threshold * own_area)
        )
        # segment ids in query order; a segment of a fused (stuff) class joins the first segment of its class
        same_class = is_segment[None, :] & (query_labels[None, :] == query_labels[:, None])  # [query, other query]
        order = torch.arange(num_queries, device=keep.device)
        joins_earlier = (
            is_segment & is_fuse_label[query_labels] & (same_class & (order[None, :] < order[:, None])).any(1)
        )
        opens = is_segment & ~joins_earlier
        opened_id = torch.cumsum(opens.int(), 0, dtype=torch.int32)
        first_of_class = same_class.int().argmax(1)  # the first segment of the query's class (itself if it opens)
        segment_of_query = torch.where(
            opens, opened_id, torch.where(joins_earlier, opened_id[first_of_class], 0)
        ).int()
        segmentation = torch.where(inside, segment_of_query[best_query], 0).int()
        return segmentation, segment_of_query

    def _pixel_assignment(
        self,
        mask_logits: torch.Tensor,
        kept_score: torch.Tensor,
        kept_offset: torch.Tensor,
        mask_threshold: float,
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        The per-pixel part of `_dense_segments`: for `(Q, h, w)` mask logits resized to the output
        (`_masks_to_target`) and passed through the sigmoid, each pixel's query with the highest `kept_offset +
        kept_score * probability` (strict comparisons: the first query of a tie, argmax's rule) and its probability
        there, and each query's own area (pixels with probability >= `mask_threshold`). Returns `((H, W) int64
        query, (H, W) float32 probability, (Q,) int64 areas)`.

        On CUDA with Triton (`assigns_pixels_with_triton`) one fused kernel, `pixel_assignment_triton`, which never
        writes a `(Q, H, W)` map and applies the resize chain as one composed map per axis (the same values to float32
        rounding: on an H200 the post-processing of 8 PosSAM-B 1024x1024 outputs took 23.4 against 59.7 ms, and 4 of
        their 8.4M pixels, near-ties between two queries, went to the other query); elsewhere
        `_pixel_assignment_by_chunks`.
        """

        def by_chunks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return self._pixel_assignment_by_chunks(
                mask_logits, kept_score, kept_offset, mask_threshold, reshaped_size, target_size
            )

        if self.assigns_pixels_with_triton(mask_logits):
            # (the PyTorch path where the kernel cannot be built on this machine, `launch_or_fall_back`)
            return launch_or_fall_back(
                ("pixel_assignment_triton", str(mask_logits.device), mask_logits.dtype),
                lambda: pixel_assignment_triton(
                    mask_logits,
                    kept_score,
                    kept_offset,
                    self._resize_steps(reshaped_size, target_size),
                    mask_threshold,
                ),
                by_chunks,
            )
        return by_chunks()

    @staticmethod
    def assigns_pixels_with_triton(mask_logits: torch.Tensor) -> bool:
        """Whether `_pixel_assignment` runs the Triton kernel for these `(Q, h, w)` logits: on CUDA with Triton
        installed, outside autograd, `torch.compile` traces and fake tensors (the kernel has neither a backward nor a
        meta function)."""
        return (
            mask_logits.device.type == "cuda"
            and triton_runs_on(mask_logits.device)
            and not is_fake(mask_logits)
            and not (torch.is_grad_enabled() and mask_logits.requires_grad)
            and not torch.compiler.is_compiling()
        )

    def _pixel_assignment_by_chunks(
        self,
        mask_logits: torch.Tensor,
        kept_score: torch.Tensor,
        kept_offset: torch.Tensor,
        mask_threshold: float,
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_pixel_assignment` in PyTorch: `_masks_per_chunk` masks at a time resized with `F.interpolate` step by
        step (`_masks_to_target`), the running argmax merged between chunks."""
        num_queries = mask_logits.shape[0]
        mask_size = (mask_logits.shape[-2], mask_logits.shape[-1])
        chunk = self._masks_per_chunk(mask_size, reshaped_size, target_size)
        best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (value, query, probability) per pixel
        own_areas = []
        for first in range(0, num_queries, chunk):
            # writable: with nothing to resize, `.float()` of float32 logits is the caller's tensor, which the
            # in-place sigmoid must not write into
            probabilities = self._masks_to_target(
                mask_logits[first : first + chunk].float(), reshaped_size, target_size, writable=True
            ).sigmoid_()
            part = slice(first, first + chunk)
            # kept: probability * score (+ 0); not kept: -1 (+ probability * 0); one pass, the same values as
            # `where(keep, probability * score, -1)`
            weighted = torch.addcmul(kept_offset[part, None, None], probabilities, kept_score[part, None, None])
            value, query = weighted.max(0)
            probability = probabilities.gather(0, query[None])[0]
            own_areas.append((probabilities >= mask_threshold).flatten(1).sum(-1))
            if best is None:
                best = (value, query, probability)
            else:
                better = value > best[0]
                best = (
                    torch.where(better, value, best[0]),
                    torch.where(better, query + first, best[1]),
                    torch.where(better, probability, best[2]),
                )
        assert best is not None  # num_queries >= 1
        return best[1], best[2], torch.cat(own_areas)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        seen_mask: torch.Tensor | None = None,
        use_mase: bool = True,
        reshaped_input_sizes: list[tuple[int, int]] | None = None,
        mase_alpha: float | None = None,
        mase_beta: float | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        FC-CLIP semantic inference, in FC-CLIP's order: each query's mask logits are resized to the output (cropped to
        `reshaped_input_sizes`, resized to `target_sizes`, as the panoptic masks), *then* passed through the sigmoid,
        then summed per class weighted by the class scores; argmax over classes. (Taking the sigmoid at mask
        resolution and resizing probabilities instead changes the labels of ~2% of pixels.)

        Memory stays bounded: the output is computed in bands of rows (`SEMANTIC_BAND_ELEMENTS` per temporary), each
        band's logits resized with the same bilinear weights as `F.interpolate`, so neither Q full-size masks nor K
        full-size class maps ever exist (unless `return_segmentation_scores` asks for the K class maps: the result).

        Returns per image an `(H, W)` int64 map of class ids (as transformers' semantic post-processors); with no
        query at all every pixel gets class 0 (all class sums are 0). With `return_segmentation_scores=True`, per
        image a [`SemanticSegmentationPostProcessorOutput`] (as Mask2Former's) with `segmentation`, the same
        `(H, W)` map, and `segmentation_scores` `(K, H, W)` float32: each class's score at each pixel,
        sum_q score[q, k] * sigmoid(resized mask logits of q), whose argmax over K is `segmentation`. (H, W) is the
        target size, else the reshaped size, else the mask logits' size.

        Raises:
            TypeError: `return_segmentation_scores` not a bool, and as `post_process_panoptic_segmentation` for the
                arguments shared with it.
            ValueError: as `post_process_panoptic_segmentation`, for the arguments shared with it.
        """
        return_segmentation_scores = check_flag(return_segmentation_scores, "return_segmentation_scores")
        predictions, scores, _, targets, reshaped = self._prepare(
            outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta
        )
        results: list = []  # of tensors, or of SemanticSegmentationPostProcessorOutput
        for index, mask_logits in enumerate(predictions.masks_queries_logits):
            labels, class_maps = self._semantic_labels(
                mask_logits.float(), scores[index], reshaped[index], targets[index], return_segmentation_scores
            )
            if class_maps is not None:
                results.append(
                    SemanticSegmentationPostProcessorOutput(
                        data={"segmentation": labels.cpu(), "segmentation_scores": class_maps.cpu()}
                    )
                )
            else:
                results.append(labels.cpu())
        return results

    def _semantic_labels(
        self,
        mask_logits: torch.Tensor,
        scores: torch.Tensor,
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
        return_class_maps: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        `(Q, h, w)` mask logits, `(Q, K)` scores -> `(H, W)` labels argmax_k sum_q scores[q, k] * sigmoid(resized
        logits), and, with `return_class_maps`, those sums `(K, H, W)` (else None).
        """
        steps = self._resize_steps(reshaped_size, target_size)
        num_queries, height, width = mask_logits.shape
        # the row-resize matrix depends on the sizes only: each band's input rows are read from a copy made on the
        # host (no device synchronization); the device makes its own (a few kernels, where copying the (H, h) matrix
        # over from pageable memory may wait). Their zero patterns are the same: those of F.interpolate's weights.
        row_steps = [(size[0], crop[0] if crop else None) for size, crop in steps]
        host_rows = resize_matrix(height, row_steps, "cpu")
        rows = host_rows if mask_logits.device.type == "cpu" else resize_matrix(height, row_steps, mask_logits.device)
        column_steps = [(size[1], crop[1] if crop else None) for size, crop in steps]
        out_height = host_rows.shape[0]
        out_width = _resize_last_axis(mask_logits.new_zeros(1, 1, width), column_steps).shape[-1]
        labels = torch.empty(out_height, out_width, dtype=torch.int64, device=mask_logits.device)
        class_maps_out = (
            torch.empty(scores.shape[-1], out_height, out_width, dtype=torch.float32, device=mask_logits.device)
            if return_class_maps
            else None
        )
        # the column resize passes through the padded width before the crop: size bands by the widest step
        widest = max([out_width, width] + [size for size, _ in column_steps])
        band = max(1, SEMANTIC_BAND_ELEMENTS // (max(num_queries, scores.shape[-1], 1) * widest))
        for first, low, high in _row_bands(host_rows, band):
            # this band's rows, resized along the rows with F.interpolate's weights, then along the columns
            band_logits = torch.einsum("bh,qhw->qbw", rows[first : first + band, low:high], mask_logits[:, low:high])
            probabilities = _resize_last_axis(band_logits, column_steps).sigmoid()
            class_maps = torch.einsum("qk,qbw->kbw", scores, probabilities)
            labels[first : first + band] = class_maps.argmax(0)
            if class_maps_out is not None:
                class_maps_out[:, first : first + band] = class_maps
        return labels, class_maps_out

    def post_process_instance_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        threshold: float = 0.0,
        mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float | None = None,
        num_top_instances: int = 100,
        thing_label_ids: Iterable[int] | None = None,
        seen_mask: torch.Tensor | None = None,
        use_mase: bool = True,
        reshaped_input_sizes: list[tuple[int, int]] | None = None,
        return_binary_maps: bool = False,
        mase_alpha: float | None = None,
        mase_beta: float | None = None,
    ) -> list[dict]:
        """
        FC-CLIP instance inference: the top `num_top_instances` (query, class) pairs over the whole Q x K score matrix
        (all of them when there are fewer), then only those of `thing_label_ids` (when given: FC-CLIP's panoptic-on
        branch; an empty list keeps none), binary masks = pixels whose probability exceeds `mask_threshold` (FC-CLIP:
        logits > 0, i.e. 0.5), score = class score * mean mask probability inside the mask, kept above `threshold` (a
        pair with an empty mask scores 0). `overlap_mask_area_threshold` is accepted because transformers'
        image-segmentation pipeline passes it to every post-processor, and has no effect here (instances may overlap:
        nothing competes for pixels); a value other than None logs a warning saying so. Returns per image
        `{"segmentation": (H, W) int32 (0 = none; higher scores painted last), "segments_info": [{"id", "label_id",
        "was_fused", "score"}]}` and, with `return_binary_maps`, `"binary_masks"` `(N, H, W)` bool in
        `segments_info` order (no instance: `segments_info` is empty and `binary_masks` has shape `(0, H, W)`).

        Memory stays bounded: masks are resized a few at a time (one at a time for large outputs, `RESIZE_ELEMENTS`)
        and the segmentation is painted query by query; only `return_binary_maps` holds N full-size masks (the
        result itself).

        Raises:
            TypeError: `num_top_instances` not an int, `return_binary_maps` not a bool, `thing_label_ids` not a
                list of ints, and as `post_process_panoptic_segmentation`.
            ValueError: `num_top_instances` < 1, a thing id outside the outputs' K classes, and as
                `post_process_panoptic_segmentation`.
        """
        threshold = check_threshold(threshold, "threshold")
        mask_logit = _instance_mask_logit(check_threshold(mask_threshold, "mask_threshold"))
        if overlap_mask_area_threshold is not None:
            check_threshold(overlap_mask_area_threshold, "overlap_mask_area_threshold")
            logger.warning_once(
                "post_process_instance_segmentation: overlap_mask_area_threshold has no effect on instance "
                "segmentation (instances may overlap, so no pixel is contested; Mask2Former's processor ignores it "
                "too). It is used by post_process_panoptic_segmentation."
            )
        num_top_instances = _check_positive_int(num_top_instances, "num_top_instances")
        return_binary_maps = check_flag(return_binary_maps, "return_binary_maps")
        predictions, scores, _, targets, reshaped = self._prepare(
            outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta
        )
        thing_ids = _class_ids(thing_label_ids, "thing_label_ids", predictions.num_classes)
        return [
            self._instances(
                mask_logits,
                scores[index],
                thing_ids,
                threshold,
                mask_logit,
                num_top_instances,
                reshaped[index],
                targets[index],
                return_binary_maps,
            )
            for index, mask_logits in enumerate(predictions.masks_queries_logits)
        ]

    def _instances(
        self,
        mask_logits: torch.Tensor,
        scores: torch.Tensor,
        thing_ids: list[int] | None,
        threshold: float,
        mask_logit: float,
        num_top_instances: int,
        reshaped_size: tuple[int, int] | None,
        target_size: tuple[int, int] | None,
        return_binary_maps: bool,
    ) -> dict:
        """One image of `post_process_instance_segmentation`: `(Q, h, w)` mask logits, `(Q, K)` class scores."""
        num_classes = scores.shape[-1]
        # FC-CLIP's order: the top `num_top_instances` of all (query, class) pairs, *then* only thing classes
        # (filtering first would give more thing detections than FC-CLIP and bias AP)
        top_scores, top_index = scores.flatten().topk(min(num_top_instances, scores.numel()))
        queries, labels = top_index // num_classes, top_index % num_classes
        if thing_ids is not None:
            is_thing = torch.zeros(num_classes, dtype=torch.bool, device=scores.device)
            is_thing.index_fill_(0, to_device(torch.tensor(thing_ids, dtype=torch.long), scores.device), True)
            selected = is_thing[labels].nonzero().flatten()  # one read of the device for the three selections
            top_scores, queries, labels = top_scores[selected], queries[selected], labels[selected]
        # a query can hold several selected pairs (several top classes): its mask is resized once per pass
        unique_queries, mask_of_pair = torch.unique(queries, return_inverse=True)
        height, width = target_size or reshaped_size or tuple(mask_logits.shape[-2:])
        chunk = self._masks_per_chunk((mask_logits.shape[-2], mask_logits.shape[-1]), reshaped_size, target_size)

        def resized(slots: list[int]) -> torch.Tensor:
            """`(n, H, W)` float32 logits of the unique queries `slots`, resized to the output."""
            # indexing copies: the result never shares memory with the outputs, so callers may modify it in place
            return self._masks_to_target(mask_logits[unique_queries[slots]].float(), reshaped_size, target_size)

        # pass 1: each query's mean probability inside its binary mask, and the mask's area
        keep_binaries = len(unique_queries) * height * width <= INSTANCE_MASK_BYTES
        mask_scores, mask_areas, kept_binaries = [], [], []
        for first in range(0, len(unique_queries), chunk):
            logits = resized(list(range(first, min(first + chunk, len(unique_queries)))))
            binary = logits > mask_logit
            area = _count_true(binary)
            # sigmoid(x) * binary in place (`resized` returns a new tensor): x * 1 == x and x * 0 == 0 exactly
            inside_sum = logits.sigmoid_().masked_fill_(~binary, 0).flatten(1).sum(-1)
            del logits  # freed before the next chunk is resized: one chunk of float maps at a time
            mask_scores.append(inside_sum / (area + 1e-6))
            mask_areas.append(area)
            if keep_binaries:
                kept_binaries.append(binary)
        if mask_scores:
            mask_score, mask_area = torch.cat(mask_scores), torch.cat(mask_areas)
        else:
            mask_score, mask_area = top_scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=scores.device)
        final_scores = top_scores * mask_score[mask_of_pair]
        keep = (final_scores > threshold) & (mask_area[mask_of_pair] > 0)
        if threshold > 0 and not bool(keep.any()):
            scored = final_scores[(final_scores > 0) & (mask_area[mask_of_pair] > 0)]
            if scored.numel():
                _warn_if_threshold_removed_everything(
                    "post_process_instance_segmentation", threshold, float(scored.max())
                )
        order = torch.nonzero(keep).flatten()
        order = order[final_scores[order].argsort(descending=True)]  # pair indices, best first
        # read in two transfers, not two per instance (each a device synchronization on a GPU)
        segments_info = [
            {"id": rank + 1, "label_id": label, "was_fused": False, "score": round(score, 6)}
            for rank, (label, score) in enumerate(zip(labels[order].tolist(), final_scores[order].tolist()))
        ]

        # pass 2: paint. Painting every pair from the last rank to the first leaves each pixel its best rank; pairs of
        # one query share its mask, so painting each query once with its best rank, worst first, gives the same map
        device = mask_logits.device
        segmentation = torch.zeros(height, width, dtype=torch.int32, device=device)
        binary_masks = (
            torch.empty(len(order), height, width, dtype=torch.bool, device=device) if return_binary_maps else None
        )
        ranks_of_slot: dict[int, list[int]] = {}
        for rank, slot in enumerate(mask_of_pair[order].tolist()):
            ranks_of_slot.setdefault(slot, []).append(rank)
        slots_worst_first = sorted(ranks_of_slot, key=lambda slot: ranks_of_slot[slot][0], reverse=True)

        def painted_binaries():
            """`(slot, (H, W) bool mask)` of each painted query, worst best-rank first."""
            if keep_binaries:  # pass 1's masks: chunk `slot // chunk`, row `slot % chunk` (views, no copy)
                for slot in slots_worst_first:
                    yield slot, kept_binaries[slot // chunk][slot % chunk]
                return
            # resized again, a chunk at a time, rather than N full-size masks held since pass 1
            for first in range(0, len(slots_worst_first), chunk):
                part = slots_worst_first[first : first + chunk]
                yield from zip(part, resized(part) > mask_logit)  # the float maps are freed by the comparison

        for slot, binary in painted_binaries():
            segmentation.masked_fill_(binary, ranks_of_slot[slot][0] + 1)
            if binary_masks is not None:
                for rank in ranks_of_slot[slot]:
                    binary_masks[rank] = binary
        result = {"segmentation": segmentation.cpu(), "segments_info": segments_info}
        if binary_masks is not None:
            result["binary_masks"] = binary_masks.cpu()
        return result
