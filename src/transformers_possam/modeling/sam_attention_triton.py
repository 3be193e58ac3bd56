"""
SAM's attention with its decomposed relative-position bias as one Triton kernel (inference on CUDA; a GPU candidate,
benchmarks/gpu_candidates.py): flash attention's online softmax over blocks of keys, the bias `rel_h(i, h_j) +
rel_w(i, w_j)` read from the two small factor tensors inside the kernel. CUDA's default, `relative_position_attention`,
instead appends the bias to the query and key as H + W extra channels: two concatenations that write the whole query
and key again (on an H200 a third of PosSAM-H's batch-8 copies and concatenations, docs/design.md "Fourteenth
session") and a longer head for the score matmul. This kernel also reads q, k and v in place in the qkv
projection's layout and writes its output in the layout the output projection reads, so neither side copies.
"""

from __future__ import annotations

import functools
import os

import torch

from ..triton_support import on_launch_device, triton_runs_on
from .sam_attention import _decomposed_bias_factors


__all__ = ["relative_position_attention_triton"]

# query tokens per program, and the least key tokens per step of the loop over keys
_QUERIES_PER_PROGRAM = 64
_KEYS_PER_STEP = 64


@functools.cache
def _kernel():
    """The Triton kernel, made on first use (Triton is optional; its interpreter is chosen when Triton is imported)."""
    import triton
    import triton.language as tl

    @triton.jit
    def attend(
        query_ptr,  # (B, heads, N, d) with strides, d contiguous
        key_ptr,
        value_ptr,
        rel_h_ptr,  # (B * heads, N, H) contiguous: q_i . R_h[h_i, k]
        rel_w_ptr,  # (B * heads, N, W) contiguous: q_i . R_w[w_i, k]
        output_ptr,  # (B, heads, N, d) with strides, d contiguous
        query_strides_b,
        query_strides_h,
        query_strides_n,
        key_strides_b,
        key_strides_h,
        key_strides_n,
        value_strides_b,
        value_strides_h,
        value_strides_n,
        output_strides_b,
        output_strides_h,
        output_strides_n,
        num_heads,
        tokens,
        height,
        width,
        scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_DIM: tl.constexpr,
        BLOCK_QUERIES: tl.constexpr,
        KEY_ROWS: tl.constexpr,  # grid rows of keys per step
        WIDTH_PAD: tl.constexpr,  # a power of 2 >= W: each grid row of keys padded to it
        IEEE_DOT: tl.constexpr,  # float32 inputs: full-precision products, not TF32
        UPCAST_DOT: tl.constexpr,  # half-precision inputs under Triton's interpreter, whose 16-bit dot is wrong
    ):
        sequence = tl.program_id(0)
        image = sequence // num_heads
        head = sequence % num_heads
        query_index = tl.program_id(1) * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
        query_ok = query_index < tokens
        channel = tl.arange(0, BLOCK_DIM)
        channel_ok = channel < HEAD_DIM
        query_base = query_ptr + image.to(tl.int64) * query_strides_b + head * query_strides_h
        query = tl.load(
            query_base + query_index[:, None].to(tl.int64) * query_strides_n + channel[None, :],
            mask=query_ok[:, None] & channel_ok[None, :],
            other=0.0,
        )
        # a step's keys are KEY_ROWS whole rows of the key grid, each padded to WIDTH_PAD lanes: a lane's column is
        # the same in every step, so the rel_w part of the bias is read once
        lane = tl.arange(0, KEY_ROWS * WIDTH_PAD)
        lane_row = lane // WIDTH_PAD
        lane_column = lane % WIDTH_PAD
        column_ok = lane_column < width
        factor_row = sequence.to(tl.int64) * tokens + query_index
        bias_w = tl.load(
            rel_w_ptr + factor_row[:, None] * width + lane_column[None, :],
            mask=query_ok[:, None] & column_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        key_base = key_ptr + image.to(tl.int64) * key_strides_b + head * key_strides_h
        value_base = value_ptr + image.to(tl.int64) * value_strides_b + head * value_strides_h
        running_max = tl.full([BLOCK_QUERIES], float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros([BLOCK_QUERIES], dtype=tl.float32)
        accumulator = tl.zeros([BLOCK_QUERIES, BLOCK_DIM], dtype=tl.float32)
        for first_row in range(0, height, KEY_ROWS):
            key_row = first_row + lane_row
            key_ok = column_ok & (key_row < height)
            key_index = (key_row * width + lane_column).to(tl.int64)
            key = tl.load(
                key_base + key_index[:, None] * key_strides_n + channel[None, :],
                mask=key_ok[:, None] & channel_ok[None, :],
                other=0.0,
            )
            if IEEE_DOT:
                scores = tl.dot(query, tl.trans(key), input_precision="ieee")
            elif UPCAST_DOT:
                scores = tl.dot(query.to(tl.float32), tl.trans(key.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(query, tl.trans(key))
            bias_h = tl.load(
                rel_h_ptr + factor_row[:, None] * height + key_row[None, :],
                mask=query_ok[:, None] & key_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            scores = scores * scale + bias_h + bias_w
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            probabilities = tl.exp(scores - new_max[:, None])
            correction = tl.exp(running_max - new_max)
            running_sum = running_sum * correction + tl.sum(probabilities, axis=1)
            value = tl.load(
                value_base + key_index[:, None] * value_strides_n + channel[None, :],
                mask=key_ok[:, None] & channel_ok[None, :],
                other=0.0,
            )
            rounded = probabilities.to(value.dtype)
            if IEEE_DOT:
                weighted = tl.dot(rounded, value, input_precision="ieee")
            elif UPCAST_DOT:
                weighted = tl.dot(rounded.to(tl.float32), value.to(tl.float32), input_precision="ieee")
            else:
                weighted = tl.dot(rounded, value)
            accumulator = accumulator * correction[:, None] + weighted
            running_max = new_max
        accumulator = accumulator / running_sum[:, None]
        output_base = output_ptr + image.to(tl.int64) * output_strides_b + head * output_strides_h
        tl.store(
            output_base + query_index[:, None].to(tl.int64) * output_strides_n + channel[None, :],
            accumulator.to(output_ptr.dtype.element_ty),
            mask=query_ok[:, None] & channel_ok[None, :],
        )

    return attend


def _power_of_2_at_least(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def relative_position_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int],
    num_warps: int = 8,
) -> torch.Tensor:
    """
    softmax(q k^T / sqrt(d) + rel_h + rel_w) v with SAM's decomposed relative positions, as
    `relative_position_attention` (same arguments and result), in one kernel: the bias factors `rel_h` `(B, heads,
    H * W, H)` and `rel_w` `(B, heads, H * W, W)` (`_decomposed_bias_factors`, in the inputs' dtype as the default path
    computes them) are the only extra tensors. Scores, softmax and sums in float32; the probabilities are rounded to
    the value's dtype for the second matmul (flash attention's practice; in float32 both matmuls are exact float32
    products, not TF32). Inference only (no autograd).

    Args:
        query, key, value: `(B, heads, H * W, d)`, any strides with d contiguous (views of the qkv projection).
        relative_height, relative_width: `(H, H, d)`, `(W, W, d)`: `get_rel_pos` of the layer's tables.
        size: `(H, W)`, the token grid.
        num_warps: warps per program. Compiled for sm_90 with Triton 3.8, the bf16 kernel at 4 warps used all 255
            registers and spilled 0.6-1.9 KB per thread (head sizes 64 and 80), at 8 warps 24 and 208 bytes: 8 until
            a GPU has timed both (`benchmarks/gpu_candidates.py` does). Float32 runs with one pipeline stage: with the
            default three, its tiles needed 131 KB (head size 64) and 213 KB (80) of shared memory, more than an A100
            or an sm_86/89 GPU has per block.

    Returns:
        `(B, heads, H * W, d)` in the query's dtype: a view of a `(B, H * W, heads, d)` tensor, so that moving the
        heads next to the channels for the output projection is a view too.

    Raises:
        RuntimeError: autograd would need a gradient, or Triton cannot run on the inputs' device.
        ValueError: a dtype other than float32, bf16 or fp16, or inputs whose shapes disagree.
    """
    if torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (query, key, value, relative_height, relative_width)
    ):
        raise RuntimeError("relative_position_attention_triton has no backward: use it for inference only.")
    if not triton_runs_on(query.device):
        raise RuntimeError(
            f"relative_position_attention_triton needs CUDA and Triton; the inputs are on {query.device}."
        )
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"relative_position_attention_triton reads float32, bf16 or fp16 inputs, got {query.dtype}.")
    batch_size, num_heads, tokens, head_dim = query.shape
    height, width = size
    if height * width != tokens or key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"relative_position_attention_triton: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} must be equal (B, heads, H * W, d) with H * W = {height} * {width}."
        )
    if relative_height.shape != (height, height, head_dim) or relative_width.shape != (width, width, head_dim):
        raise ValueError(
            f"relative_position_attention_triton: relative_height {tuple(relative_height.shape)} and relative_width "
            f"{tuple(relative_width.shape)} must be (H, H, d) = {(height, height, head_dim)} and (W, W, d) = "
            f"{(width, width, head_dim)} (`get_rel_pos` of the layer's tables)."
        )
    query, key, value = (tensor if tensor.stride(-1) == 1 else tensor.contiguous() for tensor in (query, key, value))
    rel_h, rel_w = _decomposed_bias_factors(query, relative_height, relative_width, size)
    rel_h = rel_h.reshape(batch_size * num_heads, tokens, height).contiguous()
    rel_w = rel_w.reshape(batch_size * num_heads, tokens, width).contiguous()
    output = torch.empty(batch_size, tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    output_heads_first = output.transpose(1, 2)  # (B, heads, N, d)
    width_pad = _power_of_2_at_least(width)
    key_rows = max(1, _KEYS_PER_STEP // width_pad)
    grid = (batch_size * num_heads, -(-tokens // _QUERIES_PER_PROGRAM))
    with on_launch_device(query.device):
        _kernel()[grid](
            query,
            key,
            value,
            rel_h,
            rel_w,
            output_heads_first,
            *query.stride()[:3],
            *key.stride()[:3],
            *value.stride()[:3],
            *output_heads_first.stride()[:3],
            num_heads,
            tokens,
            height,
            width,
            head_dim**-0.5,
            HEAD_DIM=head_dim,
            BLOCK_DIM=max(16, _power_of_2_at_least(head_dim)),
            BLOCK_QUERIES=_QUERIES_PER_PROGRAM,
            KEY_ROWS=key_rows,
            WIDTH_PAD=width_pad,
            IEEE_DOT=query.dtype == torch.float32,
            # Triton 3.8's interpreter multiplies bf16 tiles wrongly; products of 16-bit floats are exact in float32,
            # so float32 products give what a GPU's tensor cores give, up to the order of the float32 sums
            UPCAST_DOT=query.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=num_warps,
            num_stages=1 if query.dtype == torch.float32 else 3,
        )
    return output_heads_first


# the attention layer gives way to `relative_position_attention` where autograd, a trace, fake tensors or float64
# need it
relative_position_attention_triton.inference_only = True  # type: ignore[attr-defined]
