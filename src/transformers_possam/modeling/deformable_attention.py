"""Multi-scale deformable attention of the pixel decoder, with a CPU sampler built on `F.embedding_bag`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    multi_scale_deformable_attention,
)

from ..device_transfer import to_device
from ..triton_support import gives_way_to_pytorch, triton_runs_on
from .deformable_sampling_triton import deformable_attention_triton


__all__ = [
    "PosSAMMultiscaleDeformableAttention",
    "deformable_attention_embedding_bag",
    "float32_or_read_as_they_are",
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


class _SampleGrid(NamedTuple):
    """
    The per-level constants of the bilinear corners, one value per sample `(B, queries, heads, levels, points)`
    (`(2, ...)` for x and y): broadcast views for the whole-tensor sampler; `materialize` writes them out for a
    step of queries, so that every elementwise op of `_bag_entries` runs over one long contiguous row (a constant
    broadcast over the 4 points of a level makes each op loop over 4 elements at a time: 10-20x slower on CPU).
    """

    size: torch.Tensor  # (2, B, q, heads, levels, points): each level's width (x) and height (y)
    last: torch.Tensor  # (2, ...): width - 1, height - 1
    row_stride: torch.Tensor  # (B, q, heads, levels, points): width * heads, the value rows between two map rows
    base: torch.Tensor  # (B, q, heads, levels, points): value row of the level's pixel (0, 0) for the head

    @classmethod
    def build(
        cls,
        spatial_shapes: list[tuple[int, int]],
        batch_size: int,
        num_values: int,
        num_heads: int,
        num_points: int,
        num_queries: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> _SampleGrid:
        """Broadcast views `(…, B, num_queries, heads, levels, points)` of the constants, in `dtype`."""
        num_levels = len(spatial_shapes)
        shape = (batch_size, num_queries, num_heads, num_levels, num_points)
        # made on the host and copied without waiting (`torch.tensor(values, device=cuda)` would synchronize)
        host = torch.device("cpu")  # explicit: a `with torch.device(...)` context must not move these
        widths = torch.tensor([width for _, width in spatial_shapes], dtype=dtype, device=host)
        heights = torch.tensor([height for height, _ in spatial_shapes], dtype=dtype, device=host)
        level_starts = torch.tensor(
            [sum(h * w for h, w in spatial_shapes[:level]) for level in range(num_levels)], dtype=dtype, device=host
        )
        size = torch.stack([widths, heights]).view(2, 1, 1, 1, num_levels, 1)
        # value viewed as (B * N * heads, head_dim): row of (image, position, head) = (image * N + position) * heads
        # + head, and position = level start + y * width + x
        image_start = torch.arange(batch_size, dtype=dtype, device=host) * num_values
        head = torch.arange(num_heads, dtype=dtype, device=host)
        base = (image_start.view(-1, 1, 1, 1) + level_starts.view(1, 1, -1, 1)) * num_heads + head.view(1, -1, 1, 1)
        size, last, row_stride, base = (
            to_device(constant, device) for constant in (size, size - 1, widths * num_heads, base)
        )
        return cls(
            size=size.expand(2, *shape),
            last=last.expand(2, *shape),
            row_stride=row_stride.view(1, 1, 1, num_levels, 1).expand(shape),
            base=base.view(batch_size, 1, num_heads, num_levels, 1).expand(shape),
        )

    def materialize(self) -> _SampleGrid:
        """The constants written out contiguously."""
        return _SampleGrid(*(constant.contiguous() for constant in self))

    def first_queries(self, num_queries: int) -> _SampleGrid:
        """The constants of the first `num_queries` queries (a last, partial step)."""
        return _SampleGrid(*(constant[..., :num_queries, :, :, :] for constant in self))


class _Scratch:
    """
    The `out=` tensors of `_bag_entries`' ops: for eager inference, buffers kept from one step of queries to the next
    (fresh temporaries of a step, a few MB, were unmapped and faulted back in at every step: 900 page faults per
    step on CPU); for autograd and tracing, `None` (each op returns a new tensor), so one code path serves both.
    """

    def __init__(self, reuse: bool) -> None:
        self._buffers: dict[str, torch.Tensor] | None = {} if reuse else None

    def __call__(
        self,
        name: str,
        like: torch.Tensor,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """
        Buffer `name`, shaped `shape` (default `like.shape`), of `dtype` (default `like.dtype`) on `like`'s device; or
        None. Asking again for a name returns the same memory: an op may write over its input.
        """
        if self._buffers is None:
            return None
        shape = tuple(like.shape) if shape is None else shape
        dtype = like.dtype if dtype is None else dtype
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._buffers[name] = like.new_empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


def _bag_entries(
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grid: _SampleGrid,
    num_heads: int,
    scratch: _Scratch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The 4 bilinear corners of every sample as bag entries of `F.embedding_bag`: the value row each corner reads and
    its weight, `attention * weight_y * weight_x`; corners off the map (grid_sample's zero padding) have weight 0.
    Differentiable in the locations and attention weights (the corner indices carry no gradient, as in grid_sample)
    when `scratch` holds no buffers.

    Args:
        sampling_locations: `(B, q, heads, levels, points, 2)` normalized (x, y).
        attention_weights: `(B, q, heads, levels, points)`.
        grid: `_SampleGrid` for these `q` queries, in the dtype of the index arithmetic.
        scratch: where each op writes (`_Scratch`).

    Returns:
        value rows (in `grid`'s dtype) and weights, each `(B, q, heads, 4, levels, points)` (corners (y0, x0),
        (y0, x1), (y1, x0), (y1, x1)): each (image, query, head)'s entries are one contiguous bag.
    """
    xy = sampling_locations.movedim(-1, 0)
    coordinates = grid.size  # (2, B, q, heads, levels, points): every x/y quantity below has this shape
    # grid_sample's pixel coordinates (align_corners=False), x and y at once
    pixel = torch.mul(grid.size, xy, out=scratch("pixel", coordinates))
    pixel = torch.sub(pixel, 0.5, out=scratch("pixel", coordinates))
    corner_0 = torch.floor(pixel.detach(), out=scratch("corner_0", coordinates))
    corner_1 = torch.add(corner_0, 1, out=scratch("corner_1", coordinates))
    # for pixel >= 0 exact: the fractional part of a float; 1 minus it is rounded once, as (corner_0 + 1) - pixel
    fraction_1 = torch.sub(pixel, corner_0, out=scratch("fraction_1", coordinates))
    fraction_0 = torch.sub(corner_1, pixel, out=scratch("fraction_0", coordinates))
    # a corner is on the map where clamping leaves it unchanged; off the map (zero padding) its weight is 0: the
    # corners are integers, so with d = min(|corner - clamped|, 1) (0 on the map, 1 off it) the weight is
    # `fraction - fraction * d`, exactly the fraction or exactly 0, and so is its derivative. Float ops only (a
    # boolean mask and masked_fill took 4x as long on CPU); not `max(0, fraction - |corner - clamped|)`, whose
    # derivative vanishes where the fraction is 0 on the map (a location exactly on a pixel centre, as
    # Mask2Former's initialization puts them), where grid_sample's does not
    weights_by_corner = []
    indices_by_corner = []
    for corner, fraction, name in ((corner_0, fraction_0, "0"), (corner_1, fraction_1, "1")):
        index = torch.clamp_min(corner, 0, out=scratch("index_" + name, coordinates))
        index = torch.minimum(index, grid.last, out=scratch("index_" + name, coordinates))
        distance = torch.sub(corner, index, out=scratch("distance", coordinates))
        distance = torch.abs(distance, out=scratch("distance", coordinates))
        off_map = torch.clamp_max(distance, 1, out=scratch("distance", coordinates))
        weight = torch.addcmul(fraction, fraction, off_map, value=-1, out=scratch("weight_" + name, coordinates))
        weights_by_corner.append(weight)
        indices_by_corner.append(index)
    (weight_x0, weight_y0), (weight_x1, weight_y1) = weights_by_corner
    (index_x0, index_y0), (index_x1, index_y1) = indices_by_corner
    weight_dtype = torch.promote_types(weight_y0.dtype, attention_weights.dtype)
    weight_y0 = torch.mul(weight_y0, attention_weights, out=scratch("weight_y0", weight_y0, dtype=weight_dtype))
    weight_y1 = torch.mul(weight_y1, attention_weights, out=scratch("weight_y1", weight_y1, dtype=weight_dtype))
    # exact integers: every value row is below 2**24 in float32 (2**53 in float64)
    column_0 = torch.mul(index_x0, num_heads, out=scratch("column_0", index_x0))
    column_1 = torch.mul(index_x1, num_heads, out=scratch("column_1", index_x1))
    row_0 = torch.addcmul(grid.base, index_y0, grid.row_stride, out=scratch("row_0", index_y0))
    row_1 = torch.addcmul(grid.base, index_y1, grid.row_stride, out=scratch("row_1", index_y1))
    # corners before levels and points: each corner's entries of a bag are one contiguous run of levels x points
    # (stacking into a last dimension of 4 copied one element at a time, 2.5x slower)
    corner_dim = 3
    entries = (*row_0.shape[:corner_dim], 4, *row_0.shape[corner_dim:])
    pairs = ((row_0, column_0), (row_0, column_1), (row_1, column_0), (row_1, column_1))
    positions = torch.stack(
        [torch.add(row, column, out=scratch(f"corner_row_{k}", row)) for k, (row, column) in enumerate(pairs)],
        dim=corner_dim,
        out=scratch("positions", row_0, entries),
    )
    pairs = ((weight_y0, weight_x0), (weight_y0, weight_x1), (weight_y1, weight_x0), (weight_y1, weight_x1))
    weights = torch.stack(
        [torch.mul(y, x, out=scratch(f"corner_weight_{k}", y)) for k, (y, x) in enumerate(pairs)],
        dim=corner_dim,
        out=scratch("weights", weight_y0, entries),
    )
    return positions, weights


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
    bag entries (a query has heads x 4 corners x levels x points of them): PosSAM-B's pixel decoder at 1024x1024 has
    8.3 million entries per layer, and their positions, weights and row indices at once are 33 MB tensors, which
    glibc maps fresh from the kernel at every call (page faults: 0.2 s of a bf16 forward, docs/design.md); a step's
    tensors stay in cache.

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
    # int32 rows halve the index memory; int64 beyond float32's exact range, and when exporting (the ONNX exporter's
    # embedding_bag concatenates the offsets with an int64 size, which onnxruntime refuses for int32 offsets)
    wide = index_dtype == torch.float64 or torch.compiler.is_exporting()
    # the corner arithmetic: float64 locations keep their precision (still exact integers)
    arithmetic_dtype = torch.promote_types(index_dtype, sampling_locations.dtype)
    row_dtype = torch.int64 if wide else torch.int32
    samples_per_bag = num_levels * num_points * 4
    flat_value = value.reshape(-1, head_dim)
    device = value.device

    def weighted_sums(
        locations: torch.Tensor, attention: torch.Tensor, grid: _SampleGrid, scratch: _Scratch
    ) -> torch.Tensor:
        positions, weights = _bag_entries(locations, attention, grid, num_heads, scratch)
        rows = scratch("rows", positions, dtype=row_dtype)
        rows = positions.to(row_dtype) if rows is None else rows.copy_(positions)
        # one bag per (image, query, head), all of the same length: a 2-d input, no offsets
        return F.embedding_bag(
            rows.view(-1, samples_per_bag),
            flat_value,
            mode="sum",
            per_sample_weights=weights.reshape(-1, samples_per_bag).to(value.dtype),
        )

    # embedding_bag keeps its indices and per-sample weights for the backward pass, so any input needing a gradient
    # (the value alone too: a frozen layer's locations under LoRA on the value projection) rules out reused buffers
    track_gradients = torch.is_grad_enabled() and (
        value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    )
    if track_gradients or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        # one pass over all queries: autograd needs the entries whole, and a traced graph has no Python loop over
        # steps of a (symbolic) number of queries; the constants stay broadcast views (the compiler fuses them)
        grid = _SampleGrid.build(
            spatial_shapes, batch_size, num_values, num_heads, num_points, num_queries, arithmetic_dtype, device
        )
        output = weighted_sums(sampling_locations, attention_weights, grid, _Scratch(reuse=False))
        return output.view(batch_size, num_queries, num_heads * head_dim)

    # Eager inference: steps of queries, with the constants written out once for a whole step
    entries_per_query = batch_size * num_heads * samples_per_bag
    step = max(1, min(num_queries, bag_entries_per_step // entries_per_query))
    step_grid = _SampleGrid.build(
        spatial_shapes, batch_size, num_values, num_heads, num_points, step, arithmetic_dtype, device
    ).materialize()
    output = value.new_empty(batch_size, num_queries, num_heads * head_dim)
    scratch = _Scratch(reuse=True)
    for first_query in range(0, num_queries, step):
        step_queries = min(step, num_queries - first_query)
        queries = slice(first_query, first_query + step_queries)
        grid = step_grid if step_queries == step else step_grid.first_queries(step_queries)
        sums = weighted_sums(sampling_locations[:, queries], attention_weights[:, queries], grid, scratch)
        output[:, queries] = sums.view(batch_size, step_queries, num_heads * head_dim)
    return output


def float32_or_read_as_they_are(sample: Callable[..., torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """
    The reduced-precision (bf16 / fp16) values a sampler is given: as they are if it reads them itself and
    accumulates in float32 (marked with a true `reads_reduced_precision_values` attribute; each value is exact in
    float32, so only the copy is saved), else their float32 copy, FC-CLIP's precision for the sampling.
    """
    return value if getattr(sample, "reads_reduced_precision_values", False) else value.float()


class PosSAMMultiscaleDeformableAttention(Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
    """
    Mask2Former's pixel-decoder deformable attention (same parameters and state-dict keys, same math). On CPU the
    sampling runs through `deformable_attention_embedding_bag` (about 4x faster than the `grid_sample` version at
    1024x1024 input), on CUDA with Triton through the fused kernel `deformable_attention_triton` at inference, eager
    or in `torch.compile` graphs (a custom op; without `output_attentions`, its form from the projections: the
    softmax and the sampling locations inside the kernel too, no attention weights returned), elsewhere through
    transformers' `multi_scale_deformable_attention` (`sampler`); where autograd needs gradients, through
    `training_sampler`'s choice (on CUDA transformers' version; the Triton kernel's backward is a candidate). In a
    reduced-precision model or under autocast the softmax, the locations and the sampling run in float32 (FC-CLIP's
    `F.softmax` under autocast and `custom_fwd(cast_inputs=float32)` sampler); attention weights asked for come back
    in the logits' dtype (under autocast in float32, as `F.softmax`'s there). The pixel decoder's encoder only uses 2-d reference points (the
    layer grid), so 4-d (box) reference points are not supported.
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
        attention_logits = self.attention_weights(queries).view(
            batch_size, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        device_type = value.device.type
        inputs = (value, offsets, attention_logits, reference_points)
        needs_gradients = torch.is_grad_enabled() and any(tensor.requires_grad for tensor in inputs)
        sample = self.training_sampler(device_type) if needs_gradients else self.sampler(device_type)
        if gives_way_to_pytorch(sample, inputs):
            # a Triton sampler (float32 at most, not for portable traces, nor, unless it is an op, for
            # torch.compile's and fake tensors; without its own backward, not for gradients) gives way to
            # transformers' differentiable, traceable one where any of that is needed
            sample = multi_scale_deformable_attention
        from_projections = getattr(sample, "from_projections", None)
        if (
            from_projections is not None
            and not output_attentions
            and not gives_way_to_pytorch(from_projections, inputs)
        ):
            # softmax, locations and sampling in one kernel, all in float32 (as under autocast below), the output in
            # the values' dtype; the attention weights are not made, and not returned
            sampled = from_projections(value, spatial_shapes_list, reference_points, offsets, attention_logits)
            return self.output_proj(sampled), None
        # in float32 for a reduced-precision model or autocast, as FC-CLIP's `F.softmax` under autocast (and the
        # fused kernel); the weights returned in the logits' dtype, under autocast in float32
        reduced_precision = attention_logits.dtype in (torch.bfloat16, torch.float16)
        attention_weights = softmax_over_a_short_last_dimension(
            attention_logits.float() if reduced_precision else attention_logits
        ).view(batch_size, num_queries, self.n_heads, self.n_levels, self.n_points)
        if torch.is_autocast_enabled(device_type):
            # FC-CLIP's MSDeformAttnFunction is `custom_fwd(cast_inputs=torch.float32)`: under mixed precision the
            # sampling (locations, bilinear weights, weighted sums) runs in float32 with autocast off; the
            # projections around it stay in the autocast dtype. In bf16 (8-bit mantissa) a location in [0, 1] would
            # be off by up to a pixel at 256 px per level.
            with torch.autocast(device_type, enabled=False):
                sampling_locations = self.sampling_locations(
                    reference_points.float(), offsets.float(), spatial_shapes_list
                )
                sampled = sample(
                    float32_or_read_as_they_are(sample, value),
                    spatial_shapes_list,
                    sampling_locations,
                    attention_weights.float(),
                )
        elif offsets.dtype in (torch.bfloat16, torch.float16):
            # the whole model in a reduced precision (`from_pretrained(..., dtype=torch.bfloat16)`): the sampling in
            # float32 as under autocast (bf16 locations would be off by up to a pixel), back to the model's dtype for
            # the output projection
            sampling_locations = self.sampling_locations(
                reference_points.float(), offsets.float(), spatial_shapes_list
            )
            sampled = sample(
                float32_or_read_as_they_are(sample, value),
                spatial_shapes_list,
                sampling_locations,
                attention_weights.float(),
            ).to(value.dtype)
        else:
            sampling_locations = self.sampling_locations(reference_points, offsets, spatial_shapes_list)
            sampled = sample(value, spatial_shapes_list, sampling_locations, attention_weights)
        if reduced_precision and output_attentions and not torch.is_autocast_enabled(device_type):
            # (under autocast float32, as `F.softmax` gives there)
            attention_weights = attention_weights.to(attention_logits.dtype)
        return self.output_proj(sampled), attention_weights

    @staticmethod
    def sampler(device_type: str) -> Callable[..., torch.Tensor]:
        """
        The sampling function (same arguments and result as transformers' `multi_scale_deformable_attention`; one
        with a true `reads_reduced_precision_values` attribute is given a bf16 / fp16 model's values without their
        float32 copy, the others float32 values; one with a true `inference_only` attribute is replaced by
        transformers' where a portable trace (`torch.export`, `torch.jit.trace`) or float64 need it, where autograd
        needs gradients unless it also has a true `has_backward` attribute, and unless it also has a true
        `compiles_as_an_op` attribute in `torch.compile` traces and for fake tensors (`gives_way_to_pytorch`); one
        with a `from_projections` attribute is called through that function, with the reference points, offsets and
        attention logits, where the attention weights are not asked for and no gradient is needed). Where autograd
        needs gradients the layer asks `training_sampler` instead:
        - on CPU `deformable_attention_embedding_bag` (4x faster than grid_sample there);
        - on CUDA with Triton installed the fused kernel `deformable_attention_triton`: on an H200, per PosSAM-B layer
          0.12 against 2.13 ms at batch 1 and 0.86 against 11.3 ms at batch 8; the bf16 forward at batch 8 136
          against 190 ms for B, PosSAM-H's deformable encoder 17 against 71 ms; at batch 1, where the host's kernel
          launches bound the forward, 39.3 against 35.2 ms in the candidates' run and 21.3 against 21.5 images/s
          in the suite's, no gain either way (docs/design.md, "Fourteenth session"); its form from the projections,
          `deformable_attention_triton_from_projections`, saves about 13 launches per layer (not yet timed on a GPU,
          "Fifteenth session"); both are custom ops, which `torch.compile` graphs call (transformers' version there
          until the sixteenth session);
        - elsewhere transformers' version.
        """
        if device_type == "cpu":
            return deformable_attention_embedding_bag
        # CUDA only: Triton's interpreter (`TRITON_INTERPRET=1`, for tests) would run it anywhere, on host memory
        if device_type == "cuda" and triton_runs_on(device_type):
            return deformable_attention_triton
        return multi_scale_deformable_attention

    @staticmethod
    def training_sampler(device_type: str) -> Callable[..., torch.Tensor]:
        """
        The sampling function where autograd needs gradients (training, or a gradient of the inputs): on CPU
        `deformable_attention_embedding_bag` (differentiable), elsewhere transformers' version (grid_sample's, as
        FC-CLIP's pure-PyTorch fallback). `deformable_attention_triton` has a backward kernel too (FC-CLIP trains
        with its compiled `ms_deform_attn` forward and backward): a CUDA candidate, not chosen until a GPU has timed
        it (`benchmarks/device_check.py`'s `deformable_backward_triton` times the sampler alone, forward and backward,
        against transformers'; docs/design.md, "Eighteenth session"); choosing it is returning it here for CUDA where
        `triton_runs_on`.
        """
        if device_type == "cpu":
            return deformable_attention_embedding_bag
        return multi_scale_deformable_attention

    @staticmethod
    def sampling_locations(
        reference_points: torch.Tensor,
        offsets: torch.Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Normalized (x, y) sampling locations `(B, Q, heads, levels, points, 2)`: the `(B, Q, levels, 2)` reference
        points (or `(1, Q, levels, 2)`, shared by the batch) plus the `(B, Q, heads, levels, points, 2)` offsets,
        which are in pixels of each level. `level_sizes`: the levels' `(width, height)`, `(levels, 2)`, already on
        the device (default: made from `spatial_shapes_list`).
        """
        batch_size, num_queries, num_heads, num_levels, num_points, _ = offsets.shape
        if level_sizes is None:
            normalizer = to_device(
                torch.tensor([[w, h] for h, w in spatial_shapes_list], dtype=offsets.dtype), offsets.device
            )
        else:
            normalizer = level_sizes.to(offsets.dtype)
        # transformers' `reference + offsets / normalizer`, the same divisions, with the (levels, points, xy) pattern
        # of both operands spelled out as one 24-wide last dimension: broadcasting over a 2-wide last dimension (and
        # a 4-wide one) ran 9x slower on CPU (47 vs 5 ms per layer at 1024x1024)
        pattern = num_levels * num_points * 2
        per_offset = normalizer[:, None, :].expand(num_levels, num_points, 2).reshape(pattern)
        reference = reference_points[:, :, None, :, None, :].expand(batch_size, -1, 1, -1, num_points, -1)
        locations = (
            reference.reshape(batch_size, num_queries, 1, pattern)
            + offsets.reshape(batch_size, num_queries, num_heads, pattern) / per_offset
        )
        return locations.view(offsets.shape)
