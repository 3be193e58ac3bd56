"""Mask2Former's per-layer mask predictor, with an inference mode that skips the 1/4-resolution masks of the
intermediate decoder layers."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskPredictor


__all__ = ["PosSAMMaskPredictor"]


class PosSAMMaskPredictor(Mask2FormerMaskPredictor):
    """
    `Mask2FormerMaskPredictor` (same parameters and state-dict keys). Each decoder layer predicts masks
    `einsum(E_q, F_mask)` at 1/4 resolution, then resizes them bilinearly to the next layer's attention resolution
    (1/32, 1/16, 1/8) to build its attention mask. Bilinear resizing is linear in the values and the einsum is
    linear in the features, so the two commute:

        resize(einsum(E_q, F_mask)) == einsum(E_q, resize(F_mask))     (up to float rounding).

    Inside `attention_masks_only(...)` (inference without per-layer outputs), intermediate layers use the resized
    features, computed once per resolution: Q x C x (h x w) at the attention resolution instead of Q x C x H/4 x W/4
    per layer, and they return `None` for their 1/4-resolution masks. `predict_masks` gives the final layer's masks.
    """

    def __init__(self, hidden_size: int, num_heads: int, mask_feature_size: int):
        # transformers annotates `mask_feature_size` as a Tensor; it is the channel count (an int) of its layers
        super().__init__(
            hidden_size=hidden_size,
            num_heads=num_heads,
            mask_feature_size=mask_feature_size,  # type: ignore[arg-type]
        )
        self._resized_features: dict[tuple[int, ...], torch.Tensor] | None = None

    @contextmanager
    def attention_masks_only(self, mask_features: torch.Tensor, sizes: list[tuple[int, int]]):
        """Within the block, `forward` returns `(None, attention_mask)` from features resized once per size."""
        self._resized_features = {
            tuple(size): F.interpolate(mask_features, size=tuple(size), mode="bilinear", align_corners=False)
            for size in sizes
        }
        try:
            yield
        finally:
            self._resized_features = None

    def predict_masks(self, query_states: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Layer-normed query states `(Q, B, C)` and F_mask `(B, C, h, w)` -> mask logits `(B, Q, h, w)`."""
        return torch.einsum("bqc,bchw->bqhw", self.mask_embedder(query_states.transpose(0, 1)), mask_features)

    def forward(self, outputs: torch.Tensor, pixel_embeddings: torch.Tensor, attention_mask_target_size=None):
        if self._resized_features is None:
            return super().forward(outputs, pixel_embeddings, attention_mask_target_size)
        resized = self._resized_features[tuple(attention_mask_target_size)]
        masks = self.predict_masks(outputs, resized)
        # the parent's rule (sigmoid < 0.5, per head), thresholded before the per-head copy: bool, not float, copies
        blocked = masks.flatten(2).sigmoid() < 0.5
        return None, blocked.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
