"""PosSAM training losses: Mask2Former's matcher and losses with a per-batch vocabulary, uint8 labels, and the IoU loss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch.nn import functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    dice_loss,
    pair_wise_dice_loss,
    pair_wise_sigmoid_cross_entropy_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)

from ..device_transfer import to_device


__all__ = [
    "LossNormalizers",
    "PosSAMHungarianMatcher",
    "PosSAMLoss",
    "accumulation_loss_normalizers",
    "mask_iou_targets",
    "sample_binary_masks",
]


def _sum_over_processes(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(`value` summed over the processes of the default process group, number of processes); as is without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)  # SUM
        return value, torch.distributed.get_world_size()
    return value, 1


@dataclass(frozen=True)
class LossNormalizers:
    """
    The denominators of `PosSAMLoss`'s averages, given explicitly (`PosSAMForPanopticSegmentation.forward(...,
    loss_normalizers=...)`) instead of taken from the batch at hand. Built by `accumulation_loss_normalizers` for a
    gradient-accumulation window, they make G micro-batches give the gradients of one batch of all their images.
    The same values serve the final and every auxiliary layer: each layer's matching assigns min(N_i, Q) queries.

    Attributes:
        num_masks (`torch.Tensor`, 0-dim): divides the summed mask BCE, dice and (matched-only) IoU losses.
        class_weight_sum (`torch.Tensor`, 0-dim): divides the summed weighted class cross-entropy (the denominator of
            `F.cross_entropy(..., weight=...)`'s mean: 1 per matched query, `no_object_weight` per unmatched one).
        num_predictions (`torch.Tensor`, 0-dim): divides the summed IoU squared error over all queries
            (`config.iou_loss_on_unmatched`; the denominator of `F.mse_loss`'s mean, images x Q).
    """

    num_masks: torch.Tensor
    class_weight_sum: torch.Tensor
    num_predictions: torch.Tensor


def accumulation_loss_normalizers(
    window_class_labels: Sequence[Sequence[torch.Tensor]],
    num_queries: int,
    no_object_weight: float,
    device: torch.device | str | None = None,
) -> LossNormalizers:
    """
    The loss denominators of a gradient-accumulation window, so that G micro-batches accumulated give the gradients
    of one batch holding all their images, whatever each micro-batch's number of masks.

    Per batch, Mask2Former / FC-CLIP divide the mask losses by the batch's number of target masks summed over
    processes and divided by their number (at least 1), and the class cross-entropy by the batch's class-weight sum
    on this process. Here both are taken over the whole window (all G micro-batches) and divided by G, because
    accelerate's `backward` divides each micro-batch's loss by G: sum over micro-batches of (loss_g / (total / G)) / G
    = (sum of the window's losses) / total. With G = 1 they are the per-batch values (`num_masks` without
    transformers' `get_num_masks` division by the world size twice: it averages, then divides again).

    Every process must call this at the same point (the mask count is summed over the default process group).

    Args:
        window_class_labels: per micro-batch of the window, per image, its `(N_i,)` class labels (only the counts
            are read).
        num_queries: Q, `config.num_queries`.
        no_object_weight: the cross-entropy weight of unmatched queries, `config.no_object_weight`.
        device: where the normalizers live (the model's device: the mask count is all-reduced there).

    Returns:
        `LossNormalizers` of 0-dim float32 tensors.
    """
    num_micro_batches = len(window_class_labels)
    if num_micro_batches == 0 or any(len(batch) == 0 for batch in window_class_labels):
        raise ValueError("window_class_labels needs at least one micro-batch, each of at least one image.")
    counts = [len(labels) for batch in window_class_labels for labels in batch]
    # torch.full: fills on the device, where torch.tensor(value, device=...) would be a synchronizing host copy
    total_masks, world_size = _sum_over_processes(torch.full((), float(sum(counts)), device=device))
    # Hungarian matching assigns min(N_i, Q) queries per image (linear_sum_assignment on a Q x N_i cost matrix)
    matched = [min(count, num_queries) for count in counts]
    class_weight_sum = sum(m + no_object_weight * (num_queries - m) for m in matched)
    return LossNormalizers(
        num_masks=torch.clamp(total_masks / world_size, min=1) / num_micro_batches,
        class_weight_sum=torch.full((), class_weight_sum / num_micro_batches, device=device),
        num_predictions=torch.full((), len(counts) * num_queries / num_micro_batches, device=device),
    )


def sample_binary_masks(masks: torch.Tensor, point_coordinates: torch.Tensor) -> torch.Tensor:
    """
    Bilinearly sample masks of any dtype (uint8/bool labels stay as they are) at normalized points.

    Equal to `grid_sample(masks[:, None].float(), 2 * coords - 1, align_corners=False).squeeze(1)` (Mask2Former's
    `sample_point`) but gathers 4 neighbours per point instead of converting `(N, H, W)` labels to float: memory is
    O(N * points), not O(N * H * W).

    Args:
        masks: `(N, H, W)`.
        point_coordinates: `(P, 2)` shared by all masks, or `(N, P, 2)`; (x, y) in [0, 1].

    Returns:
        `(N, P)` float32.
    """
    num_masks, height, width = masks.shape
    coords = point_coordinates.float()
    if coords.dim() == 2:
        coords = coords.unsqueeze(0)
    x = coords[..., 0] * width - 0.5
    y = coords[..., 1] * height - 0.5
    x0, y0 = x.floor(), y.floor()
    wx1, wy1 = x - x0, y - y0
    wx0, wy0 = 1 - wx1, 1 - wy1
    flat = masks.reshape(num_masks, height * width)
    x0, y0 = x0.long(), y0.long()

    def corner(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        inside = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        index = (yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1)).expand(num_masks, -1)
        return flat.gather(1, index).float() * inside

    return (
        corner(y0, x0) * (wy0 * wx0)
        + corner(y0, x0 + 1) * (wy0 * wx1)
        + corner(y0 + 1, x0) * (wy1 * wx0)
        + corner(y0 + 1, x0 + 1) * (wy1 * wx1)
    )


def mask_iou_targets(pred_mask_logits: torch.Tensor, target_masks: torch.Tensor) -> torch.Tensor:
    """
    IoU of binarized predictions (logit > 0) with their ground truths, at the prediction's resolution; the ground
    truth is sampled at the prediction grid's pixel centres (bilinear, >= 0.5) without a dense float copy.

    Args:
        pred_mask_logits: `(M, h, w)`.
        target_masks: `(M, H, W)`, any dtype.

    Returns:
        `(M,)` IoU in [0, 1] (0 where both masks are empty).
    """
    num_masks, height, width = pred_mask_logits.shape
    ys = (torch.arange(height, device=pred_mask_logits.device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=pred_mask_logits.device, dtype=torch.float32) + 0.5) / width
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    targets = sample_binary_masks(target_masks, grid) >= 0.5
    preds = (pred_mask_logits > 0).reshape(num_masks, height * width)
    intersection = (preds & targets).sum(-1).float()
    union = (preds | targets).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def _read_on_host(values: torch.Tensor) -> np.ndarray:
    """`values` as a host array: the matcher's one device synchronization per batch."""
    return values.cpu().numpy()


def _assign(cost_matrices: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    Hungarian assignment (scipy's `linear_sum_assignment`) of each `(Q, N_i)` cost matrix, with the matrices read on
    the host in one transfer (one device synchronization per batch, not one per image) and the indices sent back in
    one copy that does not wait for the device (`to_device`). Returns per image `(query indices, target indices)`,
    int64 on the matrices' device, in scipy's order (ascending query index).
    """
    if not cost_matrices:
        return []
    device = cost_matrices[0].device
    host = _read_on_host(torch.cat([costs.flatten() for costs in cost_matrices]))
    pairs, offset = [], 0
    for costs in cost_matrices:
        size = costs.numel()
        rows, cols = linear_sum_assignment(host[offset : offset + size].reshape(costs.shape))
        offset += size
        pairs.append(torch.as_tensor(np.stack([rows, cols]), dtype=torch.int64))
    counts = [pair.shape[1] for pair in pairs]
    on_device = to_device(torch.cat(pairs, dim=1), device).split(counts, dim=1)
    return [(pair[0], pair[1]) for pair in on_device]


class PosSAMHungarianMatcher(Mask2FormerHungarianMatcher):
    """
    Mask2Former's matcher (class cost -p[target], BCE and dice costs on uniformly sampled points, scipy Hungarian)
    computed in fp32, with the number of classes taken from each batch's logits and labels sampled from uint8/bool
    masks without a float copy. Non-finite costs become the largest finite value, so a NaN never crashes scipy. The
    batch's cost matrices go to the host in one transfer and the indices come back on the device (`_assign`):
    Mask2Former reads each image's matrix and indexes device tensors with host indices, each a device
    synchronization.
    """

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        cost_matrices = []
        for logits, masks, labels, targets in zip(
            class_queries_logits, masks_queries_logits, class_labels, mask_labels
        ):
            cost_class = -logits.float().softmax(-1)[:, labels]
            points = torch.rand(self.num_points, 2, device=masks.device)
            target_points = sample_binary_masks(targets, points)
            pred_points = sample_point(
                masks.float()[:, None], points.expand(masks.shape[0], -1, -1), align_corners=False
            ).squeeze(1)
            cost_matrix = (
                self.cost_mask * pair_wise_sigmoid_cross_entropy_loss(pred_points, target_points)
                + self.cost_class * cost_class
                + self.cost_dice * pair_wise_dice_loss(pred_points, target_points)
            )
            largest = torch.finfo(cost_matrix.dtype).max
            cost_matrices.append(torch.nan_to_num(cost_matrix, nan=largest, posinf=largest, neginf=largest))
        return _assign(cost_matrices)


class PosSAMLoss(Mask2FormerLoss):
    """
    Mask2Former's set criterion (Hungarian matching; cross-entropy over K + 1 classes with a down-weighted void;
    point-sampled BCE + dice with PointRend importance sampling; normalization by the number of ground-truth masks
    averaged over processes) adapted to open vocabulary: K comes from each batch's logits, not from a fixed
    `num_labels`. Adds PosSAM's IoU loss (paper eq. 2): the squared error between the predicted IoU of each matched
    query and the IoU of its binarized predicted mask with its ground truth.

    Returns `loss_cross_entropy`, `loss_mask`, `loss_dice`, `loss_iou`, plus `_{i}`-suffixed copies per auxiliary
    decoder layer, unweighted; `weight_dict` holds the weights.

    Args:
        config: the `Mask2FormerConfig` of the reused Mask2Former parts (`PosSAMConfig.mask2former_config`), which
            holds the criterion's fields (`no_object_weight`, `class_weight`, `mask_weight`, `dice_weight`,
            `train_num_points`, `oversample_ratio`, `importance_sample_ratio`); its `num_labels` is not read.
        iou_weight: the weight of the IoU loss (`PosSAMConfig.iou_weight`; Mask2Former has no IoU head).
        iou_loss_on_unmatched: also train unmatched queries' IoU towards 0 (`PosSAMConfig.iou_loss_on_unmatched`).
    """

    def __init__(self, config: Mask2FormerConfig, iou_weight: float, iou_loss_on_unmatched: bool = False):
        if not isinstance(config, Mask2FormerConfig):
            raise TypeError(
                f"PosSAMLoss takes the Mask2FormerConfig of the reused Mask2Former parts, got {type(config).__name__}:"
                " pass `possam_config.mask2former_config`, with `iou_weight=possam_config.iou_weight` and"
                " `iou_loss_on_unmatched=possam_config.iou_loss_on_unmatched`."
            )
        weight_dict = {
            "loss_cross_entropy": config.class_weight,
            "loss_mask": config.mask_weight,
            "loss_dice": config.dice_weight,
            "loss_iou": iou_weight,
        }
        super().__init__(config, weight_dict)
        # The parent's fixed-size class weights would tie the loss to one vocabulary size: built per batch instead.
        del self.empty_weight
        self.num_labels = None
        self.iou_loss_on_unmatched = iou_loss_on_unmatched
        self.matcher = PosSAMHungarianMatcher(
            cost_class=config.class_weight,
            cost_mask=config.mask_weight,
            cost_dice=config.dice_weight,
            num_points=self.num_points,
        )

    @classmethod
    def from_possam_config(cls, config) -> PosSAMLoss:
        """The criterion of a `PosSAMConfig`, as `PosSAMForPanopticSegmentation` builds it."""
        return cls(
            config.mask2former_config,
            iou_weight=config.iou_weight,
            iou_loss_on_unmatched=config.iou_loss_on_unmatched,
        )

    # transformers annotates `class_labels` as a Tensor; it takes (and sums the lengths of) a list of them
    def get_num_masks(  # type: ignore[override]
        self, class_labels: Sequence[torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        """
        Mask2Former's normalizer: the number of target masks summed over processes divided by their number, at least
        1. (transformers' version averages over processes with accelerate's `reduce`, then divides by the number of
        processes again.)
        """
        # torch.full: a fill on the device, not a (synchronizing) copy of a host scalar
        total, world_size = _sum_over_processes(
            torch.full((), float(sum(len(labels) for labels in class_labels)), device=device)
        )
        return torch.clamp(total / world_size, min=1)

    def loss_labels(self, class_queries_logits, class_labels, indices, class_weight_sum=None):
        batch_size, num_queries, num_classes_with_void = class_queries_logits.shape
        void_index = num_classes_with_void - 1
        # 1 per class, eos_coef for void: made on the device (`weights[-1] = value` copies a host scalar over)
        class_weights = F.pad(
            torch.ones(num_classes_with_void - 1, device=class_queries_logits.device), (0, 1), value=self.eos_coef
        )
        target_classes = torch.full(
            (batch_size, num_queries), void_index, dtype=torch.int64, device=class_queries_logits.device
        )
        target_classes[self._get_predictions_permutation_indices(indices)] = torch.cat(
            [labels[target] for labels, (_, target) in zip(class_labels, indices)]
        ).to(class_queries_logits.device)
        logits = class_queries_logits.float().transpose(1, 2)
        if class_weight_sum is None:  # the batch's own weight sum
            return {"loss_cross_entropy": F.cross_entropy(logits, target_classes, weight=class_weights)}
        summed = F.cross_entropy(logits, target_classes, weight=class_weights, reduction="sum")
        return {"loss_cross_entropy": summed / class_weight_sum}

    def _matched_targets(self, mask_labels, indices):
        return [masks[target] for masks, (_, target) in zip(mask_labels, indices)]

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks):
        pred_masks = masks_queries_logits[self._get_predictions_permutation_indices(indices)].float()[:, None]
        with torch.no_grad():
            point_coordinates = self.sample_points_using_uncertainty(
                pred_masks,
                self.calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,  # type: ignore[arg-type]  # transformers annotates an int; its configs use 3.0
                self.importance_sample_ratio,
            )
            per_image = point_coordinates.split([len(source) for source, _ in indices])
            point_labels = torch.cat(
                [
                    sample_binary_masks(targets, coords)
                    for targets, coords in zip(self._matched_targets(mask_labels, indices), per_image)
                ]
            )
        point_logits = sample_point(pred_masks, point_coordinates, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def loss_iou(self, iou_logits, masks_queries_logits, mask_labels, indices, num_masks, num_predictions=None):
        predictions_index = self._get_predictions_permutation_indices(indices)
        with torch.no_grad():
            pred_masks = masks_queries_logits[predictions_index].detach()
            per_image = pred_masks.split([len(source) for source, _ in indices])
            targets = [
                mask_iou_targets(preds, masks)
                for preds, masks in zip(per_image, self._matched_targets(mask_labels, indices))
            ]
            iou_targets = torch.cat(targets) if targets else pred_masks.new_zeros(0)
        predicted = iou_logits.float().sigmoid()
        if self.iou_loss_on_unmatched:
            full_targets = torch.zeros_like(predicted)
            full_targets[predictions_index] = iou_targets.float()
            if num_predictions is None:  # the batch's own images x queries
                return {"loss_iou": F.mse_loss(predicted, full_targets)}
            return {"loss_iou": F.mse_loss(predicted, full_targets, reduction="sum") / num_predictions}
        return {"loss_iou": ((predicted[predictions_index] - iou_targets.float()) ** 2).sum() / num_masks}

    # Mask2FormerLoss annotates `auxiliary_predictions` as one dict, but iterates it as a list of dicts, as this does
    def forward(  # type: ignore[override]
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
        auxiliary_predictions: list[dict[str, torch.Tensor]] | None = None,
        iou_logits: torch.Tensor | None = None,
        loss_normalizers: LossNormalizers | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            masks_queries_logits: `(B, Q, h, w)`; class_queries_logits: `(B, Q, K + 1)` (void last);
            mask_labels: per image `(N_i, H, W)` uint8/bool/float, covering the same field of view as the input;
            class_labels: per image `(N_i,)` indices into the K classes;
            auxiliary_predictions: per earlier decoder layer, a dict with the same three predictions;
            iou_logits: `(B, Q)` IoU head logits.
            loss_normalizers: the denominators of the averages (`accumulation_loss_normalizers`: those of a whole
                gradient-accumulation window); default: this batch's own (Mask2Former's).
        """
        indices = self.matcher(masks_queries_logits, class_queries_logits, mask_labels, class_labels)
        class_weight_sum = num_predictions = None
        if loss_normalizers is None:
            num_masks = self.get_num_masks(class_labels, device=masks_queries_logits.device)
        else:
            num_masks = loss_normalizers.num_masks
            class_weight_sum, num_predictions = loss_normalizers.class_weight_sum, loss_normalizers.num_predictions
        losses = {
            **self.loss_masks(masks_queries_logits, mask_labels, indices, num_masks),
            **self.loss_labels(class_queries_logits, class_labels, indices, class_weight_sum),
        }
        if iou_logits is not None:
            losses.update(
                self.loss_iou(iou_logits, masks_queries_logits, mask_labels, indices, num_masks, num_predictions)
            )
        for layer_index, aux in enumerate(auxiliary_predictions or []):
            aux_losses = self.forward(
                aux["masks_queries_logits"],
                aux["class_queries_logits"],
                mask_labels,
                class_labels,
                iou_logits=aux.get("iou_logits"),
                loss_normalizers=loss_normalizers,
            )
            losses.update({f"{key}_{layer_index}": value for key, value in aux_losses.items()})
        return losses

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the losses, each weighted by its base name's weight (`loss_dice_3` -> `loss_dice`)."""
        total: torch.Tensor | float = 0.0
        for key, value in losses.items():
            base = key.rsplit("_", 1)[0] if key.rsplit("_", 1)[-1].isdigit() else key
            total = total + self.weight_dict[base] * value
        if not isinstance(total, torch.Tensor):
            raise ValueError("`losses` is empty: there is nothing to weight (pass the dict `forward` returns).")
        return total
