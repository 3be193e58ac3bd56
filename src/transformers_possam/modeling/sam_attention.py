"""
SAM's attention with its decomposed relative-position bias, without materializing the bias for all heads at once:
in cache-sized blocks of scores on CPU, all heads in one fused attention call elsewhere (CUDA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

from ..device_transfer import DeviceConstants
from ..triton_support import gives_way_to_pytorch


__all__ = [
    "PosSAMVisionAttention",
    "relative_position_attention",
    "relative_position_attention_blocked",
    "relative_position_query_and_key",
    "relative_position_rows",
]

# bytes of attention scores one step of the CPU path holds: small enough to stay in this class of CPU's L2 / L3 and
# in glibc's heap (no fresh pages), large enough that each step's matmuls are efficient (4 MB was best of 1-16 MB for
# float32 and bf16 on a 2-core EPYC, docs/design.md)
_SCORE_BLOCK_BYTES = 4 * 2**20


def _decomposed_bias_factors(
    query: torch.Tensor, relative_height: torch.Tensor, relative_width: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The two factors of SAM's decomposed relative-position bias, per query i = (h_i, w_i): `rel_h[..., i, k]` =
    q_i . R_h[h_i, k] `(..., H * W, H)` and `rel_w[..., i, k]` = q_i . R_w[w_i, k] `(..., H * W, W)`, for a query
    `(..., H * W, d)`. The bias of query i and key j = (h_j, w_j) is `rel_h[i, h_j] + rel_w[i, w_j]`.
    """
    *leading, tokens, head_dim = query.shape
    height, width = size
    grid_query = query.reshape(*leading, height, width, head_dim)
    rel_h = torch.einsum("...hwc,hkc->...hwk", grid_query, relative_height).reshape(*leading, tokens, height)
    rel_w = torch.einsum("...hwc,wkc->...hwk", grid_query, relative_width).reshape(*leading, tokens, width)
    return rel_h, rel_w


def _key_grid_one_hot(
    size: tuple[int, int], dtype: torch.dtype, device: torch.device, padding: int = 0
) -> torch.Tensor:
    """
    `(H * W, H + W + padding)`: row j is [e(h_j), e(w_j), 0...], the one-hot grid row and column of key
    j = h_j * W + w_j, then `padding` zero columns.
    """
    height, width = size
    row_of_key = torch.eye(height, dtype=dtype, device=device).repeat_interleave(width, dim=0)
    column_of_key = torch.eye(width, dtype=dtype, device=device).repeat(height, 1)
    parts = [row_of_key, column_of_key]
    if padding:
        parts.append(row_of_key.new_zeros(height * width, padding))
    return torch.cat(parts, dim=1)


# made once per size, dtype and device in eager mode: six small kernels per layer and forward otherwise, launches that
# dominate a GPU layer's host time at batch 1
_cached_key_grid_one_hot = DeviceConstants(_key_grid_one_hot)


