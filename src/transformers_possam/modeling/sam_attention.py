"""SAM's attention, computed one head at a time so the relative-position bias never exists for all heads at once."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention


__all__ = ["PosSAMVisionAttention"]


class PosSAMVisionAttention(SamVisionSdpaAttention):
    """
    `SamVisionSdpaAttention` (same parameters and state-dict keys, same math). transformers' version materializes the
    decomposed relative-position bias for every head at once: in a global-attention layer at 1024x1024 input that is
    12 x 4096 x 4096 floats (0.8 GB for ViT-B, 1.6 GB peak inside SDPA). Here heads are processed `heads_per_chunk`
    at a time (one by default): the bias is bounded to 67 MB, and every layer (windowed ones too) runs faster on CPU.
    """

    heads_per_chunk = 1

    # transformers annotates the parent's return as a Tensor, but it returns `(attn_output, None)` as this does
    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, None]:
        if output_attentions:
            # the parent warns and returns None weights
            return super().forward(hidden_states, output_attentions)  # type: ignore[return-value]
        batch_size, height, width, _ = hidden_states.shape
        tokens = height * width
        qkv = (
            self.qkv(hidden_states).reshape(batch_size, tokens, 3, self.num_attention_heads, -1).permute(2, 0, 3, 1, 4)
        )
        query, key, value = qkv.unbind(0)  # (B, heads, tokens, head_dim)
        outputs = []
        for first in range(0, self.num_attention_heads, self.heads_per_chunk):
            heads = slice(first, first + self.heads_per_chunk)
            chunk_query = query[:, heads]
            chunk = chunk_query.shape[1]
            bias = None
            if self.use_rel_pos:
                bias = self.get_decomposed_rel_pos(
                    chunk_query.reshape(batch_size * chunk, tokens, -1),
                    self.rel_pos_h,
                    self.rel_pos_w,
                    (height, width),
                    (height, width),
                ).reshape(batch_size, chunk, tokens, tokens)
            outputs.append(F.scaled_dot_product_attention(chunk_query, key[:, heads], value[:, heads], attn_mask=bias))
        attention = torch.cat(outputs, dim=1).view(batch_size, self.num_attention_heads, height, width, -1)
        return self.proj(attention.permute(0, 2, 3, 1, 4).reshape(batch_size, height, width, -1)), None
