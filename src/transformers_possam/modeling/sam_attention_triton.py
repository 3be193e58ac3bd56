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
    """The Triton kernel (`_sam_attention_kernel.attend`), imported on first use: Triton is optional, and its
    interpreter is chosen when Triton is imported."""
    from . import _sam_attention_kernel

    return _sam_attention_kernel.attend


def _channel_blocks(head_dim: int) -> tuple[int, int]:
    """The head's channels as two power-of-2 blocks for the kernel's matmuls (each at least 16, `tl.dot`'s least):
    the largest power of 2 not above the head size, then what is left padded (64 -> 64 + 0, 80 -> 64 + 16, 24 ->
    16 + 16, 8 -> 16 + 0)."""
    if head_dim <= 16:
        return 16, 0
    first = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - first
    return first, 0 if rest == 0 else max(16, _power_of_2_at_least(rest))


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
    first_dim, rest_dim = _channel_blocks(head_dim)
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
            FIRST_DIM=first_dim,
            REST_DIM=rest_dim,
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
