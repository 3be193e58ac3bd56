"""
The CPU (cell-bound) panoptic path's building blocks against their definitions: the cell bounds computed a few queries
at a time are the min / max of each cell's window and contain every interpolated logit of the cell; the panoptic
result stays the definition's (every kept mask upsampled, argmax per pixel) when the bounds run in many chunks, over a
batch with ties, masks dropped by the overlap test, an image without segments and non-square targets; the NaN check of
the outputs finds every NaN / infinity without building full-size temporaries.
"""

import pytest
import torch
from torch.nn import functional as F

from tests.test_postprocessing import blob_logits, dense_panoptic_reference, make_outputs, sam_reshaped_size
from transformers_possam import PosSAMImageProcessor, mask_resampling
from transformers_possam.mask_resampling import axis_resampling, cell_bounds
from transformers_possam.postprocessing import read_outputs


# (low-resolution size, steps of each axis): upsample + crop + downsample (the benchmark's 512x683 shape, scaled),
# upsample + crop + upsample, a plain resize, and one whose last cell is clamped at the border (irregular)
AXIS_CASES = [
    (32, (((128, 96), (64, None)), ((128, 128), (85, None)))),
    (32, (((128, 96), (200, None)), ((128, 128), (290, None)))),
    (16, (((90, None),), ((70, None),))),
    (20, (((77, None),), ((45, None),))),
]


def window_bounds_definition(logits, rows, cols):
    """min / max of `logits` over every cell's window, one cell at a time."""
    num_queries = logits.shape[0]
    low = torch.empty(num_queries, len(rows.cell_starts), len(cols.cell_starts))
    high = torch.empty_like(low)
    for cy, y in enumerate(rows.cell_starts.tolist()):
        for cx, x in enumerate(cols.cell_starts.tolist()):
            window = logits[:, y : y + rows.window, x : x + cols.window].flatten(1)
            low[:, cy, cx], high[:, cy, cx] = window.amin(1), window.amax(1)
    return low, high


def interpolate_steps(logits, row_steps, col_steps):
    """`logits` resized by F.interpolate through the same (resize_to, crop_to) steps of both axes."""
    for (height, crop_height), (width, crop_width) in zip(row_steps, col_steps):
        logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        logits = logits[:, :crop_height, :crop_width]
    return logits


@pytest.mark.parametrize("size,steps", AXIS_CASES)
@pytest.mark.parametrize("queries_per_chunk", [1, 3, 7])  # 7 queries: one at a time, 3 + 3 + 1, all at once
def test_cell_bounds_are_window_min_max_and_contain_the_interpolated_logits(
    size, steps, queries_per_chunk, monkeypatch
):
    row_steps, col_steps = steps
    rows, cols = axis_resampling(size, row_steps), axis_resampling(size, col_steps)
    rows_read = int(rows.cell_starts[-1]) + rows.window
    monkeypatch.setattr(mask_resampling, "_BOUND_CHUNK_ELEMENTS", queries_per_chunk * rows_read * size)
    logits = torch.randn(7, size, size, generator=torch.Generator().manual_seed(size)) * 3
    low, high = cell_bounds(logits, rows, cols)

    expected_low, expected_high = window_bounds_definition(logits, rows, cols)
    assert torch.equal(low, expected_low) and torch.equal(high, expected_high)
    # the property the assignment relies on: each output pixel's interpolated logit lies within its cell's bounds
    resized = interpolate_steps(logits, row_steps, col_steps)
    assert resized.shape[-2:] == (rows.size, cols.size)
    cell_low = low[:, rows.cell_of][:, :, cols.cell_of]
    cell_high = high[:, rows.cell_of][:, :, cols.cell_of]
    assert bool((resized >= cell_low - 1e-5).all()) and bool((resized <= cell_high + 1e-5).all())


def test_cell_bounds_of_a_single_query_and_of_none():
    rows, cols = axis_resampling(16, ((90, None),)), axis_resampling(16, ((70, None),))
    logits = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(3))
    low, high = cell_bounds(logits, rows, cols)
    expected_low, expected_high = window_bounds_definition(logits, rows, cols)
    assert torch.equal(low, expected_low) and torch.equal(high, expected_high)
    low, high = cell_bounds(logits[:0], rows, cols)
    assert low.shape == high.shape == (0, len(rows.cell_starts), len(cols.cell_starts))


