"""
SAM's patch embedding with its tokens stored token-major: the layout every later op of the ViT reads fastest.
"""

from __future__ import annotations

import torch
from transformers.models.sam.modeling_sam import SamPatchEmbeddings


__all__ = ["PosSAMPatchEmbeddings"]


class PosSAMPatchEmbeddings(SamPatchEmbeddings):
    """
    transformers' `SamPatchEmbeddings` (same parameters, keys and values) whose `(batch, height, width, hidden)` output
    is contiguous. The parent returns the patch convolution's `(batch, hidden, height, width)` output permuted, a view
    whose hidden dimension has stride `height * width`; elementwise ops keep their first input's layout, so the
    position-embedding sum and every residual sum after it carry that layout through all of SAM's blocks, and each
    `LayerNorm` (over the strided last dimension) and residual sum runs several times slower than on contiguous
    tokens (SAM-B at 1024x1024, bfloat16, this project's CPU: 5.9 vs 0.7 ms per `LayerNorm`). One copy here (6 MB
    in bfloat16) gives the whole encoder token-major tensors.
    """

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, image_height, image_width)` -> contiguous `(batch, height, width, hidden)`."""
        return super().forward(pixel_values).contiguous()
