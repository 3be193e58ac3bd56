"""
SAM's attention with its decomposed relative-position bias as one Triton kernel (inference on CUDA; a GPU candidate,
benchmarks/gpu_candidates.py and device_check.py): flash attention's online softmax over blocks of keys, the bias
`rel_h(i, h_j) + rel_w(i, w_j)` made inside the kernel from the query tile and the layer's two resized tables.
CUDA's default, `relative_position_attention`, instead computes the bias factors with two einsums (which copy the
whole query) and appends them to the query and key as H + W extra channels: two concatenations that write the whole
query and key again (on an H200 a third of PosSAM-H's batch-8 copies and concatenations, docs/design.md "Fourteenth
session") and a longer head for the score matmul. This kernel also reads q, k and v in place in the qkv
projection's layout and writes its output in the layout the output projection reads, so neither side copies. It is
a `torch.library` custom op, so `torch.compile` graphs (and CUDA graphs) keep it.
"""

from __future__ import annotations

import functools
import os

import torch

from ..triton_support import (
    kernel_op,
    launch_or_fall_back,
    on_launch_device,
    require_triton_language,
    triton_runs_on,
)
from .sam_attention import relative_position_attention


__all__ = ["relative_position_attention_triton"]

# query tokens per program (the default; `block_queries`), and the least key tokens per step of the loop over keys
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


def _check_attention_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int] | list[int],
    block_queries: int,
) -> None:
    if block_queries < 16 or block_queries & (block_queries - 1):
        raise ValueError(
            f"relative_position_attention_triton: block_queries must be a power of 2 >= 16, got {block_queries}."
        )
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"relative_position_attention_triton reads float32, bf16 or fp16 inputs, got {query.dtype}.")
    _, _, tokens, head_dim = query.shape
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
    if not relative_height.dtype.is_floating_point or not relative_width.dtype.is_floating_point:
        raise ValueError(
            "relative_position_attention_triton: the relative-position rows must be floating point, got "
            f"{relative_height.dtype} and {relative_width.dtype}."
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            "relative_position_attention_triton: query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype} and {value.dtype}."
        )


def _empty_output(query: torch.Tensor) -> torch.Tensor:
    """`(B, heads, N, d)` in the query's dtype, a view of a new `(B, N, heads, d)` tensor: the layout the output
    projection reads."""
    batch_size, num_heads, tokens, head_dim = query.shape
    return query.new_empty(batch_size, tokens, num_heads, head_dim).transpose(1, 2)


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: list[int],
    num_warps: int,
    block_queries: int,
) -> torch.Tensor:
    """`relative_position_attention_triton`'s op: the checks, the launch, or where the kernel cannot be built here
    the SDPA form (`relative_position_attention`) written into the same layout."""
    if not triton_runs_on(query.device):
        raise RuntimeError(
            f"relative_position_attention_triton needs CUDA and Triton; the inputs are on {query.device}."
        )
    _check_attention_inputs(query, key, value, relative_height, relative_width, size, block_queries)
    height, width = size
    output = _empty_output(query)
    launch_or_fall_back(
        # one key per device and compiled form: a kernel that cannot be built for one stays on for the others
        (
            "relative_position_attention_triton",
            str(query.device),
            query.dtype,
            relative_height.dtype,
            relative_width.dtype,
            query.shape[-1],
            height,
            width,
            num_warps,
            block_queries,
        ),
        lambda: _launch(
            query, key, value, relative_height, relative_width, output, (height, width), num_warps, block_queries
        ),
        # the rows rounded to the query's dtype as the kernel reads them (float32 tables beside a bf16 query: inside
        # an op, and in compiled graphs, autocast does not cast for the einsums)
        lambda: output.copy_(
            relative_position_attention(
                query, key, value, relative_height.to(query.dtype), relative_width.to(query.dtype), (height, width)
            )
        ),
    )
    return output


