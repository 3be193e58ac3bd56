"""LocalDiscriminativePooling: fuses mask-pooled SAM-side and CLIP features (paper §3.4, Fig. 5)."""

from __future__ import annotations

import torch
from torch import nn

from .mask_pooling import mask_pool


__all__ = ["LocalDiscriminativePooling"]


class _FusionLayer(nn.Module):
    """Pre-norm residual self-attention over the concatenated SAM and CLIP mask tokens."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.self_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        normed = self.norm(tokens)
        return tokens + self.self_attn(normed, normed, normed, need_weights=False)[0]


class LocalDiscriminativePooling(nn.Module):
    """
    "we first apply ROI Pooling (i.e. mask pooling) on both the SAM and CLIP features and then project them to align
    with the CLIP and SAM embedding space. These features are then concatenated and fused using self-attention.
    Finally, the refined features are passed through the normalization layer to obtain the locally discriminative
    pooled embeddings G_ldp" (paper §3.4).

    1. mask-pool F_masked (the pixel decoder's per-pixel mask features) and F_clip (CLIP's dense stride-32 map) with
       each query's binarized mask;
    2. LayerNorm + Linear projects each stream into the CLIP embedding space (`embed_dim`, where text lives);
    3. the Q SAM tokens and Q CLIP tokens (each tagged with a learned stream embedding) are concatenated into one
       sequence of 2Q tokens and fused by self-attention, so each mask's embedding draws on both streams (and on the
       other masks of the image);
    4. the two refined tokens of a mask are summed and LayerNorm-ed: G_ldp, one embedding per mask.

    Args:
        mask_feature_dim: channels of F_masked.
        clip_feature_dim: channels of F_clip.
        embed_dim: CLIP joint embedding size.
    """

    def __init__(
        self,
        mask_feature_dim: int,
        clip_feature_dim: int,
        embed_dim: int,
        num_heads: int,
        num_layers: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.sam_projection = nn.Sequential(nn.LayerNorm(mask_feature_dim), nn.Linear(mask_feature_dim, embed_dim))
        self.clip_projection = nn.Sequential(nn.LayerNorm(clip_feature_dim), nn.Linear(clip_feature_dim, embed_dim))
        self.stream_embeddings = nn.Embedding(2, embed_dim)
        self.fusion_layers = nn.ModuleList([_FusionLayer(embed_dim, num_heads, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(embed_dim)

    def forward(
        self, mask_features: torch.Tensor, clip_features: torch.Tensor, mask_logits: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            mask_features: F_masked, `(batch, mask_feature_dim, H/4, W/4)`.
            clip_features: F_clip, `(batch, clip_feature_dim, H/32, W/32)`.
            mask_logits: P_mask logits `(batch, num_queries, H/4, W/4)`.

        Returns:
            G_ldp `(batch, num_queries, embed_dim)` (not L2-normalized), which `PosSAMOpenVocabularyClassifier`
            scores against the text embeddings.
        """
        num_queries = mask_logits.shape[1]
        sam_tokens = self.sam_projection(mask_pool(mask_features, mask_logits)) + self.stream_embeddings.weight[0]
        clip_pooled = mask_pool(clip_features.to(mask_features.dtype), mask_logits)
        clip_tokens = self.clip_projection(clip_pooled) + self.stream_embeddings.weight[1]
        tokens = torch.cat([sam_tokens, clip_tokens], dim=1)
        for layer in self.fusion_layers:
            tokens = layer(tokens)
        sam_tokens, clip_tokens = tokens.split(num_queries, dim=1)
        return self.norm(sam_tokens + clip_tokens)
