"""Multi-scale deformable attention of the pixel decoder, with a CPU sampler built on `F.embedding_bag`."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    multi_scale_deformable_attention,
)


__all__ = [
    "PosSAMMultiscaleDeformableAttention",
    "deformable_attention_embedding_bag",
    "softmax_over_a_short_last_dimension",
]

# float32 holds every integer below 2**24 exactly: row indices up to that are computed in float32
_FLOAT32_EXACT_INTEGERS = 2**24
# bag entries per step of the eager sampler: its buffers (positions, weights, rows: 12 bytes an entry in float32)
# and their temporaries stay in cache
_BAG_ENTRIES_PER_STEP = 2**19


def softmax_over_a_short_last_dimension(logits: torch.Tensor) -> torch.Tensor:
    """
    `logits.softmax(-1)` as exp(x - max) / sum, in three reductions and elementwise passes. PyTorch's CPU softmax
    kernel vectorizes along the softmax dimension, which here holds levels x points = 12 values: at 1024x1024 input
    (21504 queries x 8 heads) it takes 19 ms in float32, this 3 ms (docs/design.md). Same value up to rounding, any
    device, differentiable.
    """
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    exponentials = shifted.exp()
    return exponentials / exponentials.sum(dim=-1, keepdim=True)


def _bilinear_corners(
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    index_dtype: torch.dtype,
    image_offset: torch.Tensor,
):
    """
    Per level, the 4 bilinear corners of every sample as `(row, column, weight_y, weight_x)`: `row + column` is the
    value position (image offset and level start included) and `weight_y * weight_x` the corner's weight, the
    attention weight included; corners off the map (grid_sample's zero padding) have weight 0.

    Args:
        sampling_locations: `(B, q, heads, levels, points, 2)` normalized (x, y).
        attention_weights: `(B, q, heads, levels, points)`.
        image_offset: `(B, 1, 1, 1)` first value position of each image.

    Yields:
        `(level, corners)`, each of the 8 tensors `(B, q, heads, points)` in `index_dtype`.
    """
    level_start = 0
    for level, (height, width) in enumerate(spatial_shapes):
        # grid_sample's pixel coordinates (align_corners=False); corners off the map get weight 0 (zero padding)
        x = sampling_locations[:, :, :, level, :, 0].to(index_dtype) * width - 0.5
        y = sampling_locations[:, :, :, level, :, 1].to(index_dtype) * height - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()  # indices carry no gradient (as in grid_sample)
        fx, fy = x - x0, y - y0
        attention = attention_weights[:, :, :, level].to(index_dtype)
        weight_x0 = (1 - fx).masked_fill((x0 < 0) | (x0 >= width), 0)
        weight_x1 = fx.masked_fill((x0 < -1) | (x0 >= width - 1), 0)
        weight_y0 = (1 - fy).masked_fill((y0 < 0) | (y0 >= height), 0) * attention
        weight_y1 = fy.masked_fill((y0 < -1) | (y0 >= height - 1), 0) * attention
        column_0, column_1 = x0.clamp(0, width - 1), (x0 + 1).clamp_(0, width - 1)
        row_0 = y0.clamp(0, height - 1).mul_(width).add_(image_offset + level_start)
        row_1 = (y0 + 1).clamp_(0, height - 1).mul_(width).add_(image_offset + level_start)
        yield (
            level,
            (
                (row_0, column_0, weight_y0, weight_x0),
                (row_0, column_1, weight_y0, weight_x1),
                (row_1, column_0, weight_y1, weight_x0),
                (row_1, column_1, weight_y1, weight_x1),
            ),
        )
        level_start += height * width


def deformable_attention_embedding_bag(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    bag_entries_per_step: int = _BAG_ENTRIES_PER_STEP,
) -> torch.Tensor:
    """
    The same result as transformers' `multi_scale_deformable_attention` (bilinear `grid_sample`, zero padding,
    align_corners=False, weighted by the attention weights), computed as one weighted sum of value rows per
    (query, head): each sample contributes its 4 bilinear corners with weight `attention * corner weight`, and
    `F.embedding_bag(mode="sum", per_sample_weights=...)` gathers and sums the 32-wide rows in one fused pass. It
    never materializes the sampled values `(B * heads, head_dim, Q, levels * points)`, which dominates the
    `grid_sample` version on CPU.

    Eager inference (no autograd, not traced) goes through the queries in steps of at most `bag_entries_per_step`
    bag entries (a query has heads x levels x 4 corners x points of them), reusing one set of buffers: PosSAM-B's
    pixel decoder at 1024x1024 has 8.3 million entries per layer, and their positions, weights and row indices at
    once are 33 MB tensors, which glibc maps fresh from the kernel at every call (page faults: 0.2 s of a bf16
    forward, docs/design.md).

    Args:
        value: `(B, N, heads, head_dim)`, N = sum of h * w over the levels (level-major, row-major).
        spatial_shapes: `[(h, w)]` per level.
        sampling_locations: `(B, Q, heads, levels, points, 2)` normalized (x, y) in [0, 1].
        attention_weights: `(B, Q, heads, levels, points)`.
        bag_entries_per_step: the most bag entries one step of eager inference holds (at least one query's).

    Returns:
        `(B, Q, heads * head_dim)`.
    """
    batch_size, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if torch.compiler.is_exporting():
        # no guard on the (dynamic) batch size: `batch * N * heads < 2**24` cannot be expressed as an export
        # constraint (PosSAM-B at 1024x1024 failed with "batch < 2048/21"), so exported graphs index in float64
        index_dtype = torch.float64
    else:
        index_dtype = torch.float32 if batch_size * num_values * num_heads < _FLOAT32_EXACT_INTEGERS else torch.float64
    device = value.device
    image_offset = (torch.arange(batch_size, dtype=index_dtype, device=device) * num_values).view(batch_size, 1, 1, 1)
    # value viewed as (B * N * heads, head_dim): row of (image, position, head) = (image * N + position) * heads + head
    head = torch.arange(num_heads, dtype=index_dtype, device=device).view(1, 1, num_heads, 1, 1, 1)
    # int32 rows halve the index memory; int64 beyond float32's exact range, and when exporting (the ONNX exporter's
    # embedding_bag concatenates the offsets with an int64 size, which onnxruntime refuses for int32 offsets)
    wide = index_dtype == torch.float64 or torch.compiler.is_exporting()
    row_dtype = torch.int64 if wide else torch.int32
    samples_per_bag = num_levels * 4 * num_points
    flat_value = value.reshape(-1, head_dim)
    track_gradients = torch.is_grad_enabled() and (sampling_locations.requires_grad or attention_weights.requires_grad)
    if track_gradients or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # Bag entries per (image, query, head), in (level, corner, point) order, stacked per level: autograd needs
        # the weights as values, under torch.compile `out=` into a view breaks the graph (the compiler fuses the
        # stacking anyway), and a traced graph has no Python loop over steps of a (symbolic) number of queries
        level_positions, level_weights = [], []
        for _, corners in _bilinear_corners(
            sampling_locations, attention_weights, spatial_shapes, index_dtype, image_offset
        ):
            level_positions.append(torch.stack([row + column for row, column, _, _ in corners], dim=3))
            level_weights.append(torch.stack([weight_y * weight_x for _, _, weight_y, weight_x in corners], dim=3))
        positions, weights = torch.stack(level_positions, dim=3), torch.stack(level_weights, dim=3)
        rows = (positions * num_heads + head).to(row_dtype).view(-1)
        offsets = torch.arange(0, rows.numel(), samples_per_bag, dtype=rows.dtype, device=device)
        output = F.embedding_bag(
            rows, flat_value, offsets, mode="sum", per_sample_weights=weights.reshape(-1).to(value.dtype)
        )
        return output.view(batch_size, num_queries, num_heads * head_dim)

    # Eager inference: the entries of a step of queries written in place into buffers reused from step to step
    entries_per_query = batch_size * num_heads * samples_per_bag
    step = max(1, min(num_queries, bag_entries_per_step // entries_per_query))
    entry_shape = (num_heads, num_levels, 4, num_points)
    position_buffer = torch.empty(step * entries_per_query, dtype=index_dtype, device=device)
    weight_buffer = torch.empty_like(position_buffer)
    row_buffer = torch.empty(step * entries_per_query, dtype=row_dtype, device=device)
    step_offsets = torch.arange(0, step * entries_per_query, samples_per_bag, dtype=row_dtype, device=device)
    output = value.new_empty(batch_size, num_queries, num_heads * head_dim)
    for first_query in range(0, num_queries, step):
        queries = slice(first_query, first_query + step)
        step_queries = min(step, num_queries - first_query)
        entries = step_queries * entries_per_query
        positions = position_buffer[:entries].view(batch_size, step_queries, *entry_shape)
        weights = weight_buffer[:entries].view(batch_size, step_queries, *entry_shape)
        for level, corners in _bilinear_corners(
            sampling_locations[:, queries], attention_weights[:, queries], spatial_shapes, index_dtype, image_offset
        ):
            for corner, (row, column, weight_y, weight_x) in enumerate(corners):
                torch.add(row, column, out=positions[:, :, :, level, corner])
                torch.mul(weight_y, weight_x, out=weights[:, :, :, level, corner])
        rows = row_buffer[:entries]
        rows.copy_(positions.mul_(num_heads).add_(head).view(-1))
        sums = F.embedding_bag(
            rows,
            flat_value,
            step_offsets[: entries // samples_per_bag],
            mode="sum",
            per_sample_weights=weights.view(-1).to(value.dtype),
        )
        output[:, queries] = sums.view(batch_size, step_queries, num_heads * head_dim)
    return output


class PosSAMMultiscaleDeformableAttention(Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
    """
    Mask2Former's pixel-decoder deformable attention (same parameters and state-dict keys, same math). On CPU the
    sampling runs through `deformable_attention_embedding_bag` (about 4x faster than the `grid_sample` version at
    1024x1024 input); elsewhere through transformers' `multi_scale_deformable_attention`. The pixel decoder's
    encoder only uses 2-d reference points (the layer grid), so 4-d (box) reference points are not supported.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        position_embeddings: torch.Tensor | None = None,
        reference_points=None,
        spatial_shapes_list=None,
        level_start_index=None,
        output_attentions: bool = False,
    ):
        if reference_points.shape[-1] != 2:
            raise ValueError(f"PosSAM's pixel decoder uses 2-d reference points, got {reference_points.shape[-1]}-d.")
        queries = self.with_pos_embed(hidden_states, position_embeddings)
        batch_size, num_queries, _ = queries.shape
        num_values = encoder_hidden_states.shape[1]
        if sum(h * w for h, w in spatial_shapes_list) != num_values:
            raise ValueError("The spatial shapes do not add up to the sequence length of the encoder hidden states.")

        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            value = value.masked_fill(attention_mask[..., None], 0.0)
        value = value.view(batch_size, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(queries).view(
            batch_size, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(queries).view(
            batch_size, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        attention_weights = softmax_over_a_short_last_dimension(attention_weights).view(
            batch_size, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        device_type = value.device.type
        sample = deformable_attention_embedding_bag if device_type == "cpu" else multi_scale_deformable_attention
        if torch.is_autocast_enabled(device_type):
            # FC-CLIP's MSDeformAttnFunction is `custom_fwd(cast_inputs=torch.float32)`: under mixed precision the
            # sampling (locations, bilinear weights, weighted sums) runs in float32 with autocast off; the
            # projections around it stay in the autocast dtype. In bf16 (8-bit mantissa) a location in [0, 1] would
            # be off by up to a pixel at 256 px per level.
            with torch.autocast(device_type, enabled=False):
                sampling_locations = self.sampling_locations(
                    reference_points.float(), offsets.float(), spatial_shapes_list
                )
                sampled = sample(value.float(), spatial_shapes_list, sampling_locations, attention_weights.float())
        elif offsets.dtype in (torch.bfloat16, torch.float16):
            # the whole model in a reduced precision (`from_pretrained(..., dtype=torch.bfloat16)`): the sampling in
            # float32 as under autocast (bf16 locations would be off by up to a pixel), back to the model's dtype for
            # the output projection
            sampling_locations = self.sampling_locations(
                reference_points.float(), offsets.float(), spatial_shapes_list
            )
            sampled = sample(value.float(), spatial_shapes_list, sampling_locations, attention_weights.float()).to(
                value.dtype
            )
        else:
            sampling_locations = self.sampling_locations(reference_points, offsets, spatial_shapes_list)
            sampled = sample(value, spatial_shapes_list, sampling_locations, attention_weights)
        return self.output_proj(sampled), attention_weights

    @staticmethod
    def sampling_locations(
        reference_points: torch.Tensor, offsets: torch.Tensor, spatial_shapes_list: list[tuple[int, int]]
    ) -> torch.Tensor:
        """
        Normalized (x, y) sampling locations `(B, Q, heads, levels, points, 2)`: the `(B, Q, levels, 2)` reference
        points plus the `(B, Q, heads, levels, points, 2)` offsets, which are in pixels of each level.
        """
        batch_size, num_queries, num_heads, num_levels, num_points, _ = offsets.shape
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes_list], dtype=offsets.dtype, device=offsets.device)
        # transformers' `reference + offsets / normalizer`, the same divisions, with the (levels, points, xy) pattern
        # of both operands spelled out as one 24-wide last dimension: broadcasting over a 2-wide last dimension (and
        # a 4-wide one) ran 9x slower on CPU (47 vs 5 ms per layer at 1024x1024)
        pattern = num_levels * num_points * 2
        per_offset = normalizer[:, None, :].expand(num_levels, num_points, 2).reshape(pattern)
        reference = reference_points[:, :, None, :, None, :].expand(-1, -1, 1, -1, num_points, -1)
        locations = (
            reference.reshape(batch_size, num_queries, 1, pattern)
            + offsets.reshape(batch_size, num_queries, num_heads, pattern) / per_offset
        )
        return locations.view(offsets.shape)
