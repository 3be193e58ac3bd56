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
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.nn import functional as F

from .mase import mask_aware_selective_ensemble
from .mask_resampling import AxisResampling, assign_panoptic, axis_resampling, resize_matrix

__all__ = ["PosSAMPostProcessingMixin", "class_scores", "check_ensemble_weight"]

# class maps (semantic) or masks (instance) resized at once: bounds memory to this many full-size float maps
RESIZE_CHUNK = 16
# elements of one temporary of the semantic inference's row bands (queries x band rows x output width)
SEMANTIC_BAND_ELEMENTS = 2**23
# FC-CLIP's log(p + 1e-8) before its inference softmax
FCCLIP_LOG_EPSILON = 1e-8


def check_ensemble_weight(value, name: str) -> float:
    """MASE / geometric-ensemble weights are exponents of a geometric mean: a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (CLIP's weight in the ensemble), got {value!r}.")
    return float(value)


def class_scores(
    outputs, seen_mask: torch.Tensor | None = None, use_mase: bool = True, alpha: float = 0.4, beta: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Returns `(scores, is_void)`: `(B, Q, K)` class scores and `(B, Q)` bool void flags (rules in the module doc).
    `seen_mask` `(K,)` defaults to all classes seen; `alpha` / `beta` weigh CLIP on seen / unseen classes.
    """
    alpha, beta = check_ensemble_weight(alpha, "mase_alpha"), check_ensemble_weight(beta, "mase_beta")
    logits = outputs.class_queries_logits.float()
    num_classes = logits.shape[-1] - 1
    void_prob = logits.softmax(-1)[..., num_classes]
    ldp_probs = logits[..., :num_classes].softmax(-1)
    if seen_mask is None:
        seen_mask = torch.ones(num_classes, dtype=torch.bool, device=logits.device)
    clip_logits = getattr(outputs, "clip_class_logits", None)
    if not use_mase:
        if clip_logits is None:
            ensemble = ldp_probs
        else:
            ensemble = mask_aware_selective_ensemble(ldp_probs, clip_logits.float().softmax(-1), None, seen_mask, alpha, beta)
        return _fcclip_class_probabilities(ensemble, void_prob)
    iou = outputs.iou_scores.float() if getattr(outputs, "iou_scores", None) is not None else None
    if clip_logits is None:
        ensemble = ldp_probs * iou.unsqueeze(-1) if iou is not None else ldp_probs
    else:
        ensemble = mask_aware_selective_ensemble(ldp_probs, clip_logits.float().softmax(-1), iou, seen_mask, alpha, beta)
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


def _sizes(values, batch_size: int, name: str) -> list[tuple[int, int] | None]:
    if values is None:
        return [None] * batch_size
    values = [tuple(int(v) for v in size) for size in (values.tolist() if torch.is_tensor(values) else values)]
    if len(values) != batch_size:
        raise ValueError(f"{name} needs one (height, width) per image: {batch_size} images, got {len(values)}.")
    return values


