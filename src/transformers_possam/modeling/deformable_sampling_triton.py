"""
Multi-scale deformable sampling as one fused Triton kernel (CUDA's at inference; with its backward kernel, a training
candidate): what FC-CLIP's compiled `MSDeformAttn` CUDA op computes, without the `(B * heads, head_dim, Q, levels *
points)` tensor of sampled values that transformers' `grid_sample` version writes, stacks, multiplies and sums (about
half of the bytes PosSAM-B's memory-bound operators move in a bf16 forward on the CUDA code path, docs/design.md
"Thirteenth session"; the backward: "Eighteenth session").
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

from ..device_transfer import DeviceConstants, to_device
from ..triton_support import kernel_op, launch_or_fall_back, on_launch_device, triton_runs_on


__all__ = ["deformable_attention_triton", "deformable_attention_triton_from_projections"]

# queries per program: a [queries, head_dim] tile of 64 x 32 float32 accumulators
_QUERIES_PER_PROGRAM = 64
# the backward's: compiled without a GPU (Triton 3.8, ptxas -v, PosSAM's 8 heads of 32, 3 levels, 4 points, bf16
# values, 4 warps), 64 queries need 255 registers and spill 324 bytes (sm_90) to 396 (sm_80), 32 queries 254
# registers without spills (2 programs per SM), 16 queries 139-142 registers (3 per SM: more warps in flight to hide
# the atomics' latency); not timed on a GPU (docs/design.md, "Eighteenth session")
_BACKWARD_QUERIES_PER_PROGRAM = 16


def _level_table(spatial_shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """`(levels, 3)` int32: each level's height, width and first value row; made on the host and copied without
    waiting (a host tensor built on a CUDA device would synchronize; in a compiled graph inductor folds the copy of
    a constant into a device constant, `DeviceCopy.create`)."""
    rows, start = [], 0
    for height, width in spatial_shapes:
        rows.append([height, width, start])
        start += height * width
    return to_device(torch.tensor(rows, dtype=torch.int32, device="cpu"), device)


# made once per sizes and device in eager mode (no host-to-device copy per layer and call), by the callers of the ops
# (an op's own allocation would land in a CUDA graph's memory pool, kept alive outside the graph by this cache)
_level_tables = DeviceConstants(_level_table)


@functools.cache
def _kernel():
    """The Triton kernel, made on first use (Triton is optional; its interpreter is chosen when Triton is imported)."""
    import triton
    import triton.language as tl

    @triton.jit
    def sample(
        value_ptr,  # (B, N, heads, head_dim), float32 or bf16 / fp16
        levels_ptr,  # (levels, 3) int32: height, width, first value row
        # FROM_PROJECTIONS False: (B, Q, heads, levels, points, 2) float32 normalized (x, y) locations;
        # True: the same layout of offsets in pixels of each level, any float dtype
        locations_ptr,
        # FROM_PROJECTIONS False: (B, Q, heads, levels, points) float32 weights; True: the same layout of the
        # attention logits, any float dtype (softmax over levels x points here)
        weights_ptr,
        reference_ptr,  # FROM_PROJECTIONS: (B or 1, Q, levels, 2) float32 normalized (x, y); else unused
        output_ptr,  # (B, Q, heads, head_dim), float32 or the values' dtype
        num_values,
        num_queries,
        reference_image_stride,  # Q * levels * 2, or 0: one set of reference points for the whole batch
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_DIM: tl.constexpr,
        NUM_LEVELS: tl.constexpr,
        NUM_POINTS: tl.constexpr,
        BLOCK_QUERIES: tl.constexpr,
        FROM_PROJECTIONS: tl.constexpr,
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
        if FROM_PROJECTIONS:
            # the softmax over the levels x points logits of each (query, head), in float32 as
            # `softmax_over_a_short_last_dimension`: exp(x - max) / sum; the logits are read again below (cached)
            largest = tl.full([BLOCK_QUERIES], float("-inf"), dtype=tl.float32)
            for logit_index in tl.static_range(NUM_LEVELS * NUM_POINTS):
                logit = tl.load(weights_ptr + sample_base * NUM_POINTS + logit_index, mask=in_range, other=0.0)
                largest = tl.maximum(largest, logit.to(tl.float32))
            total = tl.zeros([BLOCK_QUERIES], dtype=tl.float32)
            for logit_index in tl.static_range(NUM_LEVELS * NUM_POINTS):
                logit = tl.load(weights_ptr + sample_base * NUM_POINTS + logit_index, mask=in_range, other=0.0)
                total += tl.exp(logit.to(tl.float32) - largest)
            reference_base = (image.to(tl.int64) * reference_image_stride) + query.to(tl.int64) * (NUM_LEVELS * 2)
        for level in tl.static_range(NUM_LEVELS):
            height = tl.load(levels_ptr + 3 * level)
            width = tl.load(levels_ptr + 3 * level + 1)
            start = tl.load(levels_ptr + 3 * level + 2)
            if FROM_PROJECTIONS:
                reference_x = tl.load(reference_ptr + reference_base + 2 * level, mask=in_range, other=0.0)
                reference_y = tl.load(reference_ptr + reference_base + 2 * level + 1, mask=in_range, other=0.0)
            for point in tl.static_range(NUM_POINTS):
                sample_index = (sample_base + level) * NUM_POINTS + point
                if FROM_PROJECTIONS:
                    # `sampling_locations`: reference + offset / (width, height), rounded as PyTorch's division
                    offset_x = tl.load(locations_ptr + 2 * sample_index, mask=in_range, other=0.0).to(tl.float32)
                    offset_y = tl.load(locations_ptr + 2 * sample_index + 1, mask=in_range, other=0.0).to(tl.float32)
                    x = reference_x + tl.math.div_rn(offset_x, width.to(tl.float32))
                    y = reference_y + tl.math.div_rn(offset_y, height.to(tl.float32))
                    logit = tl.load(weights_ptr + sample_index, mask=in_range, other=0.0).to(tl.float32)
                    attention = tl.math.div_rn(tl.exp(logit - largest), total)
                else:
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
            accumulator.to(output_ptr.dtype.element_ty),
            mask=in_range[:, None] & channel_ok[None, :],
        )

    return sample


@functools.cache
def _backward_kernel():
    """The sampler's backward as one Triton kernel, made on first use: the gradients of the values (added with
    atomics: a value feeds every sample whose bilinear corners cover it, as in FC-CLIP's `ms_deform_attn` CUDA
    backward), of the sampling locations and of the attention weights."""
    import triton
    import triton.language as tl

    @triton.jit
    def sample_backward(
        value_ptr,  # (B, N, heads, head_dim), float32 or bf16 / fp16
        levels_ptr,  # (levels, 3) int32: height, width, first value row
        locations_ptr,  # (B, Q, heads, levels, points, 2) float32 normalized (x, y)
        weights_ptr,  # (B, Q, heads, levels, points) float32
        output_grad_ptr,  # (B, Q, heads, head_dim) float32: the gradient of the sampler's result
        value_grad_ptr,  # (B, N, heads, head_dim) float32, zeros: the values' gradient, added to
        locations_grad_ptr,  # (B, Q, heads, levels, points, 2) float32, written
        weights_grad_ptr,  # (B, Q, heads, levels, points) float32, written
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
        output_offsets = ((image * num_queries + query).to(tl.int64) * NUM_HEADS + head) * HEAD_DIM
        # the gradient of each query's output row, read once for all its samples
        output_grad = tl.load(
            output_grad_ptr + output_offsets[:, None] + channel[None, :],
            mask=in_range[:, None] & channel_ok[None, :],
            other=0.0,
        )
        sample_base = ((image * num_queries + query).to(tl.int64) * NUM_HEADS + head) * NUM_LEVELS
        # loops, not unrolled (the forward's `static_range`): unrolled, the corners' pointer tiles of every sample
        # stay live at once and the kernel spilled 3 KB per thread
        for level in tl.range(0, NUM_LEVELS):
            height = tl.load(levels_ptr + 3 * level)
            width = tl.load(levels_ptr + 3 * level + 1)
            start = tl.load(levels_ptr + 3 * level + 2)
            for point in tl.range(0, NUM_POINTS):
                sample_index = (sample_base + level) * NUM_POINTS + point
                x = tl.load(locations_ptr + 2 * sample_index, mask=in_range, other=0.0)
                y = tl.load(locations_ptr + 2 * sample_index + 1, mask=in_range, other=0.0)
                attention = tl.load(weights_ptr + sample_index, mask=in_range, other=0.0)
                # the forward's coordinates (grid_sample's, align_corners=False)
                pixel_x = x * width - 0.5
                pixel_y = y * height - 0.5
                x0 = tl.floor(pixel_x)
                y0 = tl.floor(pixel_y)
                fraction_x = pixel_x - x0
                fraction_y = pixel_y - y0
                column_0 = x0.to(tl.int32)
                row_0 = y0.to(tl.int32)
                # d(result . output_grad) / d(attention), and / d(pixel_x), d(pixel_y) before the attention factor
                attention_grad = tl.zeros([BLOCK_QUERIES], dtype=tl.float32)
                pixel_x_grad = tl.zeros([BLOCK_QUERIES], dtype=tl.float32)
                pixel_y_grad = tl.zeros([BLOCK_QUERIES], dtype=tl.float32)
                for corner in tl.static_range(4):
                    dy = corner // 2
                    dx = corner % 2
                    column = column_0 + dx
                    row = row_0 + dy
                    weight_x = fraction_x if dx == 1 else (x0 + 1.0) - pixel_x
                    weight_y = fraction_y if dy == 1 else (y0 + 1.0) - pixel_y
                    on_map = in_range & (column >= 0) & (column < width) & (row >= 0) & (row < height)
                    value_row = (image * num_values + start + row * width + column).to(tl.int64)
                    offsets = (value_row * NUM_HEADS + head) * HEAD_DIM
                    corner_mask = on_map[:, None] & channel_ok[None, :]
                    corner_values = tl.load(
                        value_ptr + offsets[:, None] + channel[None, :], mask=corner_mask, other=0.0
                    ).to(tl.float32)
                    # the corner's value row . the output's gradient: 0 off the map (zero padding)
                    corner_dot = tl.sum(corner_values * output_grad, axis=1)
                    attention_grad += weight_y * weight_x * corner_dot
                    # d(weight_x) / d(pixel_x) is +1 for the right corners, -1 for the left ones (and so in y)
                    pixel_x_grad += weight_y * corner_dot if dx == 1 else -(weight_y * corner_dot)
                    pixel_y_grad += weight_x * corner_dot if dy == 1 else -(weight_x * corner_dot)
                    tl.atomic_add(
                        value_grad_ptr + offsets[:, None] + channel[None, :],
                        (attention * weight_y * weight_x)[:, None] * output_grad,
                        mask=corner_mask,
                        sem="relaxed",
                    )
                tl.store(weights_grad_ptr + sample_index, attention_grad, mask=in_range)
                # pixel_x = x * width - 0.5: d / dx = width
                tl.store(locations_grad_ptr + 2 * sample_index, attention * pixel_x_grad * width, mask=in_range)
                tl.store(locations_grad_ptr + 2 * sample_index + 1, attention * pixel_y_grad * height, mask=in_range)

    return sample_backward


def _launch(
    value: torch.Tensor,
    levels: torch.Tensor,
    locations_or_offsets: torch.Tensor,
    weights_or_logits: torch.Tensor,
    reference_points: torch.Tensor | None,
    output: torch.Tensor,
    num_points: int,
    from_projections: bool,
) -> None:
    """The kernel over `(B * heads, query blocks)`, writing `output` `(B, Q, heads, head_dim)`: from locations and
    weights, or (`from_projections`) from offsets, logits and `(B or 1, Q, levels, 2)` float32 reference points."""
    batch_size, num_values, num_heads, head_dim = value.shape
    num_queries, num_levels = output.shape[1], levels.shape[0]
    # between two images' reference points; 0 where one set serves the batch (or none is read)
    shared = reference_points is None or reference_points.shape[0] == 1
    reference_stride = 0 if shared else num_queries * num_levels * 2
    grid = (batch_size * num_heads, -(-num_queries // _QUERIES_PER_PROGRAM))
    with on_launch_device(value.device):
        _kernel()[grid](
            value.contiguous(),
            levels,
            locations_or_offsets.contiguous(),
            weights_or_logits.contiguous(),
            levels if reference_points is None else reference_points,  # (unread without reference points)
            output,
            num_values,
            num_queries,
            reference_stride,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_DIM=1 << (head_dim - 1).bit_length(),
            NUM_LEVELS=num_levels,
            NUM_POINTS=num_points,
            BLOCK_QUERIES=_QUERIES_PER_PROGRAM,
            FROM_PROJECTIONS=from_projections,
        )


def _from_projections_in_pytorch(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """`deformable_attention_triton_from_projections`'s result, float32, from PyTorch's operators (where the kernel
    cannot be built): the softmax and locations as `PosSAMMultiscaleDeformableAttention`'s unfused steps, then
    transformers' sampler. With the kernel's `(levels, 3)` level table, the level sizes are read from it on the
    device (no host-to-device copy, which a CUDA graph being recorded could not hold)."""
    from .deformable_attention import PosSAMMultiscaleDeformableAttention, softmax_over_a_short_last_dimension

    weights = softmax_over_a_short_last_dimension(attention_logits.float().reshape(*offsets.shape[:3], -1))
    locations = PosSAMMultiscaleDeformableAttention.sampling_locations(
        reference_points.float(),
        offsets.float(),
        spatial_shapes,
        level_sizes=None if levels is None else levels[:, :2].flip(-1),
    )
    return multi_scale_deformable_attention(value.float(), spatial_shapes, locations, weights.view(offsets.shape[:-1]))


def _level_sizes(spatial_shapes: list[int]) -> list[tuple[int, int]]:
    """`[(h, w)]` per level from the ops' flat `[h0, w0, h1, w1, ...]` (a custom op takes lists of ints)."""
    return [(spatial_shapes[index], spatial_shapes[index + 1]) for index in range(0, len(spatial_shapes), 2)]


