"""The masked-attention decoder's self-attention among the queries, as one fused attention call."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import Mask2FormerAttention


__all__ = ["PosSAMDecoderSelfAttention"]


class PosSAMDecoderSelfAttention(Mask2FormerAttention):
    """
    `Mask2FormerAttention` as the masked-attention decoder layer uses it, self-attention among the queries (same
    parameters, state-dict keys and math). transformers' forward moves the heads with three `contiguous` copies,
    scales the query in a pass of its own, and runs two `bmm`s around a softmax: about 13 kernels per layer, which on a
    GPU at batch 1, where the host's launch rate bounds the forward, cost more than the attention itself. Here, when
    no attention weights are asked for (`output_attentions=False`: the decoder layer asks only when its own caller
    does, `PosSAMMaskedAttentionDecoderLayer`), the projections are read as strided views and one
    `scaled_dot_product_attention` call does the rest (its scale is the query scaling; rounded in another order, not
    at another precision). With weights asked for, a mask, cross-attention inputs, or dropout in training:
    transformers' forward.

    `forward` takes and returns transformers' layout: `hidden_states` and `position_embeddings` `(Q, B, C)`; returns
    `(output (Q, B, C), None)`.
    """

    # transformers annotates the parent's return as a 3-tuple; it returns `(output, weights or None)` as this does
    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        key_value_position_embeddings: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            output_attentions
            or attention_mask is not None
            or key_value_states is not None
            or key_value_position_embeddings is not None
            or (self.training and self.dropout > 0)
        ):
            return super().forward(  # type: ignore[return-value]
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                key_value_states=key_value_states,
                key_value_position_embeddings=key_value_position_embeddings,
                output_attentions=output_attentions,
            )
        length, batch_size, _ = hidden_states.shape
        # queries and keys see the position embeddings, values do not (transformers' `hidden_states_original`)
        positioned = hidden_states if position_embeddings is None else hidden_states + position_embeddings

        def by_head(projected: torch.Tensor) -> torch.Tensor:  # (Q, B, C) -> (B, heads, Q, d), a view
            return projected.view(length, batch_size, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        attention = F.scaled_dot_product_attention(
            by_head(self.q_proj(positioned)),
            by_head(self.k_proj(positioned)),
            by_head(self.v_proj(hidden_states)),
            scale=self.scaling,
        )
        # (B, heads, Q, d) -> (Q, B, heads * d), the layout of the layer's residual
        return self.out_proj(attention.permute(2, 0, 1, 3).reshape(length, batch_size, -1)), None
