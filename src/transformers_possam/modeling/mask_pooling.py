"""Mask pooling ("ROI pooling" in the paper): average features inside each binarized mask."""

from __future__ import annotations

import torch
from torch.nn import functional as F


__all__ = ["mask_pool"]


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """
    FC-CLIP / ODISE mask pooling: the mask logits are bilinearly resized to the feature map, binarized at logit 0
    (sigmoid 0.5) without gradient, and the features are averaged inside each mask. An empty mask pools to zeros.

    Args:
        features: `(batch, channels, height, width)`.
        mask_logits: `(batch, num_queries, h, w)`, any resolution.

    Returns:
        `(batch, num_queries, channels)`.
    """
    with torch.no_grad():
        if mask_logits.shape[-2:] != features.shape[-2:]:
            mask_logits = F.interpolate(mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False)
        masks = (mask_logits > 0).to(features.dtype)
        # FC-CLIP divides by `area + 1e-8`; for the integer areas here that is `area.clamp_min(1)` exactly (n + 1e-8
        # rounds to n for n >= 1 in every float type, and 0 / 1e-8 = 0 / 1). The ONNX exporter's graph optimizer
        # dropped the `+ 1e-8`, and onnxruntime then divided 0 by 0 for empty masks (NaN class logits).
        area = masks.sum(dim=(-2, -1)).unsqueeze(-1).clamp_min(1)
    # (B, Q, HW) @ (B, HW, C): one batched matmul instead of an einsum over a (B, Q, C, H, W) broadcast
    pooled = torch.bmm(masks.flatten(2), features.flatten(2).transpose(1, 2))
    return pooled / area
