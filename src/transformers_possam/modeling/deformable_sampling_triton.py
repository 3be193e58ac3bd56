"""
Multi-scale deformable sampling as one fused Triton kernel (inference on CUDA): what FC-CLIP's compiled
`MSDeformAttn` CUDA op computes, without the `(B * heads, head_dim, Q, levels * points)` tensor of sampled values that
transformers' `grid_sample` version writes, stacks, multiplies and sums (about half of the bytes PosSAM-B's
memory-bound operators move in a bf16 forward on the CUDA code path, docs/design.md "Thirteenth session").
"""

from __future__ import annotations

import functools

import torch

from ..device_transfer import DeviceConstants, to_device
from ..triton_support import on_launch_device, triton_runs_on


__all__ = ["deformable_attention_triton"]

# queries per program: a [queries, head_dim] tile of 64 x 32 float32 accumulators
_QUERIES_PER_PROGRAM = 64


def _level_table(spatial_shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """`(levels, 3)` int32: each level's height, width and first value row; made on the host and copied without
    waiting (a host tensor built on a CUDA device would synchronize)."""
    rows, start = [], 0
    for height, width in spatial_shapes:
        rows.append([height, width, start])
        start += height * width
    return to_device(torch.tensor(rows, dtype=torch.int32, device="cpu"), device)


# made once per sizes and device in eager mode: no host-to-device copy per layer and call (which a CUDA graph could
# not capture either)
_level_tables = DeviceConstants(_level_table)


@functools.cache
def _kernel():
    """The Triton kernel, made on first use (Triton is optional; its interpreter is chosen when Triton is imported)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sample(
        value_ptr,  # (B, N, heads, head_dim), float32 or bf16
        levels_ptr,  # (levels, 3) int32: height, width, first value row
        locations_ptr,  # (B, Q, heads, levels, points, 2) float32, normalized (x, y)
        weights_ptr,  # (B, Q, heads, levels, points) float32
        output_ptr,  # (B, Q, heads, head_dim) float32
        num_values,
        num_queries,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_DIM: tl.constexpr,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_QUERIES: tl.constexpr,
    ):
        image_head = tl.program_id(0)
        image = image_head // NUM_HEADS
        head = image_head % NUM_HEADS
        query = tl.program_id(1) * BLOCK_QUERIES + tl.arange(0, BLOCK_QUERIES)
        in_range = query < num_queries
        channel = tl.arange(0, BLOCK_DIM)
        channel_ok = channel < HEAD_DIM
        accumulator = tl.zeros([BLOCK_QUERIES, BLOCK_DIM], dtype=tl.float32)
        # int64 offsets: batch x N x heads x head_dim passes 2**31 at a few hundred 1024x1024 images
        sample_base = ((image * num_queries + query).to(tl.int64) * NUM_HEADS + head) * NUM_LEVELS
        for level in tl.static_range(NUM_LEVELS):
            height = tl.load(levels_ptr + 3 * level)
            width = tl.load(levels_ptr + 3 * level + 1)
            start = tl.load(levels_ptr + 3 * level + 2)
            for point in tl.static_range(NUM_POINTS):
                sample_index = (sample_base + level) * NUM_POINTS + point
                x = tl.load(locations_ptr + 2 * sample_index, mask=in_range, other=0.0)
                y = tl.load(locations_ptr + 2 * sample_index + 1, mask=in_range, other=0.0)
                attention = tl.load(weights_ptr + sample_index, mask=in_range, other=0.0)
                # grid_sample's pixel coordinates with align_corners=False
                pixel_x = x * width - 0.5
                pixel_y = y * height - 0.5
                x0 = tl.floor(pixel_x)
                y0 = tl.floor(pixel_y)
                fraction_x = pixel_x - x0
                fraction_y = pixel_y - y0
                column_0 = x0.to(tl.int32)
                row_0 = y0.to(tl.int32)
                for corner in tl.static_range(4):
                    dy = corner // 2
                    dx = corner % 2
                    column = column_0 + dx
                    row = row_0 + dy
                    weight_x = fraction_x if dx == 1 else (x0 + 1.0) - pixel_x
                    weight_y = fraction_y if dy == 1 else (y0 + 1.0) - pixel_y
                    # zero padding: a corner off the map reads nothing
                    on_map = in_range & (column >= 0) & (column < width) & (row >= 0) & (row < height)
                    value_row = (image * num_values + start + row * width + column).to(tl.int64)
                    offsets = (value_row * NUM_HEADS + head) * HEAD_DIM
                    corner_values = tl.load(
                        value_ptr + offsets[:, None] + channel[None, :],
                        mask=on_map[:, None] & channel_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    accumulator += (attention * weight_y * weight_x)[:, None] * corner_values
        output_offsets = ((image * num_queries + query).to(tl.int64) * NUM_HEADS + head) * HEAD_DIM
        tl.store(
            output_ptr + output_offsets[:, None] + channel[None, :],
            accumulator,
            mask=in_range[:, None] & channel_ok[None, :],
        )

    return sample


def deformable_attention_triton(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """
    The same result as transformers' `multi_scale_deformable_attention` (bilinear sampling with zero padding and
    align_corners=False, weighted by the attention weights, summed over levels and points), in one kernel: each
    program takes 64 queries of one (image, head), reads the 4 bilinear corners of every sample straight from
    `value` and accumulates in float32. Inference only (no autograd). The locations and weights are read in float32
    (as FC-CLIP's op, `custom_fwd(cast_inputs=float32)`); the values in their own dtype (float32, or bf16: half the
    bytes gathered, each value exact in float32). Returns float32.

    Args:
        value: `(B, N, heads, head_dim)`, N = sum of h * w over the levels (level-major, row-major).
        spatial_shapes: `[(h, w)]` per level.
        sampling_locations: `(B, Q, heads, levels, points, 2)` normalized (x, y).
        attention_weights: `(B, Q, heads, levels, points)`.

    Returns:
        `(B, Q, heads * head_dim)` float32.

    Not registered as a `torch.library` custom op: traced graphs (`torch.compile`, `torch.export`) do not use it
    (marked `inference_only`, `PosSAMMultiscaleDeformableAttention` then runs transformers' sampler, which a compiled
    graph fuses by itself); serving them would need `torch.library.triton_op`.

    Raises:
        RuntimeError: autograd would need a gradient, or Triton cannot run on the inputs' device.
        ValueError: values of another dtype than float32, bf16 or fp16 (float64 would be rounded to float32 in
            silence), or spatial shapes that do not add up to the number of values.
    """
    if torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    ):
        raise RuntimeError("deformable_attention_triton has no backward: use it for inference only.")
    if not triton_runs_on(value.device):
        raise RuntimeError(f"deformable_attention_triton needs CUDA and Triton; the inputs are on {value.device}.")
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"deformable_attention_triton reads float32, bf16 or fp16 values, got {value.dtype}: use transformers' "
            "multi_scale_deformable_attention for other dtypes."
        )
    batch_size, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if sum(height * width for height, width in spatial_shapes) != num_values:
        raise ValueError("The spatial shapes do not add up to the number of values.")
    levels = _level_tables(tuple((int(h), int(w)) for h, w in spatial_shapes), value.device, like=value)
    output = torch.empty(batch_size, num_queries, num_heads, head_dim, dtype=torch.float32, device=value.device)
    grid = (batch_size * num_heads, -(-num_queries // _QUERIES_PER_PROGRAM))
    with on_launch_device(value.device):
        _kernel()[grid](
            value.contiguous(),
            levels,
            sampling_locations.float().contiguous(),
            attention_weights.float().contiguous(),
            output,
            num_values,
            num_queries,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_DIM=1 << (head_dim - 1).bit_length(),
            NUM_LEVELS=num_levels,
            NUM_POINTS=num_points,
            BLOCK_QUERIES=_QUERIES_PER_PROGRAM,
        )
    return output.view(batch_size, num_queries, num_heads * head_dim)


# `PosSAMMultiscaleDeformableAttention` passes a bf16 / fp16 model's values as they are to a sampler marked so, and
# uses transformers' sampler instead of an inference-only one where autograd or a trace needs it
deformable_attention_triton.reads_reduced_precision_values = True  # type: ignore[attr-defined]
deformable_attention_triton.inference_only = True  # type: ignore[attr-defined]
