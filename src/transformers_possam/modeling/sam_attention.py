"""
SAM's attention with its decomposed relative-position bias, without materializing the bias for all heads at once:
head by head on CPU, all heads in one fused attention call elsewhere (CUDA).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention


__all__ = ["PosSAMVisionAttention", "relative_position_attention", "relative_position_attention_in_place"]

# bytes of attention scores one chunk of heads may hold on the low-precision CPU path: one head of a global layer at
# 1024x1024 input in bf16 (4096 x 4096 x 2 bytes); a windowed layer's 12 heads (25 windows x 196 x 196) fit at once
_SCORE_CHUNK_BYTES = 32 * 2**20


def relative_position_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """
    softmax(q k^T / sqrt(d) + rel_h + rel_w) v with SAM's decomposed relative positions (MViTv2), for all heads in one
    `scaled_dot_product_attention` call and without an N x N bias tensor: the bias of query i and key j = (h_j, w_j)
    is q_i . R_h[h_i, h_j] + q_i . R_w[w_i, w_j], a dot product of [rel_h(i, :), rel_w(i, :)] with the one-hot
    [e(h_j), e(w_j)], so it is appended to q and k as H + W extra channels (scale 1, q pre-scaled). Exact up to
    rounding; SDPA's fused kernels then apply (flash / memory-efficient on CUDA). Costs (d + H + W) / d of the
    score matmul's FLOPs, which on CPU makes it slower than head by head with the bias.

    Args:
        query, key, value: `(B, heads, H * W, d)`.
        relative_height, relative_width: `(H, H, d)`, `(W, W, d)`: `get_rel_pos` of the layer's tables.
        size: `(H, W)`, the token grid.

    Returns:
        `(B, heads, H * W, d)`.
    """
    batch_size, num_heads, tokens, head_dim = query.shape
    height, width = size
    grid_query = query.reshape(batch_size, num_heads, height, width, head_dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, relative_height).reshape(
        batch_size, num_heads, tokens, height
    )
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, relative_width).reshape(batch_size, num_heads, tokens, width)
    # key j = h_j * W + w_j: one-hot rows of its grid row and column
    row_of_key = torch.eye(height, dtype=key.dtype, device=key.device).repeat_interleave(width, dim=0)
    column_of_key = torch.eye(width, dtype=key.dtype, device=key.device).repeat(height, 1)
    extended_query = torch.cat([query * head_dim**-0.5, rel_h, rel_w], dim=-1)
    extended_key = torch.cat(
        [
            key,
            row_of_key.expand(batch_size, num_heads, tokens, height),
            column_of_key.expand(batch_size, num_heads, tokens, width),
        ],
        dim=-1,
    )
    return F.scaled_dot_product_attention(extended_query, extended_key, value, scale=1.0)


def relative_position_attention_in_place(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """
    The same softmax(q k^T / sqrt(d) + rel_h + rel_w) v as `relative_position_attention`, as two batched matmuls with
    the decomposed bias added in place into the scores through broadcasting views: no `(tokens, tokens)` bias tensor,
    no extra channels. On CPU in bf16 this beats SDPA with a materialized bias per head (oneDNN's bf16 matmuls run near
    their peak, the flash kernel with a mask does not): the bias costs two in-place passes over the scores instead of
    building and reading a second score-sized tensor. The softmax reads bf16 and accumulates in float32 (PyTorch's CPU
    softmax for reduced-precision inputs).

    Arguments and result as `relative_position_attention`.
    """
    batch_size, num_heads, tokens, head_dim = query.shape
    height, width = size
    flat_query = query.reshape(batch_size * num_heads, tokens, head_dim)
    grid_query = flat_query.view(batch_size * num_heads, height, width, head_dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_query, relative_height)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_query, relative_width)
    scores = torch.matmul(
        flat_query * head_dim**-0.5, key.reshape(batch_size * num_heads, tokens, head_dim).transpose(1, 2)
    )
    grid_scores = scores.view(batch_size * num_heads, height, width, height, width)
    grid_scores.add_(rel_h[:, :, :, :, None]).add_(rel_w[:, :, :, None, :])
    probabilities = scores.softmax(dim=-1)
    output = torch.matmul(probabilities, value.reshape(batch_size * num_heads, tokens, head_dim))
    return output.view(batch_size, num_heads, tokens, head_dim)


class PosSAMVisionAttention(SamVisionSdpaAttention):
    """
    `SamVisionSdpaAttention` (same parameters and state-dict keys, same math). transformers' version materializes the
    decomposed relative-position bias for every head at once: in a global-attention layer at 1024x1024 input that is
    12 x 4096 x 4096 floats (0.8 GB for ViT-B, 1.6 GB peak inside SDPA). Here:
    - on CPU in float32, heads go `heads_per_chunk` at a time (one by default): the bias is bounded to 67 MB, and
      every layer (windowed ones too) runs faster than with transformers' version;
    - on CPU in a reduced precision (bf16 / fp16 weights), `relative_position_attention_in_place` on chunks of heads
      whose scores fit in 32 MB (one head of a global layer, all heads of a windowed one): a global layer at
      1024x1024 in bf16 runs about 1.3x faster than SDPA with the bias head by head (benchmarks, docs/design.md);
    - on other devices, all heads at once through `relative_position_attention` (no bias tensor at all): head by
      head would be bound by kernel launches on a GPU.
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
        on_cpu = hidden_states.device.type == "cpu"
        if self.use_rel_pos and on_cpu and query.dtype != torch.float32:
            relative_height = self.get_rel_pos(height, height, self.rel_pos_h)
            relative_width = self.get_rel_pos(width, width, self.rel_pos_w)
            score_bytes = batch_size * tokens * tokens * query.element_size()
            heads_per_chunk = max(1, _SCORE_CHUNK_BYTES // score_bytes)
            attention = torch.cat(
                [
                    relative_position_attention_in_place(
                        query[:, first : first + heads_per_chunk],
                        key[:, first : first + heads_per_chunk],
                        value[:, first : first + heads_per_chunk],
                        relative_height,
                        relative_width,
                        (height, width),
                    )
                    for first in range(0, self.num_attention_heads, heads_per_chunk)
                ],
                dim=1,
            )
        elif self.use_rel_pos and not on_cpu:
            attention = relative_position_attention(
                query,
                key,
                value,
                self.get_rel_pos(height, height, self.rel_pos_h),
                self.get_rel_pos(width, width, self.rel_pos_w),
                (height, width),
            )
        elif not self.use_rel_pos:
            attention = F.scaled_dot_product_attention(query, key, value)
        else:
            outputs = []
            for first in range(0, self.num_attention_heads, self.heads_per_chunk):
                heads = slice(first, first + self.heads_per_chunk)
                chunk_query = query[:, heads]
                chunk = chunk_query.shape[1]
                bias = self.get_decomposed_rel_pos(
                    chunk_query.reshape(batch_size * chunk, tokens, -1),
                    self.rel_pos_h,
                    self.rel_pos_w,
                    (height, width),
                    (height, width),
                ).reshape(batch_size, chunk, tokens, tokens)
                outputs.append(
                    F.scaled_dot_product_attention(chunk_query, key[:, heads], value[:, heads], attn_mask=bias)
                )
            attention = torch.cat(outputs, dim=1)
        attention = attention.view(batch_size, self.num_attention_heads, height, width, -1)
        return self.proj(attention.permute(0, 2, 3, 1, 4).reshape(batch_size, height, width, -1)), None