def _relative_position_grid(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """
    `(q_size, k_size)` int64: the row of SAM's resized relative-position table for query i and key j, as
    transformers' `get_rel_pos` computes it (the shorter side's coordinates scaled to the longer's), made on `device`.
    """
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    return ((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()


# SAM has two sizes per model, its windows and its grid
_relative_position_index = DeviceConstants(_relative_position_grid)


def relative_position_rows(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """
    SAM's relative-position rows, as transformers' `SamVisionAttention.get_rel_pos`: the `(L, d)` table linearly
    resized to 2 max(q, k) - 1 rows, then the row of each (query, key) pair, `(q_size, k_size, d)`, with the index grid
    on the table's device (in eager mode made once per sizes and device, `DeviceConstants`).
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] == max_rel_dist:
        # SAM's tables have exactly this length at their input size: the linear resize to the same length is the
        # identity (every output position lands on an input row with weight 1), one kernel and a copy saved
        resized = rel_pos
    else:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=max_rel_dist, mode="linear"
        )
        resized = resized.reshape(-1, max_rel_dist).permute(1, 0)
    return resized[_relative_position_index(q_size, k_size, rel_pos.device, like=rel_pos)]


# PyTorch's memory-efficient CUDA attention, the fused kernel that accepts a value head size other than the query's,
# needs head sizes that are multiples of 8 in half precision (4 in float32); flash attention needs all three equal.
_FUSED_HEAD_SIZE_MULTIPLE = 8


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
    [e(h_j), e(w_j)], so it is appended to q and k as H + W extra channels (scale 1, q pre-scaled), then zero
    channels up to a multiple of 8 (SAM-B's 14 x 14 windows: 64 + 28 = 92 -> 96), without which CUDA's
    memory-efficient kernel refuses half-precision inputs and SDPA falls back to its unfused math. Exact up to
    rounding. Costs (d + H + W) / d of the score matmul's FLOPs, which on CPU makes it slower than
    `relative_position_attention_blocked`.

    Args:
        query, key, value: `(B, heads, H * W, d)`.
        relative_height, relative_width: `(H, H, d)`, `(W, W, d)`: `get_rel_pos` of the layer's tables.
        size: `(H, W)`, the token grid.

    Returns:
        `(B, heads, H * W, d)`.
    """
    extended_query, extended_key = relative_position_query_and_key(query, key, relative_height, relative_width, size)
    return F.scaled_dot_product_attention(extended_query, extended_key, value, scale=1.0)


def relative_position_query_and_key(
    query: torch.Tensor,
    key: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `relative_position_attention`'s extended query `[q / sqrt(d), rel_h, rel_w, 0...]` and key `[k, e(h_j), e(w_j),
    0...]`, both `(B, heads, H * W, d + H + W + padding)`: with scale 1, their scores are SAM's scores plus its
    decomposed relative-position bias.
    """
    batch_size, num_heads, tokens, head_dim = query.shape
    rel_h, rel_w = _decomposed_bias_factors(query, relative_height, relative_width, size)
    padding = -(head_dim + sum(size)) % _FUSED_HEAD_SIZE_MULTIPLE
    key_one_hot = _cached_key_grid_one_hot(size, key.dtype, key.device, padding, like=key)
    query_parts = [query * head_dim**-0.5, rel_h, rel_w]
    if padding:
        query_parts.append(query.new_zeros(batch_size, num_heads, tokens, padding))
    extended_query = torch.cat(query_parts, dim=-1)
    extended_key = torch.cat([key, key_one_hot.expand(batch_size, num_heads, tokens, -1)], dim=-1)
    return extended_query, extended_key


def relative_position_attention_blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int],
    score_block_bytes: int = _SCORE_BLOCK_BYTES,
) -> torch.Tensor:
    """
    The same softmax(q k^T / sqrt(d) + rel_h + rel_w) v as `relative_position_attention`, in blocks of scores that
    stay in cache: for each block of query rows (a global layer at 1024x1024: 256 rows x 4096 keys in float32) or of
    whole sequences (a windowed layer: several windows x heads of 196 x 196), the decomposed bias and the score
    matmul summed in place (the bias through broadcasting views, or as a second matmul for small grids), an in-place
    softmax and a second matmul. No `(tokens, tokens)` tensor exists at any time, neither scores nor bias: on CPU,
    where fresh large tensors cost page faults and their traffic leaves the caches, this is 1.5x (float32) to 2x
    (bf16) faster than SDPA with a materialized bias head by head (docs/design.md). Differentiable (training through
    it keeps autograd's usual memory: one score block per step). A reduced-precision softmax reads bf16 / fp16 and accumulates in float32
    (PyTorch's CPU softmax).

    Args:
        query, key, value: `(B, heads, H * W, d)`.
        relative_height, relative_width: `(H, H, d)`, `(W, W, d)`: `get_rel_pos` of the layer's tables.
        size: `(H, W)`, the token grid.
        score_block_bytes: the most bytes of scores one step holds.

    Returns:
        `(B, heads, H * W, d)`.
    """
    batch_size, num_heads, tokens, head_dim = query.shape
    height, width = size
    sequences = batch_size * num_heads
    flat_query = query.reshape(sequences, tokens, head_dim)
    rel_h, rel_w = _decomposed_bias_factors(flat_query, relative_height, relative_width, size)
    bias_by_matmul = height + width < head_dim
    if bias_by_matmul:
        # small grids (windowed layers, 14 x 14): broadcast adds over a 14-wide last dimension run far below memory
        # speed (bf16: 3x slower than this), so the bias goes in as one more matmul into the scores,
        # [rel_h(i, :), rel_w(i, :)] @ [e(h_j); e(w_j)], at (H + W) / d of the score matmul's FLOPs
        bias_factors = torch.cat([rel_h, rel_w], dim=-1)
        key_one_hot = _cached_key_grid_one_hot(size, query.dtype, query.device, 0, like=query).T  # (H + W, tokens)
    scaled_query = flat_query * head_dim**-0.5
    # contiguous once: a matmul would otherwise copy the transposed key and the strided value at every block
    key_transposed = key.reshape(sequences, tokens, head_dim).transpose(1, 2).contiguous()
    flat_value = value.reshape(sequences, tokens, head_dim).contiguous()
    row_bytes = tokens * query.element_size()
    rows_per_block = max(1, min(tokens, score_block_bytes // row_bytes))
    sequences_per_block = max(1, score_block_bytes // (row_bytes * tokens)) if rows_per_block == tokens else 1
    # Without autograd every block writes into one score buffer and straight into the output: a fresh 4 MB
    # result per step is allocated and freed over and over, and glibc hands such blocks back to the kernel and
    # faults them in again (a bf16 512 x 4096 block: matmul + softmax 2.6 ms reused, 7.2 ms fresh). With autograd
    # (training through SAM), fresh tensors: autograd keeps each block's softmax for the backward pass.
    tracked = torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (query, key, value, relative_height, relative_width)
    )
    if not tracked:
        score_buffer = query.new_empty(sequences_per_block * rows_per_block * tokens)
        output = query.new_empty(sequences, tokens, head_dim)
    sequence_outputs = []
    for first_sequence in range(0, sequences, sequences_per_block):
        block_sequences = slice(first_sequence, first_sequence + sequences_per_block)
        row_outputs = []
        for first_row in range(0, tokens, rows_per_block):
            block_rows = slice(first_row, first_row + rows_per_block)
            block_query = scaled_query[block_sequences, block_rows]
            block_keys = key_transposed[block_sequences]
            # without autograd the block's scores go into the reused buffer (`out=None`: a fresh tensor)
            reused = (
                None
                if tracked
                else score_buffer[: block_query.shape[0] * block_query.shape[1] * tokens].view(
                    block_query.shape[0], block_query.shape[1], height, width
                )
            )
            if bias_by_matmul:
                scores = torch.matmul(block_query, block_keys, out=None if reused is None else reused.flatten(2))
                factors = bias_factors[block_sequences, block_rows]
                scores.baddbmm_(factors, key_one_hot.expand(factors.shape[0], -1, -1))
            else:
                # the bias first, rel_h(i, h_j) + rel_w(i, w_j) written through broadcasting views, then the score
                # matmul accumulated onto it: one pass over the block instead of two broadcast adds after the
                # matmul (bf16: 0.98 vs 1.26 ms per 512 x 4096 block; float32 1.50 vs 1.82), and in bf16 one
                # rounding of the bias instead of three of the sum
                bias = torch.add(
                    rel_h[block_sequences, block_rows, :, None],
                    rel_w[block_sequences, block_rows, None, :],
                    out=reused,
                )
                scores = bias.flatten(2).baddbmm_(block_query, block_keys)
            if tracked:
                row_outputs.append(torch.matmul(scores.softmax(dim=-1), flat_value[block_sequences]))
            else:
                # a block is either rows of one sequence or whole sequences: its output slice is contiguous
                torch.softmax(scores, dim=-1, out=scores)
                torch.matmul(scores, flat_value[block_sequences], out=output[block_sequences, block_rows])
        if tracked:
            sequence_outputs.append(torch.cat(row_outputs, dim=1) if len(row_outputs) > 1 else row_outputs[0])
    if tracked:
        output = torch.cat(sequence_outputs) if len(sequence_outputs) > 1 else sequence_outputs[0]
    return output.view(batch_size, num_heads, tokens, head_dim)


class PosSAMVisionAttention(SamVisionSdpaAttention):
    """
    `SamVisionSdpaAttention` (same parameters and state-dict keys, same math). transformers' version materializes the
    decomposed relative-position bias for every head at once: in a global-attention layer at 1024x1024 input that is
    12 x 4096 x 4096 floats (0.8 GB for ViT-B, 1.6 GB peak inside SDPA). Here:
    - on CPU, `relative_position_attention_blocked`: scores and bias in cache-sized blocks, never a
      `(tokens, tokens)` tensor; a global layer at 1024x1024 runs 1.5x (float32) to 2x (bf16) faster than SDPA with
      the bias head by head, windowed layers a little faster (docs/design.md);
    - on other devices, and in traced graphs (`torch.compile`, `torch.export`), all heads at once through
      `relative_position_attention` (no bias tensor at all): head by head, or block by block, would be bound by
      kernel launches on a GPU, and a loop over batch x heads cannot be traced with a dynamic batch size.
    `attention_function` chooses by device type.
    """

    def get_rel_pos(self, q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
        """
        transformers' `get_rel_pos`, `(q_size, k_size, d)`, as `relative_position_rows` (bitwise the same): its index
        grid made once on the table's device, where transformers makes it with `torch.arange` on the host in every
        call, and indexing a GPU table with a host index copies it over first, a blocking copy (a stream
        synchronization) in every layer.
        """
        return relative_position_rows(q_size, k_size, rel_pos)

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
        if not self.use_rel_pos:
            attention = F.scaled_dot_product_attention(query, key, value)
        else:
            attend = self.attention_function(hidden_states.device.type)
            tracing = torch.compiler.is_exporting() or torch.compiler.is_compiling()
            if attend is relative_position_attention_blocked and tracing:
                # the blocked loop runs over batch x heads, which tracing would have to unroll (and export cannot,
                # with a dynamic batch size): traced graphs take the all-heads form, as on GPU
                attend = relative_position_attention
            elif gives_way_to_pytorch(attend, (query, self.rel_pos_h, self.rel_pos_w)):
                # a kernel without a backward, opaque to traces and shape-only tensors, float32 at most (the Triton
                # kernel) gives way to the all-heads SDPA form
                attend = relative_position_attention
            attention = attend(
                query,
                key,
                value,
                self.get_rel_pos(height, height, self.rel_pos_h),
                self.get_rel_pos(width, width, self.rel_pos_w),
                (height, width),
            )
        # (B, heads, tokens, d) -> (B, H, W, heads * d): a view wherever the attention wrote that layout already
        # (the Triton kernel; SDPA's fused CUDA kernels), a copy otherwise
        return self.proj(attention.transpose(1, 2).reshape(batch_size, height, width, -1)), None

    @staticmethod
    def attention_function(device_type: str) -> Callable[..., torch.Tensor]:
        """
        The attention with the decomposed relative-position bias (arguments and result as
        `relative_position_attention`; one with a true `inference_only` attribute gives way to
        `relative_position_attention` where `gives_way_to_pytorch` says so: autograd, float64, portable traces, and
        unless it is a registered op also `torch.compile` traces and fake tensors): on CPU
        `relative_position_attention_blocked`, elsewhere `relative_position_attention` (SDPA with the bias as extra
        q/k channels). The Triton kernel `relative_position_attention_triton` (a custom op) is a CUDA candidate, not
        chosen until a GPU has timed it (`benchmarks/device_check.py`'s `sam_attention_triton`, the GPU suite's
        candidate rows and `benchmarks/gpu_candidates.py` replace this method); if chosen, for 16-bit inputs only:
        its float32 form spills registers (docs/design.md, "Seventeenth session").
        """
        return relative_position_attention_blocked if device_type == "cpu" else relative_position_attention
