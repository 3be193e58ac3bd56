"""Mask2Former's per-layer mask predictor, with an inference mode that skips the 1/4-resolution masks of the
intermediate decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskPredictor


__all__ = ["AttentionMaskFeatures", "PosSAMMaskPredictor"]


@dataclass(frozen=True)
class AttentionMaskFeatures:
    """
    F_mask resized once to each attention resolution of the masked-attention decoder: `by_size[(h, w)]` is
    `(B, C, h, w)`. Given to the decoder in place of the `(B, C, H/4, W/4)` mask features, it asks
    `PosSAMMaskPredictor` for attention masks only (`PosSAMMaskPredictor.attention_mask_features` builds it). The
    decoders of Mask2Former hand their `pixel_embeddings` argument to the mask predictor and to nothing else, so this
    request travels as an argument through transformers' unmodified `Mask2FormerTransformerModule` and
    `Mask2FormerMaskedAttentionDecoder`: no module holds it between calls.
    """

    by_size: dict[tuple[int, int], torch.Tensor]


class PosSAMMaskPredictor(Mask2FormerMaskPredictor):
    """
    `Mask2FormerMaskPredictor` (same parameters and state-dict keys). Each decoder layer predicts masks
    `einsum(E_q, F_mask)` at 1/4 resolution, then resizes them bilinearly to the next layer's attention resolution
    (1/32, 1/16, 1/8) to build its attention mask. Bilinear resizing is linear in the values and the einsum is
    linear in the features, so the two commute:

        resize(einsum(E_q, F_mask)) == einsum(E_q, resize(F_mask))     (up to float rounding).

    Called with `AttentionMaskFeatures` in place of F_mask (inference without per-layer outputs), a layer uses the
    features resized once per resolution: Q x C x (h x w) at the attention resolution instead of Q x C x H/4 x W/4
    per layer, and it returns `None` for its 1/4-resolution masks. `predict_masks` gives the final layer's masks.
    Called with a tensor, it is `Mask2FormerMaskPredictor`.
    """

    def __init__(self, hidden_size: int, num_heads: int, mask_feature_size: int):
        # transformers annotates `mask_feature_size` as a Tensor; it is the channel count (an int) of its layers
        super().__init__(
            hidden_size=hidden_size,
            num_heads=num_heads,
            mask_feature_size=mask_feature_size,  # type: ignore[arg-type]
        )

    @staticmethod
    def attention_mask_features(
        mask_features: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> AttentionMaskFeatures:
        """F_mask `(B, C, H, W)` resized bilinearly (as Mask2Former resizes masks) to each `(h, w)` of `sizes`."""
        return AttentionMaskFeatures(
            {
                (int(height), int(width)): F.interpolate(
                    mask_features, size=(int(height), int(width)), mode="bilinear", align_corners=False
                )
                for height, width in sizes
            }
        )

    def predict_masks(self, query_states: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Layer-normed query states `(Q, B, C)` and F_mask `(B, C, h, w)` -> mask logits `(B, Q, h, w)`."""
        return torch.einsum("bqc,bchw->bqhw", self.mask_embedder(query_states.transpose(0, 1)), mask_features)

    def forward(  # type: ignore[override]
        self,
        outputs: torch.Tensor,
        pixel_embeddings: torch.Tensor | AttentionMaskFeatures,
        attention_mask_target_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """
        `outputs` `(Q, B, C)` layer-normed query states. `pixel_embeddings` F_mask `(B, C, H/4, W/4)`: returns
        Mask2Former's `(masks (B, Q, H/4, W/4), attention_mask (B * heads, Q, h * w))`; `AttentionMaskFeatures`:
        `(None, attention_mask)`, the same attention mask (up to rounding) without the 1/4-resolution masks; for a
        single image it is `(Q, h * w)`, shared by the heads (`nn.MultiheadAttention` broadcasts a 2-d mask).
        """
        if not isinstance(pixel_embeddings, AttentionMaskFeatures):
            return super().forward(outputs, pixel_embeddings, attention_mask_target_size)  # type: ignore[arg-type]
        if attention_mask_target_size is None:
            raise ValueError("Attention masks from AttentionMaskFeatures need attention_mask_target_size (h, w).")
        height, width = attention_mask_target_size
        masks = self.predict_masks(outputs, pixel_embeddings.by_size[(int(height), int(width))])
        # the parent's rule (sigmoid < 0.5, the same for every head), thresholded before any per-head copy
        blocked = masks.flatten(2).sigmoid() < 0.5
        tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
        if not tracing and blocked.shape[0] == 1:
            # One image: the `(Q, h * w)` mask, which `nn.MultiheadAttention` broadcasts over the heads. The decoder
            # counts each row's blocked keys (`sum(-1)` of a bool tensor, through an int64 copy), multiplies the mask
            # and the cross-attention turns it into an additive float mask: on the `(heads, Q, h * w)` copy at the
            # 1/8 level of a 1024x1024 input that is 8 x 250 x 16384 elements per step, about 1 s of a CPU forward
            # for the same result. (Not when tracing: the batch size is symbolic there.)
            return None, blocked[0]
        return None, blocked.unsqueeze(1).expand(-1, self.num_heads, -1, -1).flatten(0, 1)