def _sizes_key(spatial_shapes: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """The level sizes as Python ints (a tensor's or numpy's sizes read once here), `_level_tables`' key. In a trace
    with symbolic level sizes this specializes the graph to them (PosSAM's are fixed by its image size)."""
    return tuple((int(height), int(width)) for height, width in spatial_shapes)


def _flat_sizes(spatial_shapes: tuple[tuple[int, int], ...]) -> list[int]:
    """The ops' flat `[h0, w0, h1, w1, ...]` from `[(h, w)]` per level."""
    return [size for height_width in spatial_shapes for size in height_width]


def _check_sampling_inputs(value: torch.Tensor, spatial_shapes: list[tuple[int, int]]) -> None:
    if value.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"deformable_attention_triton reads float32, bf16 or fp16 values, got {value.dtype}: use transformers' "
            "multi_scale_deformable_attention for other dtypes."
        )
    if sum(height * width for height, width in spatial_shapes) != value.shape[1]:
        raise ValueError("The spatial shapes do not add up to the number of values.")


def _sample(
    value: torch.Tensor,
    spatial_shapes: list[int],
    levels: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`deformable_attention_triton`'s op (spatial shapes flat, and as the `_level_table` its caller made): the
    checks, the launch or its fallback. It allocates only its result and temporaries (a CUDA graph's memory pool
    holds nothing of it after the call)."""
    if not triton_runs_on(value.device):
        raise RuntimeError(f"deformable_attention_triton needs CUDA and Triton; the inputs are on {value.device}.")
    shapes = _level_sizes(spatial_shapes)
    _check_sampling_inputs(value, shapes)
    batch_size, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    output = torch.empty(batch_size, num_queries, num_heads, head_dim, dtype=torch.float32, device=value.device)
    launch_or_fall_back(
        # one key per device and compiled form: a kernel that cannot be built for one stays on for the others
        ("deformable_attention_triton", str(value.device), value.dtype, head_dim, num_levels, num_points),
        lambda: _launch(
            value,
            levels,
            sampling_locations.float(),
            attention_weights.float(),
            None,
            output,
            num_points,
            from_projections=False,
        ),
        # where the kernel cannot be built here: transformers' sampler, in float32 as the kernel computes
        lambda: output.view(batch_size, num_queries, num_heads * head_dim).copy_(
            multi_scale_deformable_attention(
                value.float(), shapes, sampling_locations.float(), attention_weights.float()
            )
        ),
    )
    return output.view(batch_size, num_queries, num_heads * head_dim)


def _sample_shapes_only(
    value: torch.Tensor,
    spatial_shapes: list[int],
    levels: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`_sample`'s fake implementation: its checks and an empty float32 `(B, Q, heads * head_dim)` result."""
    _check_sampling_inputs(value, _level_sizes(spatial_shapes))
    batch_size, _, num_heads, head_dim = value.shape
    return value.new_empty(batch_size, sampling_locations.shape[1], num_heads * head_dim, dtype=torch.float32)


def _alert_not_deterministic() -> None:
    """What PyTorch's own nondeterministic CUDA backwards do under `torch.use_deterministic_algorithms(True)`
    (grid_sample's too, which transformers' sampler calls): an error, or with `warn_only=True` a warning."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "deformable_attention_triton's backward adds the values' gradients with atomics and does not have a "
        "deterministic implementation (neither does grid_sample's CUDA backward, transformers' sampler's). Turn off "
        "torch.use_deterministic_algorithms, or call it with warn_only=True to accept the nondeterminism."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _gradients_in_pytorch(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    output_grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel's float32 gradients through transformers' sampler (where the kernel cannot be built), by
    `torch.func.vjp`: inside an op's implementation autograd records nothing, functorch's transform still works."""

    def sample(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return multi_scale_deformable_attention(value, spatial_shapes, locations, weights)

    # (vjp returns the output and the pull-back function; with has_aux=True also the auxiliary output)
    vjp = torch.func.vjp(sample, value.float(), sampling_locations.float(), attention_weights.float())
    output, pull_back = vjp[0], vjp[1]
    return pull_back(output_grad.view(output.shape))


def _sample_backward(
    value: torch.Tensor,
    spatial_shapes: list[int],
    levels: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    output_grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The sampler's backward op: from the gradient `(B, Q, heads * head_dim)` of `_sample`'s result, the float32
    gradients of the values `(B, N, heads, head_dim)`, the sampling locations `(B, Q, heads, levels, points, 2)` and
    the attention weights `(B, Q, heads, levels, points)`, in one launch (or, where the kernel cannot be built,
    `_gradients_in_pytorch` through transformers' sampler). The values' gradient is a sum over samples in an order
    the GPU picks (atomics): not bitwise reproducible, as grid_sample's CUDA backward.
    """
    if not triton_runs_on(value.device):
        raise RuntimeError(f"deformable_attention_triton needs CUDA and Triton; the inputs are on {value.device}.")
    _alert_not_deterministic()
    shapes = _level_sizes(spatial_shapes)
    _check_sampling_inputs(value, shapes)
    batch_size, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    locations = sampling_locations.float().contiguous()
    weights = attention_weights.float().contiguous()
    output_grad = output_grad.float().contiguous()

    def launch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value_grad = torch.zeros(value.shape, dtype=torch.float32, device=value.device)  # added to with atomics
        locations_grad = torch.empty_like(locations)
        weights_grad = torch.empty_like(weights)
        grid = (batch_size * num_heads, -(-num_queries // _BACKWARD_QUERIES_PER_PROGRAM))
        with on_launch_device(value.device):
            _backward_kernel()[grid](
                value.contiguous(),
                levels,
                locations,
                weights,
                output_grad,
                value_grad,
                locations_grad,
                weights_grad,
                num_values,
                num_queries,
                NUM_HEADS=num_heads,
                HEAD_DIM=head_dim,
                BLOCK_DIM=1 << (head_dim - 1).bit_length(),
                NUM_LEVELS=num_levels,
                NUM_POINTS=num_points,
                BLOCK_QUERIES=_BACKWARD_QUERIES_PER_PROGRAM,
            )
        return value_grad, locations_grad, weights_grad

    return launch_or_fall_back(
        ("deformable_attention_triton_backward", str(value.device), value.dtype, head_dim, num_levels, num_points),
        launch,
        lambda: _gradients_in_pytorch(value, shapes, locations, weights, output_grad),
    )


def _sample_backward_shapes_only(
    value: torch.Tensor,
    spatial_shapes: list[int],
    levels: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    output_grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_sample_backward`'s fake implementation: its checks and empty float32 gradients."""
    _check_sampling_inputs(value, _level_sizes(spatial_shapes))
    return (
        value.new_empty(value.shape, dtype=torch.float32),
        sampling_locations.new_empty(sampling_locations.shape, dtype=torch.float32),
        attention_weights.new_empty(attention_weights.shape, dtype=torch.float32),
    )


def _keep_nothing(ctx, inputs: tuple, output: tuple) -> None:
    """`_sample_backward_op`'s autograd context: nothing (its backward only refuses)."""


def _refuse_double_backward(ctx, *output_grads: torch.Tensor) -> tuple:
    """A second derivative (a gradient penalty, `create_graph=True` and a backward through the gradients): refused
    with what to use instead, rather than torch's error naming this module's internal op."""
    raise RuntimeError(
        "deformable_attention_triton is differentiable once: its backward kernel has no backward (a gradient "
        "penalty or any second derivative through the deformable sampling). Use transformers' "
        "multi_scale_deformable_attention there (PosSAMMultiscaleDeformableAttention.training_sampler)."
    )


_sample_backward_op = kernel_op(
    __name__,
    "deformable_attention_backward",
    _sample_backward,
    _sample_backward_shapes_only,
    backward=_refuse_double_backward,
    setup_context=_keep_nothing,
)


def _keep_for_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    """`_sample_op`'s autograd context: its tensor inputs, and the flat level sizes."""
    value, spatial_shapes, levels, sampling_locations, attention_weights = inputs
    ctx.save_for_backward(value, levels, sampling_locations, attention_weights)
    ctx.spatial_shapes = spatial_shapes


def _sample_gradients(ctx, output_grad: torch.Tensor) -> tuple:
    """`_sample_op`'s gradients (through `_sample_backward_op`, which compiled training graphs keep as an op), each
    in its input's dtype: a bf16 value's gradient is summed in float32 and rounded once."""
    value, levels, sampling_locations, attention_weights = ctx.saved_tensors
    value_grad, locations_grad, weights_grad = _sample_backward_op(
        value, ctx.spatial_shapes, levels, sampling_locations, attention_weights, output_grad
    )
    return (
        value_grad.to(value.dtype),
        None,
        None,
        locations_grad.to(sampling_locations.dtype),
        weights_grad.to(attention_weights.dtype),
    )


_sample_op = kernel_op(
    __name__,
    "deformable_attention",
    _sample,
    _sample_shapes_only,
    backward=_sample_gradients,
    setup_context=_keep_for_backward,
)


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
    `value` and accumulates in float32. Differentiable: its backward is a second kernel (`_sample_backward`), which
    adds the values' gradients with atomics as FC-CLIP's `ms_deform_attn` CUDA backward does (not bitwise
    reproducible; under `torch.use_deterministic_algorithms(True)` it raises, as grid_sample's CUDA backward does,
    or warns with `warn_only=True`); the gradients come back in the inputs' dtypes, summed in float32. A candidate
    for training on CUDA (`PosSAMMultiscaleDeformableAttention.training_sampler`), not yet timed on a GPU. The
    locations and weights are read in float32
    (as FC-CLIP's op, `custom_fwd(cast_inputs=float32)`); the values in their own dtype (float32, or bf16: half the
    bytes gathered, each value exact in float32). Returns float32.

    A `torch.library` custom op (`kernel_op`, with a fake implementation): `torch.compile` puts the kernel in its
    graphs, CUDA graphs capture it, fake tensors get its shapes. `torch.export` and `torch.jit.trace` graphs do not
    use it (`gives_way_to_pytorch`): an exported graph must run where this package is not installed.

    Args:
        value: `(B, N, heads, head_dim)`, N = sum of h * w over the levels (level-major, row-major).
        spatial_shapes: `[(h, w)]` per level.
        sampling_locations: `(B, Q, heads, levels, points, 2)` normalized (x, y).
        attention_weights: `(B, Q, heads, levels, points)`.

    Returns:
        `(B, Q, heads * head_dim)` float32.

    Raises:
        RuntimeError: Triton cannot run on the inputs' device; in the backward, deterministic algorithms asked for.
        ValueError: values of another dtype than float32, bf16 or fp16 (float64 would be rounded to float32 in
            silence), or spatial shapes that do not add up to the number of values.
    """
    sizes = _sizes_key(spatial_shapes)
    levels = _level_tables(sizes, value.device, like=value)
    return _sample_op(value, _flat_sizes(sizes), levels, sampling_locations, attention_weights)


def _check_projection_inputs(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> None:
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if any(tensor.dtype not in floats for tensor in (value, reference_points, offsets, attention_logits)):
        raise ValueError(
            "deformable_attention_triton_from_projections reads float32, bf16 or fp16 tensors, got "
            f"{value.dtype} values, {reference_points.dtype} reference points, {offsets.dtype} offsets and "
            f"{attention_logits.dtype} logits."
        )
    devices = {tensor.device for tensor in (value, reference_points, offsets, attention_logits)}
    if len(devices) > 1:
        raise ValueError(
            f"deformable_attention_triton_from_projections: values on {value.device}, reference points on "
            f"{reference_points.device}, offsets on {offsets.device}, logits on {attention_logits.device}: move them "
            "to one device."
        )
    batch_size, num_values, num_heads, _ = value.shape
    num_levels = len(spatial_shapes)
    if sum(height * width for height, width in spatial_shapes) != num_values:
        raise ValueError("The spatial shapes do not add up to the number of values.")
    expected_offsets = (batch_size, num_heads, num_levels, 2)
    if offsets.dim() != 6 or (offsets.shape[0], offsets.shape[2], offsets.shape[3], offsets.shape[5]) != (
        expected_offsets
    ):
        raise ValueError(
            f"offsets {tuple(offsets.shape)} must be (B, Q, heads, levels, points, 2) = ({batch_size}, Q, "
            f"{num_heads}, {num_levels}, points, 2)."
        )
    _, num_queries, _, _, num_points, _ = offsets.shape
    if attention_logits.shape[:3] != (batch_size, num_queries, num_heads) or math.prod(attention_logits.shape[3:]) != (
        num_levels * num_points
    ):
        raise ValueError(
            f"attention_logits {tuple(attention_logits.shape)} must be (B, Q, heads, levels * points) = "
            f"({batch_size}, {num_queries}, {num_heads}, {num_levels * num_points}) or (B, Q, heads, levels, points)."
        )
    if reference_points.shape[0] not in (1, batch_size) or reference_points.shape[1:] != (num_queries, num_levels, 2):
        raise ValueError(
            f"reference_points {tuple(reference_points.shape)} must be (B or 1, Q, levels, 2) with B = {batch_size},"
            f" Q = {num_queries}, levels = {num_levels}."
        )


def _from_projections(
    value: torch.Tensor,
    spatial_shapes: list[int],
    levels: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """`deformable_attention_triton_from_projections`' op (spatial shapes flat, and as the `_level_table` its caller
    made): the checks, the launch or its fallback (which reads the level sizes from the table: no host-to-device
    copy). It allocates only its result and temporaries."""
    if not triton_runs_on(value.device):
        raise RuntimeError(
            f"deformable_attention_triton_from_projections needs CUDA and Triton; the inputs are on {value.device}."
        )
    shapes = _level_sizes(spatial_shapes)
    _check_projection_inputs(value, shapes, reference_points, offsets, attention_logits)
    batch_size, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = offsets.shape
    reference_points = reference_points.float().contiguous()
    output = torch.empty(batch_size, num_queries, num_heads, head_dim, dtype=value.dtype, device=value.device)
    launch_or_fall_back(
        (
            "deformable_attention_triton_from_projections",
            str(value.device),
            value.dtype,
            offsets.dtype,
            attention_logits.dtype,
            head_dim,
            num_levels,
            num_points,
        ),
        lambda: _launch(
            value, levels, offsets, attention_logits, reference_points, output, num_points, from_projections=True
        ),
        lambda: output.view(batch_size, num_queries, num_heads * head_dim).copy_(
            _from_projections_in_pytorch(value, shapes, reference_points, offsets, attention_logits, levels)
        ),
    )
    return output.view(batch_size, num_queries, num_heads * head_dim)


def _from_projections_shapes_only(
    value: torch.Tensor,
    spatial_shapes: list[int],
    levels: torch.Tensor,
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """`_from_projections`' fake implementation: its checks and an empty `(B, Q, heads * head_dim)` result in the
    values' dtype."""
    _check_projection_inputs(value, _level_sizes(spatial_shapes), reference_points, offsets, attention_logits)
    batch_size, _, num_heads, head_dim = value.shape
    return value.new_empty(batch_size, offsets.shape[1], num_heads * head_dim)


_from_projections_op = kernel_op(
    __name__, "deformable_attention_from_projections", _from_projections, _from_projections_shapes_only
)


def deformable_attention_triton_from_projections(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    reference_points: torch.Tensor,
    offsets: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """
    The deformable attention's sampling from its projections, in one kernel: the softmax of the attention logits
    over levels x points (`softmax_over_a_short_last_dimension`), the sampling locations (reference point + offset /
    level size, `PosSAMMultiscaleDeformableAttention.sampling_locations`) and `deformable_attention_triton`'s
    sampling, all in float32 (FC-CLIP's `custom_fwd(cast_inputs=float32)`: its inputs in reduced precision are exact
    in float32), the output written in the values' dtype. Unfused, on the CUDA code path that is about 13 more
    kernels per layer (softmax 5, locations 5, dtype conversions 3) and their float32 copies, launches that bound a
    GPU's batch-1 forward (docs/design.md, "Fifteenth session"). Inference only; a custom op as
    `deformable_attention_triton` (compiled graphs call it).

    Args:
        value: `(B, N, heads, head_dim)`, N = sum of h * w over the levels (level-major, row-major).
        spatial_shapes: `[(h, w)]` per level.
        reference_points: `(B, Q, levels, 2)` or `(1, Q, levels, 2)` (shared by the batch): normalized (x, y),
            read in float32.
        offsets: `(B, Q, heads, levels, points, 2)` (x, y) in pixels of each level, float32 / bf16 / fp16.
        attention_logits: `(B, Q, heads, levels * points)` or `(B, Q, heads, levels, points)`, before the softmax.

    Returns:
        `(B, Q, heads * head_dim)` in the values' dtype.

    Raises:
        RuntimeError: autograd would need a gradient, or Triton cannot run on the inputs' device.
        ValueError: another dtype than float32, bf16 or fp16, inputs on several devices, or shapes that disagree.
    """
    if torch.is_grad_enabled() and any(
        tensor.requires_grad for tensor in (value, reference_points, offsets, attention_logits)
    ):
        raise RuntimeError("deformable_attention_triton_from_projections has no backward: use it for inference only.")
    sizes = _sizes_key(spatial_shapes)
    levels = _level_tables(sizes, value.device, like=value)
    return _from_projections_op(value, _flat_sizes(sizes), levels, reference_points, offsets, attention_logits)


# `PosSAMMultiscaleDeformableAttention` passes a bf16 / fp16 model's values as they are to a sampler marked so, uses
# transformers' sampler instead of a Triton one where a portable trace, float64 or (without `has_backward`) autograd
# needs it
# (`gives_way_to_pytorch`), and keeps one that compiles as an op in `torch.compile` graphs
deformable_attention_triton.reads_reduced_precision_values = True  # type: ignore[attr-defined]
deformable_attention_triton.inference_only = True  # type: ignore[attr-defined]
deformable_attention_triton.has_backward = True  # type: ignore[attr-defined]
deformable_attention_triton.compiles_as_an_op = True  # type: ignore[attr-defined]
# ... and, where the attention weights are not asked for, its fused form from the projections (no backward: where
# autograd needs gradients, the layer runs the softmax and locations in PyTorch and then the plain form)
deformable_attention_triton.from_projections = deformable_attention_triton_from_projections  # type: ignore[attr-defined]
deformable_attention_triton_from_projections.inference_only = True  # type: ignore[attr-defined]
deformable_attention_triton_from_projections.compiles_as_an_op = True  # type: ignore[attr-defined]
