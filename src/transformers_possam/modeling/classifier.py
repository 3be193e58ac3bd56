"""The open-vocabulary classifier of PosSAM: mask embeddings against CLIP text embeddings (paper §3.4-3.5).

Two branches score every mask query against a vocabulary of K classes (S synonym slots each):

- in-vocabulary (trained): G_ldp from `LocalDiscriminativePooling` against the text embeddings G_text, with a learned
  temperature tau and a learned void embedding as the (K + 1)-th class;
- out-of-vocabulary (frozen): G_clip, the frozen CLIP's own head on mask-pooled dense CLIP features F_clip, against
  the same text embeddings with CLIP's own temperature (FC-CLIP's out-of-vocabulary branch).

Both take the max over a class's synonyms (FC-CLIP / OpenSeg "max ensemble"). MASE (post-processing) combines them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .clip import MAX_LOGIT_SCALE, PosSAMCLIP
from .mask_pooling import mask_pool


__all__ = ["PosSAMOpenVocabularyClassifier"]


class PosSAMOpenVocabularyClassifier(nn.Module):
    """
    Classifies mask embeddings against a vocabulary of text embeddings.

    Owns the two learned parameters of PosSAM's classification:

    - `void_embedding` (`nn.Embedding(1, embed_dim)`): the "no object" class, scored like a class embedding (FC-CLIP
      appends the same learned, L2-normalized void vector to its text classifier);
    - `logit_scale`: log(1 / tau) of the in-vocabulary logits, learned; exp() is clamped at CLIP's 100.

    Args:
        embed_dim: the CLIP joint embedding size D (G_ldp, G_clip and the text embeddings live there).
        logit_scale_init: initial log(1 / tau) (CLIP's log(1 / 0.07)).
    """

    def __init__(self, embed_dim: int, logit_scale_init: float):
        super().__init__()
        self.void_embedding = nn.Embedding(1, embed_dim)
        # log(1 / tau) of the LDP logits, learned (FC-CLIP's in-vocabulary head does the same)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def logit_scale_value(self) -> torch.Tensor:
        """1 / tau: `exp(logit_scale)` clamped at CLIP's 100 (a 0-dim tensor)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @staticmethod
    def max_over_synonyms(
        embeddings: torch.Tensor,
        class_embeddings: torch.Tensor,
        synonym_mask: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        """
        Cosine-similarity logits with the max over each class's synonyms (FC-CLIP / OpenSeg "max ensemble").

        Args:
            embeddings: `(..., D)` mask embeddings (any norm; L2-normalized here).
            class_embeddings: `(K, S, D)` L2-normalized text embeddings, S synonym slots per class.
            synonym_mask: `(K, S)` bool, True where a slot holds a real synonym (padding slots never win the max).
            logit_scale: scalar multiplier 1 / tau (already exponentiated).

        Returns:
            `(..., K)` logits: `logit_scale * max_s cos(embedding, class_embeddings[k, s])` over real slots s.
        """
        num_classes, num_synonyms, dim = class_embeddings.shape
        embeddings = F.normalize(embeddings, dim=-1)
        similarity = embeddings @ class_embeddings.reshape(-1, dim).to(embeddings.dtype).T
        similarity = similarity.unflatten(-1, (num_classes, num_synonyms))
        if num_synonyms > 1:
            similarity = similarity.masked_fill(~synonym_mask, -math.inf).amax(-1)
        else:
            similarity = similarity.squeeze(-1)
        return logit_scale * similarity

    def forward(
        self, ldp_embeddings: torch.Tensor, class_embeddings: torch.Tensor, synonym_mask: torch.Tensor
    ) -> torch.Tensor:
        """
        In-vocabulary logits: cos(G_ldp, G_text) / tau, max over synonyms, the learned void class last.

        Args:
            ldp_embeddings: G_ldp `(B, Q, D)`.
            class_embeddings: `(K, S, D)` L2-normalized text embeddings.
            synonym_mask: `(K, S)` bool.

        Returns:
            `(B, Q, K + 1)` logits, void last.
        """
        scale = self.logit_scale_value()
        class_logits = self.max_over_synonyms(ldp_embeddings, class_embeddings, synonym_mask, scale)
        void = F.normalize(self.void_embedding.weight, dim=-1)
        void_logits = scale * (F.normalize(ldp_embeddings, dim=-1) @ void.to(ldp_embeddings.dtype).T)
        return torch.cat([class_logits, void_logits], dim=-1)

    def out_of_vocabulary_logits(
        self,
        clip: PosSAMCLIP,
        clip_features: torch.Tensor,
        mask_logits: torch.Tensor,
        class_embeddings: torch.Tensor,
        synonym_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The out-of-vocabulary branch, frozen: G_clip = `clip`'s own head on F_clip mask-pooled with each query's
        binarized mask, classified with `clip`'s own temperature and no void class (FC-CLIP drops it).

        Args:
            clip: the frozen CLIP (its head and logit scale are used; it is not part of this module).
            clip_features: F_clip `(B, C_clip, H/32, W/32)`.
            mask_logits: `(B, Q, h, w)` mask logits (any resolution).
            class_embeddings: `(K, S, D)` L2-normalized text embeddings.
            synonym_mask: `(K, S)` bool.

        Returns:
            G_clip `(B, Q, D)` and its logits `(B, Q, K)`.
        """
        clip_embeddings = clip.embed_pooled_features(mask_pool(clip_features, mask_logits))
        logits = self.max_over_synonyms(clip_embeddings, class_embeddings, synonym_mask, clip.logit_scale_value())
        return clip_embeddings, logits
