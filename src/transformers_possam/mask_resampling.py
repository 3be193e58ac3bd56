"""Panoptic assignment at full resolution without upsampling every mask: bilinear bounds on low-resolution cells.

The panoptic rule (Mask2Former / FC-CLIP) is decided per output pixel p of the target image:

    winner(p) = argmax_k  s_k * sigmoid(x_k(p)),     inside(p) = sigmoid(x_winner(p)) >= mask_threshold,

where x_k is query k's 1/4-resolution mask logit map bilinearly resized (optionally: to the padded input size,
cropped to the image, resized to the target size). Upsampling all kept masks costs K * H * W; here it is decided
exactly, but mostly at low resolution:

- every resize used is linear and separable, with non-negative weights that sum to 1, so x_k(p) is a convex
  combination of the low-resolution logits inside a small window (at most 3x3 for bilinear). Output pixels are
  grouped into *cells* of about 16x16; a cell's window (`AxisResampling.window` per axis) covers all its pixels'
  windows, so its min and max bound x_k(p) for every pixel of the cell;
- in a cell, only queries whose upper bound reaches the best lower bound can win; when one query is the only
  candidate and its probability bound is on one side of `mask_threshold`, every pixel of the cell is decided;
- the remaining cells (segment borders, mask edges) are evaluated exactly, for their candidates only, from the
  separable interpolation weights.

The output equals the dense computation up to floating-point rounding (the weights are applied in one step instead
of F.interpolate's two): results can differ only where two scores, or a probability and `mask_threshold`, are within
about 1e-6 of each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.nn import functional as F


__all__ = [
    "AxisResampling",
    "PanopticAssignment",
    "assign_panoptic",
    "axis_resampling",
    "cell_bounds",
    "resize_matrix",
]

# elements of the (cells, rows, cols, candidates) temporaries of one exact-evaluation chunk (16 MiB of float32)
_CHUNK_ELEMENTS = 2**22
# low-resolution logits whose cell bounds are computed at once (8 MiB of float32): copied into one reused buffer, so
# that the max and the min pass read them from the cache instead of memory (strided passes over all masks, the max,
# the min and each window overlap, took about three times as long). Not smaller: each chunk's ops are parallel
# regions, whose barriers cost most when another process shares the cores.
_BOUND_CHUNK_ELEMENTS = 2**21


def resize_matrix(in_size: int, steps, device) -> torch.Tensor:
    """
    `steps`: successive `(resize_to, crop_to)` operations on a length-`in_size` axis: bilinear resize
    (align_corners=False) to `resize_to`, then keep the first `crop_to` entries (None: no crop). Returns the `(out, in)`
    float32 matrix of the whole chain, obtained by applying exactly these F.interpolate calls to the identity.
    """
    matrix = torch.eye(in_size, device=device, dtype=torch.float64)[None, :, :, None]  # (1, in, in, 1)
    for resize_to, crop_to in steps:
        if matrix.shape[2] != resize_to:
            matrix = F.interpolate(matrix, size=(resize_to, 1), mode="bilinear", align_corners=False)
        if crop_to is not None:
            matrix = matrix[:, :, :crop_to]
    return matrix[0, :, :, 0].T.float()


@dataclass
class AxisResampling:
    """
    One axis of the low-resolution -> output resize, as a banded linear map, with the output indices grouped into
    *cells*: runs of output indices whose interpolation windows start at nearby low-resolution indices. A cell's
    window (`window` low-resolution entries from `cell_starts[c]`) covers every member's interpolation support.

    Attributes:
        window: cell window length (bilinear support <= 3, plus the cell's spread of starts).
        cell_starts: `(cells,)` first low-resolution index of each cell's window; `cell_of`: `(out,)` each output
            index's cell.
        members: `(cells, max_members)` output indices of each cell, -1 padded; `counts`: `(cells,)`.
        cell_weights: `(cells, max_members, window)` interpolation weights of each member over its cell's window
            (0 for padding members).
        stride: low-resolution indices per cell (the step between consecutive regular `cell_starts`).
        regular_cells: how many leading cells have `cell_starts[c] == cell_starts[0] + c * stride`.
    """

    window: int
    cell_starts: torch.Tensor
    cell_of: torch.Tensor
    members: torch.Tensor
    counts: torch.Tensor
    cell_weights: torch.Tensor
    stride: int
    regular_cells: int

    @property
    def size(self) -> int:
        return self.cell_of.shape[0]

    @classmethod
    def build(cls, in_size: int, steps: list[tuple[int, int | None]], device, cell_extent: int = 16) -> AxisResampling:
        """
        `steps`: successive `(resize_to, crop_to)` operations applied to a length-`in_size` axis: bilinear resize
        (align_corners=False) to `resize_to`, then keep the first `crop_to` entries (None: no crop). The matrix is
        obtained by applying exactly these F.interpolate calls to the identity. Cells hold about `cell_extent` output
        indices (at least one low-resolution start each).
        """
        matrix = resize_matrix(in_size, steps, device)
        out_size = matrix.shape[0]
        positions = torch.arange(in_size, device=device)
        nonzero = matrix != 0
        first = torch.where(nonzero, positions, in_size).amin(1)
        last = torch.where(nonzero, positions, -1).amax(1)
        # cell c holds the outputs whose support starts in [c * group, (c + 1) * group): ~cell_extent outputs each
        group = max(1, round(cell_extent * (int(first[-1] - first[0]) + 1) / out_size))
        cell_ids, cell_of = torch.unique(first // group, return_inverse=True)
        num_cells = len(cell_ids)
        window = min(group + int((last - first).max()), in_size)
        cell_starts = (cell_ids * group).clamp(max=in_size - window)
        counts = torch.bincount(cell_of, minlength=num_cells)
        order = torch.argsort(cell_of, stable=True)
        rank = torch.arange(out_size, device=device) - (torch.cumsum(counts, 0) - counts)[cell_of[order]]
        members = torch.full((num_cells, int(counts.max())), -1, dtype=torch.long, device=device)
        members[cell_of[order], rank] = order
        window_index = cell_starts[:, None, None] + torch.arange(window, device=device)  # (cells, 1, window)
        cell_weights = matrix[members.clamp(min=0)[:, :, None], window_index] * (members >= 0)[:, :, None]
        # the leading cells whose windows are evenly spaced (`group` apart) reduce through strided views
        regular = cell_starts == cell_starts[0] + group * torch.arange(num_cells, device=device)
        regular_cells = int(torch.cumprod(regular, 0).sum())
        return cls(window, cell_starts, cell_of, members, counts, cell_weights, group, regular_cells)

    def window_reduce(
        self, values: torch.Tensor, dim: int, reduce: str, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Min or max of `values` over each cell's window along `dim` (the low-resolution axis -> the cell axis), written
        into `out` when given (a tensor, or a view, of the result's shape). Along any axis but the innermost: the
        windows are reduced through a strided view whose reduced axis is not the contiguous one (a reduction over a
        short innermost axis is slow).
        """
        reduce_window = torch.amax if reduce == "max" else torch.amin
        if out is None:
            shape = list(values.shape)
            shape[dim] = self.cell_starts.shape[0]
            out = values.new_empty(shape)
        count = self.regular_cells
        if count:
            # the evenly spaced windows as one (..., count, ..., window) view of `values` (no copy), one reduction
            first = int(self.cell_starts[0])
            windows = values.narrow(dim, first, (count - 1) * self.stride + self.window).unfold(
                dim, self.window, self.stride
            )
            reduce_window(windows, dim=-1, out=out.narrow(dim, 0, count))
        # the few irregular cells (clamped at the border, or skipped starts): one narrow + reduction each
        for index, start in enumerate(self.cell_starts[count:].tolist(), start=count):
            reduce_window(values.narrow(dim, start, self.window), dim=dim, keepdim=True, out=out.narrow(dim, index, 1))
        return out


def cell_bounds(logits: torch.Tensor, rows: AxisResampling, cols: AxisResampling) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(K, h, w)` low-resolution logits -> `(low, high)`, each `(K, cells_y, cells_x)`: the min and max of each query's
    logits over each cell's window (`rows.window` x `cols.window` entries from the cell's starts), which bound the
    interpolated logit of every output pixel of the cell.

    A few queries at a time (`_BOUND_CHUNK_ELEMENTS` of the rows the cells read), copied into one buffer reused for
    every chunk (fresh large allocations are page-faulted in, which costs more than the reductions). The column
    reduction runs on the transposed (queries, w, cells_y) row bounds: reductions along the innermost axis are slow.
    """
    num_queries, _, width = logits.shape
    cells_y, cells_x = rows.cell_starts.shape[0], cols.cell_starts.shape[0]
    low = logits.new_empty(num_queries, cells_y, cells_x)
    high = logits.new_empty(num_queries, cells_y, cells_x)
    # the rows the cells read: up to the end of the last window (the masks' padding below the image is never read)
    used_rows = int(rows.cell_starts[-1]) + rows.window
    chunk = max(1, min(num_queries, _BOUND_CHUNK_ELEMENTS // (used_rows * width)))
    buffer = logits.new_empty(chunk, used_rows, width)
    row_bounds = logits.new_empty(chunk, cells_y, width)
    row_bounds_t = logits.new_empty(chunk, width, cells_y)
    cell_bounds_t = logits.new_empty(chunk, cells_x, cells_y)
    for first in range(0, num_queries, chunk):
        count = min(chunk, num_queries - first)
        part = buffer[:count].copy_(logits[first : first + count, :used_rows])
        for reduce, bounds in (("max", high), ("min", low)):
            # (reductions write contiguous buffers: a strided output makes them iterate in a slow order)
            rows.window_reduce(part, 1, reduce, out=row_bounds[:count])
            transposed = row_bounds_t[:count].copy_(row_bounds[:count].transpose(1, 2))  # (n, w, cells_y)
            cols.window_reduce(transposed, 1, reduce, out=cell_bounds_t[:count])
            bounds[first : first + count] = cell_bounds_t[:count].transpose(1, 2)
    return low, high


@lru_cache(maxsize=64)
def axis_resampling(
    in_size: int, steps: tuple[tuple[int, int | None], ...], device: str = "cpu", cell_extent: int = 16
) -> AxisResampling:
    """Cached `AxisResampling.build` (a batch usually shares one resize)."""
    return AxisResampling.build(in_size, list(steps), torch.device(device), cell_extent)


@dataclass
class PanopticAssignment:
    """
    Attributes:
        assigned_area: `(K,)` output pixels whose winner is query k.
        segment_area: `(K,)` of those, pixels inside the winner's mask.
        is_segment: `(K,)` Mask2Former's segment test: segment_area > 0, and assigned_area >= overlap threshold x the
            query's own mask area (output pixels where its probability >= mask_threshold; > 0).
        cell_winner, cell_inside, cell_decided: `(cells_y, cells_x)` decisions of fully decided cells.
        exact_pixels: `(N,)` flat output indices decided exactly (H * W for padding entries); `exact_winner` `(N,)`
            (K for padding), `exact_inside` `(N,)`.
    """

    assigned_area: torch.Tensor
    segment_area: torch.Tensor
    is_segment: torch.Tensor
    cell_winner: torch.Tensor
    cell_inside: torch.Tensor
    cell_decided: torch.Tensor
    exact_pixels: torch.Tensor
    exact_winner: torch.Tensor
    exact_inside: torch.Tensor

    def label_map(self, lookup: torch.Tensor, rows: AxisResampling, cols: AxisResampling) -> torch.Tensor:
        """`(H, W)` map of `lookup[winner]` where inside, else 0 (`lookup`: `(K,)` int32)."""
        zero = torch.zeros((), dtype=lookup.dtype, device=lookup.device)
        cell_map = torch.where(self.cell_decided & self.cell_inside, lookup[self.cell_winner], zero)
        full = torch.empty(rows.size * cols.size + 1, dtype=lookup.dtype, device=lookup.device)  # + the padding slot
        # columns first (cells_y x W gathered entries), then whole rows: gathering the columns of the tall map costs
        # several times more
        torch.index_select(
            cell_map.index_select(1, cols.cell_of), 0, rows.cell_of, out=full[:-1].view(rows.size, cols.size)
        )
        padded_lookup = torch.cat([lookup, zero[None]])  # winner K (padding) -> 0
        full[self.exact_pixels] = torch.where(self.exact_inside, padded_lookup[self.exact_winner], zero)
        return full[:-1].view(rows.size, cols.size)


def _exact_logits(logits, queries, cell_y, cell_x, rows: AxisResampling, cols: AxisResampling) -> torch.Tensor:
    """Interpolated logits `(N, max_rows, max_cols)` of `queries[n]` at every member pixel of cell `(cell_y[n], cell_x[n])`."""
    height, width = logits.shape[-2:]
    row_offsets = (
        rows.cell_starts.index_select(0, cell_y)[:, None] + torch.arange(rows.window, device=logits.device)
    ) * width
    col_offsets = cols.cell_starts.index_select(0, cell_x)[:, None] + torch.arange(cols.window, device=logits.device)
    flat_index = (queries * (height * width))[:, None, None] + row_offsets[:, :, None] + col_offsets[:, None, :]
    patches = torch.take(logits, flat_index)  # (N, wy, wx)
    return (
        rows.cell_weights.index_select(0, cell_y) @ patches @ cols.cell_weights.index_select(0, cell_x).transpose(1, 2)
    )


def _member_mask(cell_y, cell_x, rows: AxisResampling, cols: AxisResampling) -> torch.Tensor:
    """`(N, max_rows, max_cols)` True on real member pixels (not the -1 padding)."""
    return (rows.members.index_select(0, cell_y) >= 0)[:, :, None] & (cols.members.index_select(0, cell_x) >= 0)[
        :, None, :
    ]


def _chunks_by_count(candidates_per_cell: torch.Tensor, pixels_per_cell: int) -> list[tuple[torch.Tensor, int]]:
    """
    Cell indices grouped by their candidate count C (no padding to a chunk's widest cell), each group split so its
    (cells, C, rows, cols) temporaries stay under `_CHUNK_ELEMENTS`. Returns `[(cell indices, C)]`.
    """
    chunks: list[tuple[torch.Tensor, int]] = []
    for count in torch.unique(candidates_per_cell).tolist():
        cells = torch.nonzero(candidates_per_cell == count)[:, 0]
        per_chunk = max(1, _CHUNK_ELEMENTS // (count * pixels_per_cell))
        chunks.extend((cells[begin : begin + per_chunk], count) for begin in range(0, len(cells), per_chunk))
    return chunks


def _pixel_index(cell_y, cell_x, rows: AxisResampling, cols: AxisResampling) -> torch.Tensor:
    """Flat output index of every member pixel of each cell `(N, max_rows, max_cols)`; padding -> H * W (a spare slot)."""
    row_members, col_members = rows.members.index_select(0, cell_y), cols.members.index_select(0, cell_x)
    flat = row_members[:, :, None] * cols.size + col_members[:, None, :]
    return flat.masked_fill_((row_members < 0)[:, :, None] | (col_members < 0)[:, None, :], rows.size * cols.size)


def assign_panoptic(
    logits: torch.Tensor,
    scores: torch.Tensor,
    mask_threshold: float,
    rows: AxisResampling,
    cols: AxisResampling,
    overlap_mask_area_threshold: float = 0.8,
) -> PanopticAssignment:
    """
    Args:
        logits: `(K, h, w)` float mask logits of the kept queries (low resolution).
        scores: `(K,)` their class scores.
        mask_threshold: probability threshold of a mask.
        rows, cols: the resize of each axis to the output.
        overlap_mask_area_threshold: the segment test's minimum share of a query's own mask it must win.

    Returns:
        The exact panoptic assignment at output resolution, in compressed form (`PanopticAssignment`).
    """
    num_queries = logits.shape[0]
    device = logits.device
    cell_window_min, cell_window_max = cell_bounds(logits, rows, cols)  # (K, cy, cx)
    # (in place where possible: these (K, cells) passes dominate the cost)
    prob_high, prob_low = cell_window_max.sigmoid_(), cell_window_min.sigmoid_()
    best_lower, cell_winner = (prob_low * scores[:, None, None]).max(0)  # the best lower bound's query is a candidate
    # the other queries' upper bounds: a second candidate exists iff one of them reaches the best lower bound
    rival_upper = (prob_high * scores[:, None, None]).scatter_(0, cell_winner[None], -1.0)
    single_candidate = rival_upper.amax(0) < best_lower
    winner_low = prob_low.gather(0, cell_winner[None])[0]
    winner_high = prob_high.gather(0, cell_winner[None])[0]
    cell_inside = winner_low >= mask_threshold
    cell_decided = single_candidate & (cell_inside | (winner_high < mask_threshold))
    pixels_per_cell = rows.counts[:, None] * cols.counts[None, :]

    # float32 sums of integer counts below 2**24 are exact
    decided_pixels = torch.where(cell_decided, pixels_per_cell, 0).flatten().float()
    assigned_area = torch.bincount(cell_winner.flatten(), weights=decided_pixels, minlength=num_queries)
    segment_area = torch.bincount(
        cell_winner.flatten(), weights=decided_pixels * cell_inside.flatten(), minlength=num_queries
    )

    # exact decisions in the undecided cells, for their candidates only (ascending query order keeps argmax's tie rule)
    undecided_y, undecided_x = torch.nonzero(~cell_decided, as_tuple=True)
    undecided_candidates = rival_upper[:, undecided_y, undecided_x] >= best_lower[undecided_y, undecided_x]  # (K, n)
    undecided_candidates[cell_winner[undecided_y, undecided_x], torch.arange(len(undecided_y), device=device)] = True
    pixel_chunks, winner_chunks, inside_chunks = [], [], []
    for chunk, width_c in _chunks_by_count(undecided_candidates.sum(0), rows.members.shape[1] * cols.members.shape[1]):
        cy, cx = undecided_y[chunk], undecided_x[chunk]
        # every cell of the chunk has exactly width_c candidates; nonzero lists them by cell, then ascending query
        queries = torch.nonzero(undecided_candidates[:, chunk].T)[:, 1].view(len(chunk), width_c)
        values = _exact_logits(
            logits, queries.flatten(), cy.repeat_interleave(width_c), cx.repeat_interleave(width_c), rows, cols
        )
        probs = values.sigmoid().view(len(chunk), width_c, *values.shape[1:])  # (n, C, mr, mc)
        weighted = probs * scores[queries][..., None, None]
        # argmax over the candidates, which are in ascending query order: torch.argmax returns the first maximum,
        # the dense computation's tie rule (no NaN reaches here: read_outputs refuses non-finite logits)
        # (reduced along a contiguous last dimension: argmax over dim 1 of few candidates ran 10x slower)
        slot = weighted.movedim(1, -1).contiguous().argmax(dim=-1)
        winner = queries.gather(1, slot.flatten(1)).view(slot.shape)
        inside = probs.gather(1, slot[:, None])[:, 0] >= mask_threshold
        # padding members keep their slot: pixel H * W, winner K (a spare bin), never inside
        pixel = _pixel_index(cy, cx, rows, cols)
        padding = pixel == rows.size * cols.size
        pixel_chunks.append(pixel.flatten())
        winner_chunks.append(winner.masked_fill_(padding, num_queries).flatten())
        inside_chunks.append(inside.masked_fill_(padding, False).flatten())
    if pixel_chunks:
        exact_pixels, exact_winner, exact_inside = (
            torch.cat(pixel_chunks),
            torch.cat(winner_chunks),
            torch.cat(inside_chunks),
        )
    else:
        exact_pixels = exact_winner = torch.zeros(0, dtype=torch.long, device=device)
        exact_inside = torch.zeros(0, dtype=torch.bool, device=device)
    assigned_area = assigned_area + torch.bincount(exact_winner, minlength=num_queries + 1)[:num_queries]
    segment_area = (
        segment_area
        + torch.bincount(exact_winner, weights=exact_inside.float(), minlength=num_queries + 1)[:num_queries]
    )

    # each query's own mask area lies between its whole-cell count and that plus its edge cells; it is counted
    # exactly (edge cells evaluated) only for the queries whose segment test those bounds leave open
    assigned_area, segment_area = assigned_area.round(), segment_area.round()
    low_inside = prob_low >= mask_threshold
    edge = low_inside.logical_xor(prob_high >= mask_threshold)  # prob_low <= prob_high: "high inside, low not"
    cell_pixels = pixels_per_cell.flatten().float()
    own_low = low_inside.flatten(1).float() @ cell_pixels
    own_high = own_low + edge.flatten(1).float() @ cell_pixels
    is_segment = (segment_area > 0) & (own_low > 0) & (assigned_area >= overlap_mask_area_threshold * own_high)
    open_test = (
        (segment_area > 0) & (own_high > 0) & ~is_segment & (assigned_area >= overlap_mask_area_threshold * own_low)
    )
    own_area = own_low.clone()
    edge[~open_test] = False
    edge_query, edge_y, edge_x = torch.nonzero(edge, as_tuple=True)
    pairs_per_chunk = max(1, _CHUNK_ELEMENTS // (rows.members.shape[1] * cols.members.shape[1]))
    for begin in range(0, edge_query.numel(), pairs_per_chunk):
        part = slice(begin, begin + pairs_per_chunk)
        values = _exact_logits(logits, edge_query[part], edge_y[part], edge_x[part], rows, cols)
        inside_count = (
            ((values.sigmoid() >= mask_threshold) & _member_mask(edge_y[part], edge_x[part], rows, cols))
            .flatten(1)
            .sum(1)
        )
        own_area = own_area.index_add(0, edge_query[part], inside_count.float())
    is_segment |= open_test & (own_area > 0) & (assigned_area >= overlap_mask_area_threshold * own_area)

    return PanopticAssignment(
        assigned_area=assigned_area.long(),
        segment_area=segment_area.long(),
        is_segment=is_segment,
        cell_winner=cell_winner,
        cell_inside=cell_inside,
        cell_decided=cell_decided,
        exact_pixels=exact_pixels,
        exact_winner=exact_winner,
        exact_inside=exact_inside,
    )