class PosSAMPostProcessingMixin:
    """Post-processing methods of `PosSAMImageProcessor` and `PosSAMImageProcessorPil`."""

    def _padded_size(self) -> tuple[int, int]:
        pad = self.pad_size
        return (pad["height"], pad["width"]) if isinstance(pad, dict) else (pad.height, pad.width)

    def _resize_steps(self, reshaped_size, target_size) -> list[tuple[tuple[int, int], tuple[int, int] | None]]:
        """
        The resize from 1/4 of the padded input to the output, as `[(resize_to, crop_to)]`: bilinear resize to the
        padded size and crop the padding away (when `reshaped_size` is known), then resize to `target_size`.
        """
        steps = []
        if reshaped_size is not None:
            steps.append((self._padded_size(), tuple(reshaped_size)))
        if target_size is not None:
            steps.append((tuple(target_size), None))
        return steps

    def _masks_to_target(self, masks: torch.Tensor, reshaped_size, target_size) -> torch.Tensor:
        """`(N, h, w)` logits at 1/4 of the padded input -> `(N, H, W)` after `_resize_steps`."""
        if masks.shape[0] == 0:
            size = target_size or reshaped_size or tuple(masks.shape[-2:])
            return masks.new_zeros((0, *size))
        for resize_to, crop_to in self._resize_steps(reshaped_size, target_size):
            if tuple(masks.shape[-2:]) != resize_to:
                masks = F.interpolate(masks[None], size=resize_to, mode="bilinear", align_corners=False)[0]
            if crop_to is not None:
                masks = masks[:, : crop_to[0], : crop_to[1]]
        return masks

    def _resampling(self, mask_size, reshaped_size, target_size, device) -> tuple[AxisResampling, AxisResampling]:
        """`_resize_steps` per axis, as banded linear maps (rows, cols) for the panoptic assignment."""
        steps = self._resize_steps(reshaped_size, target_size)
        rows, cols = (
            axis_resampling(mask_size[axis], tuple((size[axis], crop[axis] if crop else None) for size, crop in steps), str(device))
            for axis in range(2)
        )
        return rows, cols

    def _prepare(self, outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta):
        batch_size = outputs.masks_queries_logits.shape[0]
        scores, is_void = class_scores(
            outputs,
            seen_mask=seen_mask,
            use_mase=use_mase,
            alpha=self.mase_alpha if mase_alpha is None else mase_alpha,
            beta=self.mase_beta if mase_beta is None else mase_beta,
        )
        return scores, is_void, _sizes(target_sizes, batch_size, "target_sizes"), _sizes(reshaped_input_sizes, batch_size, "reshaped_input_sizes")

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
    ) -> list[dict]:
        """
        Mask2Former / FC-CLIP panoptic inference, vectorized over queries and pixels:

        1. keep the non-void queries whose score exceeds `threshold` (FC-CLIP uses 0.0);
        2. only the kept masks are upsampled, cropped to `reshaped_input_sizes` (the image inside the padding) and
           resized to `target_sizes` (default: the cropped size);
        3. each pixel goes to the kept query with the largest score * mask probability;
        4. a query becomes a segment when its pixels with probability >= `mask_threshold` are non-empty and cover at
           least `overlap_mask_area_threshold` of its own mask;
        5. segments of a class in `label_ids_to_fuse` (the stuff classes; `PosSAMProcessor` fills them from the
           vocabulary) share one id.

        Returns per image `{"segmentation": (H, W) int32 segment ids (0 = no segment), "segments_info": [{"id",
        "label_id", "was_fused", "score"}]}`.
        """
        scores, is_void, targets, reshaped = self._prepare(outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta)
        fuse = set(int(i) for i in label_ids_to_fuse) if label_ids_to_fuse is not None else set()
        results = []
        for index, mask_logits in enumerate(outputs.masks_queries_logits):
            query_scores, query_labels = scores[index].max(-1)
            keep = (~is_void[index]) & (query_scores > threshold)
            rows, cols = self._resampling(tuple(mask_logits.shape[-2:]), reshaped[index], targets[index], mask_logits.device)
            height, width = rows.size, cols.size
            if not keep.any():
                results.append({"segmentation": torch.zeros(height, width, dtype=torch.int32), "segments_info": []})
                continue
            kept_scores, kept_labels = query_scores[keep], query_labels[keep]
            kept_logits = mask_logits if bool(keep.all()) else mask_logits[keep]  # no copy when every query is kept
            assignment = assign_panoptic(kept_logits.float().contiguous(), kept_scores, mask_threshold, rows, cols, overlap_mask_area_threshold)
            count = kept_scores.shape[0]
            valid = assignment.is_segment

            segment_of_query = [0] * count
            segments_info, stuff_segment = [], {}
            for query, (is_valid, label, score) in enumerate(zip(valid.tolist(), kept_labels.tolist(), kept_scores.tolist())):
                if not is_valid:
                    continue
                if label in fuse and label in stuff_segment:
                    segment = stuff_segment[label]
                    segment_of_query[query] = segment["id"]
                    segment["was_fused"] = True
                    continue
                segment = {"id": len(segments_info) + 1, "label_id": label, "was_fused": False, "score": round(score, 6)}
                segments_info.append(segment)
                segment_of_query[query] = segment["id"]
                if label in fuse:
                    stuff_segment[label] = segment
            lookup = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_logits.device)
            segmentation = assignment.label_map(lookup, rows, cols)
            results.append({"segmentation": segmentation.cpu(), "segments_info": segments_info})
        return results

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        seen_mask: torch.Tensor | None = None,
        use_mase: bool = True,
        reshaped_input_sizes: list[tuple[int, int]] | None = None,
        mase_alpha: float | None = None,
        mase_beta: float | None = None,
    ) -> list[torch.Tensor]:
        """
        FC-CLIP semantic inference, in FC-CLIP's order: each query's mask logits are resized to the output (cropped to
        `reshaped_input_sizes`, resized to `target_sizes`, as the panoptic masks), *then* passed through the sigmoid,
        then summed per class weighted by the class scores; argmax over classes. (Taking the sigmoid at mask
        resolution and resizing probabilities instead changes the labels of ~2% of pixels.)

        Memory stays bounded: the output is computed in bands of rows (`SEMANTIC_BAND_ELEMENTS` per temporary), each
        band's logits resized with the same bilinear weights as `F.interpolate`, so neither Q full-size masks nor K
        full-size class maps ever exist. Returns per image an `(H, W)` int64 map of class ids.
        """
        scores, _, targets, reshaped = self._prepare(outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta)
        return [
            self._semantic_labels(mask_logits.float(), scores[index], reshaped[index], targets[index]).cpu()
            for index, mask_logits in enumerate(outputs.masks_queries_logits)
        ]

    def _semantic_labels(self, mask_logits: torch.Tensor, scores: torch.Tensor, reshaped_size, target_size) -> torch.Tensor:
        """`(Q, h, w)` mask logits, `(Q, K)` scores -> `(H, W)` argmax_k sum_q scores[q, k] * sigmoid(resized logits)."""
        steps = self._resize_steps(reshaped_size, target_size)
        num_queries, height, width = mask_logits.shape
        rows = resize_matrix(height, [(size[0], crop[0] if crop else None) for size, crop in steps], mask_logits.device)
        column_steps = [(size[1], crop[1] if crop else None) for size, crop in steps]
        out_height = rows.shape[0]
        out_width = _resize_last_axis(mask_logits.new_zeros(1, 1, width), column_steps).shape[-1]
        labels = torch.empty(out_height, out_width, dtype=torch.int64, device=mask_logits.device)
        # the column resize passes through the padded width before the crop: size bands by the widest step
        widest = max([out_width, width] + [size for size, _ in column_steps])
        band = max(1, SEMANTIC_BAND_ELEMENTS // (max(num_queries, scores.shape[-1], 1) * widest))
        support = rows != 0
        for first in range(0, out_height, band):
            weights = rows[first : first + band]
            used = support[first : first + band].any(0).nonzero().flatten()
            low, high = int(used[0]), int(used[-1]) + 1
            # this band's rows, resized along the rows with F.interpolate's weights, then along the columns
            band_logits = torch.einsum("bh,qhw->qbw", weights[:, low:high], mask_logits[:, low:high])
            probabilities = _resize_last_axis(band_logits, column_steps).sigmoid()
            class_maps = torch.einsum("qk,qbw->kbw", scores, probabilities)
            labels[first : first + band] = class_maps.argmax(0)
        return labels

    def post_process_instance_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        threshold: float = 0.0,
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
        FC-CLIP instance inference: the top `num_top_instances` (query, class) pairs over the whole Q x K score matrix,
        then only those of `thing_label_ids` (when given: FC-CLIP's panoptic-on branch), binary masks = resized
        logits > 0, score = class score * mean mask probability inside the mask, kept above `threshold` (a pair
        with an empty mask scores 0). Returns per image `{"segmentation": (H, W) int32 (0 = none; higher
        scores painted last), "segments_info": [{"id", "label_id", "was_fused", "score"}]}` and, with
        `return_binary_maps`, `"binary_masks"` `(N, H, W)` bool in `segments_info` order.
        """
        scores, _, targets, reshaped = self._prepare(outputs, target_sizes, reshaped_input_sizes, seen_mask, use_mase, mase_alpha, mase_beta)
        num_classes = scores.shape[-1]
        results = []
        for index, mask_logits in enumerate(outputs.masks_queries_logits):
            # FC-CLIP's order: the top `num_top_instances` of all (query, class) pairs, *then* only thing classes
            # (filtering first would give more thing detections than FC-CLIP and bias AP)
            flat = scores[index]
            top_scores, top_index = flat.flatten().topk(min(num_top_instances, flat.numel()))
            queries, labels = top_index // num_classes, top_index % num_classes
            if thing_label_ids is not None:
                is_thing = torch.zeros(num_classes, dtype=torch.bool, device=flat.device)
                is_thing[list(thing_label_ids)] = True
                selected = is_thing[labels]
                top_scores, queries, labels = top_scores[selected], queries[selected], labels[selected]
            # each selected query's mask once (a query can hold several top classes), resized a few at a time;
            # only the bool masks are kept at full size
            unique_queries, mask_of_pair = torch.unique(queries, return_inverse=True)
            binaries, unique_scores = [], []
            for first in range(0, len(unique_queries), RESIZE_CHUNK):
                masks = self._masks_to_target(mask_logits[unique_queries[first : first + RESIZE_CHUNK]].float(), reshaped[index], targets[index])
                binary = masks > 0
                unique_scores.append((masks.sigmoid() * binary).flatten(1).sum(-1) / (binary.flatten(1).sum(-1) + 1e-6))
                binaries.append(binary)
            if binaries:
                unique_binary, unique_scores = torch.cat(binaries), torch.cat(unique_scores)
            else:
                size = targets[index] or reshaped[index] or tuple(mask_logits.shape[-2:])
                unique_binary, unique_scores = torch.zeros(0, *size, dtype=torch.bool, device=mask_logits.device), top_scores.new_zeros(0)
            final_scores = top_scores * unique_scores[mask_of_pair]
            keep = (final_scores > threshold) & unique_binary.flatten(1).any(-1)[mask_of_pair]
            order = torch.nonzero(keep).flatten()
            order = order[final_scores[order].argsort(descending=True)]
            binary = unique_binary[mask_of_pair[order]]  # (N, H, W) in output order
            height, width = unique_binary.shape[-2:]
            segmentation = torch.zeros(height, width, dtype=torch.int32, device=mask_logits.device)
            segments_info = []
            for rank, item in enumerate(order.tolist()):
                segments_info.append({"id": rank + 1, "label_id": int(labels[item]), "was_fused": False, "score": round(float(final_scores[item]), 6)})
            for rank in reversed(range(len(order))):  # paint low scores first so high scores stay on top
                segmentation[binary[rank]] = rank + 1
            result = {"segmentation": segmentation.cpu(), "segments_info": segments_info}
            if return_binary_maps:
                result["binary_masks"] = binary.cpu()
            results.append(result)
        return results