def _launch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    output: torch.Tensor,
    size: tuple[int, int],
    num_warps: int,
    block_queries: int,
) -> None:
    batch_size, num_heads, tokens, head_dim = query.shape
    height, width = size
    # the kernel reads the last dimension of every input densely; other strides as they come (no copy of a view of
    # the qkv projection)
    query, key, value, relative_height, relative_width = (
        tensor if tensor.stride(-1) == 1 else tensor.contiguous()
        for tensor in (query, key, value, relative_height, relative_width)
    )
    require_triton_language("gather")  # Triton 3.3 and later: an older one falls back (`launch_or_fall_back`)
    first_dim, rest_dim = _channel_blocks(head_dim)
    width_pad = _power_of_2_at_least(width)
    key_rows = max(1, _KEYS_PER_STEP // width_pad)
    # one dimension (up to 2**31 - 1 programs; a second one would stop at 65,535 sequences, 164 images of SAM-H's
    # windows), the query blocks of a sequence consecutive
    grid = (batch_size * num_heads * -(-tokens // block_queries),)
    with on_launch_device(query.device):
        _kernel()[grid](
            query,
            key,
            value,
            relative_height,
            relative_width,
            output,
            *query.stride()[:3],
            *key.stride()[:3],
            *value.stride()[:3],
            *output.stride()[:3],
            *relative_height.stride()[:2],
            *relative_width.stride()[:2],
            num_heads,
            tokens,
            height,
            width,
            head_dim**-0.5,
            HEAD_DIM=head_dim,
            FIRST_DIM=first_dim,
            REST_DIM=rest_dim,
            BLOCK_QUERIES=block_queries,
            KEY_ROWS=key_rows,
            WIDTH_PAD=width_pad,
            # at least a step's key rows (Triton's gather of a step's rows needs them within one warp's reach:
            # grids of 1 or 2 rows narrower than 32 lanes failed to lower for sm_90 otherwise)
            HEIGHT_PAD=max(_power_of_2_at_least(height), key_rows),
            TABLE_H_PAD=max(16, _power_of_2_at_least(2 * height - 1)),
            TABLE_W_PAD=max(16, _power_of_2_at_least(2 * width - 1)),
            IEEE_DOT=query.dtype == torch.float32,
            # Triton 3.8's interpreter multiplies bf16 tiles wrongly; products of 16-bit floats are exact in float32,
            # so float32 products give what a GPU's tensor cores give, up to the order of the float32 sums
            UPCAST_DOT=query.dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1",
            num_warps=num_warps,
            num_stages=1 if query.dtype == torch.float32 else 3,
        )


def _attend_shapes_only(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: list[int],
    num_warps: int,
    block_queries: int,
) -> torch.Tensor:
    """`_attend`'s fake implementation: its checks and an empty result in its layout."""
    _check_attention_inputs(query, key, value, relative_height, relative_width, size, block_queries)
    return _empty_output(query)


_attend_op = kernel_op(__name__, "relative_position_attention", _attend, _attend_shapes_only)


def relative_position_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    relative_height: torch.Tensor,
    relative_width: torch.Tensor,
    size: tuple[int, int],
    num_warps: int = 8,
    block_queries: int = _QUERIES_PER_PROGRAM,
) -> torch.Tensor:
    """
    softmax(q k^T / sqrt(d) + rel_h + rel_w) v with SAM's decomposed relative positions, as
    `relative_position_attention` (same arguments and result), in one kernel, a custom op (`torch.compile` graphs
    and CUDA graphs call it): the bias factors `rel_h(i, r)` = q_i . R_h[h_i, r] and `rel_w(i, c)` = q_i . R_w[w_i, c]
    are made inside it from the query tile, as one small matmul of each program's queries with each resized table
    (`2 H - 1` and `2 W - 1` rows) and a pick of each query's entries, so no tensor but the output is written.
    Scores, bias, softmax and sums in float32; the probabilities are rounded to the value's dtype for the second
    matmul (flash attention's practice; in float32 every matmul uses exact float32 products, not TF32). Inference
    only (no autograd). Where Triton cannot build the kernel on this machine, the SDPA form runs instead
    (`launch_or_fall_back`).

    Args:
        query, key, value: `(B, heads, H * W, d)`, any strides with d contiguous (views of the qkv projection).
        relative_height, relative_width: `(H, H, d)`, `(W, W, d)`: `get_rel_pos` of the layer's tables for a square
            attention (query and key grids of one size), in the inputs' dtype. Such rows repeat one table along their
            diagonals, R[a, b] = table[a - b + n - 1]: the kernel reads the table from their first row and first
            column only. In any float dtype: the kernel rounds them to the query's (as autocast does for the default
            path's einsums).
        size: `(H, W)`, the token grid.
        num_warps: warps per program. Compiled for sm_90 with Triton 3.8 (before the bias factors moved into the
            kernel), the bf16 kernel at 4 warps used all 255 registers and spilled 0.6-1.9 KB per thread (head sizes
            64 and 80), at 8 warps 24 and 208 bytes: 8 until a GPU has timed both (`benchmarks/gpu_candidates.py`
            does). Float32 runs with one pipeline stage: with the default three, its tiles needed 131 KB (head size
            64) and 213 KB (80) of shared memory, more than an A100 or an sm_86/89 GPU has per block. With the bias
            made inside, sm_90 bf16 at 8 warps: 204-245 registers and no spills (docs/design.md, "Seventeenth
            session"); float32 spills 0.8-28 KB per thread.
        block_queries: query tokens per program, a power of 2 of at least 16. 64 by default; 128 (8 warps; for
            sm_90 in bf16, 0-128 bytes of spills) is a candidate the GPU checks time beside it.

    Returns:
        `(B, heads, H * W, d)` in the query's dtype: a view of a `(B, H * W, heads, d)` tensor, so that moving the
        heads next to the channels for the output projection is a view too.

    Raises:
        RuntimeError: autograd would need a gradient, or Triton cannot run on the inputs' device.
        ValueError: a dtype other than float32, bf16 or fp16, a key or value of another dtype than the query's,
            inputs whose shapes disagree, or `block_queries` not a power of 2 of at least 16.
    """
    if torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (query, key, value, relative_height, relative_width)
    ):
        raise RuntimeError("relative_position_attention_triton has no backward: use it for inference only.")
    height, width = size
    return _attend_op(
        query, key, value, relative_height, relative_width, [int(height), int(width)], num_warps, block_queries
    )


# the attention layer gives way to `relative_position_attention` where autograd, a float64 layer or a portable trace
# needs it; an op, it stays in `torch.compile` graphs and serves fake tensors
relative_position_attention_triton.inference_only = True  # type: ignore[attr-defined]
relative_position_attention_triton.compiles_as_an_op = True  # type: ignore[attr-defined]
