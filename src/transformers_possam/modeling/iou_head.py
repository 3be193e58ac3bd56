"""PosSAMIoUHead: predicts each mask's IoU with its ground truth (paper §3.3, eq. 2)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMLPPredictionHead


__all__ = ["PosSAMIoUHead"]


class PosSAMIoUHead(nn.Module):
    """
    "The IoU head takes output region features F_masked as input and estimates the IoU score between predicted binary
    masks and their corresponding ground truths." The region feature of a mask is its decoder query state (the vector
    whose dot product with the per-pixel mask features gives the mask), so the head is an MLP on the query state, as
    SAM's own IoU prediction head is an MLP on its IoU token.
    """

    def __init__(self, hidden_dim: int, mlp_hidden_dim: int, depth: int):
        super().__init__()
        self.mlp = Mask2FormerMLPPredictionHead(hidden_dim, mlp_hidden_dim, 1, num_layers=depth)

    def forward(self, query_states: torch.Tensor) -> torch.Tensor:
        """
        Args:
            query_states: `(batch, num_queries, hidden_dim)`, the layer-normed decoder outputs.

        Returns:
            IoU logits `(batch, num_queries)`; `sigmoid` gives the predicted IoU in [0, 1].
        """
        return self.mlp(query_states).squeeze(-1)