@pytest.mark.parametrize("chunk_elements", [1, 5000])
def test_sparse_panoptic_equals_definition_with_bounds_in_many_chunks(chunk_elements, monkeypatch):
    """
    A batch of 3 through the CPU path with the cell bounds computed one (or a few) queries at a time: image 0 with an
    exact tie (a duplicated query: the first wins, the copy gets no pixel and no segment) and masks hidden behind
    others (dropped by the overlap test), image 1 on a non-square target, image 2 with every query void (no segment,
    a map of zeros). Each image equals the definition (every kept mask upsampled, argmax per pixel).
    """
    monkeypatch.setattr(mask_resampling, "_BOUND_CHUNK_ELEMENTS", chunk_elements)
    processor = PosSAMImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    generator = torch.Generator().manual_seed(5)
    batch, queries, classes = 3, 24, 9
    mask_logits = torch.stack([blob_logits(queries, 32, generator) for _ in range(batch)])
    class_logits = torch.randn(batch, queries, classes + 1, generator=generator) * 3
    class_logits[..., -1] -= 6.0
    clip_logits = torch.randn(batch, queries, classes, generator=generator)
    iou = torch.rand(batch, queries, generator=generator)
    # image 0: query 5 duplicates query 4 (same mask, same class scores)
    for values in (mask_logits, class_logits, clip_logits, iou):
        values[0, 5] = values[0, 4]
    class_logits[2, :, -1] += 40.0  # image 2: all void
    outputs = make_outputs(mask_logits, class_logits, clip_logits, iou)
    targets = [(96, 128), (61, 83), (77, 45)]
    results = processor.post_process_panoptic_segmentation(outputs, target_sizes=targets, dense_assignment=False)

    for index in range(2):
        image = make_outputs(*(values[index : index + 1] for values in (mask_logits, class_logits, clip_logits, iou)))
        expected, labels, (assigned, _, own) = dense_panoptic_reference(
            processor, image, targets[index], sam_reshaped_size(targets[index], 128)
        )
        result = results[index]
        assert [segment["label_id"] for segment in result["segments_info"]] == labels and len(labels) > 3
        assert torch.equal(result["segmentation"], expected)
        if index == 0:
            # the cases this image exists for: a kept query with pixels of its own that loses the overlap test, and
            # the duplicate, which wins no pixel
            assert bool(((assigned > 0) & (assigned < 0.8 * own)).any())
            scores = [segment["score"] for segment in result["segments_info"]]
            assert len(scores) == len(set(scores)), "the duplicated query must not become a second segment"
    assert results[2]["segments_info"] == [] and results[2]["segmentation"].shape == targets[2]
    assert not results[2]["segmentation"].any()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("position", [0, 123_457, -1])
def test_finite_check_finds_nan_and_infinity_anywhere(value, position):
    """Every position of a tensor large enough to be reduced in several blocks / threads (first, middle, last)."""
    masks = torch.randn(2, 40, 64, 64)
    masks.view(-1)[position] = value
    outputs = make_outputs(masks, torch.randn(2, 40, 5))
    with pytest.raises(ValueError, match="outputs.masks_queries_logits contains NaN or infinite values"):
        read_outputs(outputs)


def test_finite_check_accepts_outputs_without_queries():
    outputs = make_outputs(torch.zeros(1, 0, 8, 8), torch.zeros(1, 0, 5))
    assert read_outputs(outputs).masks_queries_logits.shape == (1, 0, 8, 8)


def test_finite_check_makes_no_full_size_temporary():
    """
    `torch.isfinite(masks).all()` allocated four mask-sized temporaries (most of the panoptic inference's time on
    CPU, where fresh large allocations are page-faulted in); the check allocates no more than a few scalars.
    """
    masks = torch.randn(1, 50, 128, 128)
    outputs = make_outputs(masks, torch.randn(1, 50, 5))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        read_outputs(outputs)
    largest_allocation = max(event.cpu_memory_usage for event in profiler.events())
    assert largest_allocation < masks.numel(), (
        f"an allocation of {largest_allocation} bytes for {masks.numel()} logits"
    )
