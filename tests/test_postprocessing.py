from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from transformers import SamImageProcessor

from transformers_possam import PosSAMImageProcessor
from transformers_possam.postprocessing import class_scores


def sam_reshaped_size(target_size, longest_edge):
    """
    The resized size SAM's preprocessing gives an image of `target_size` (transformers' own rule): what
    post-processing derives when it gets `target_sizes` without `reshaped_input_sizes`. None stays None.
    """
    if target_size is None:
        return None
    return SamImageProcessor()._get_preprocess_shape(target_size, longest_edge)


def make_outputs(mask_logits, class_logits, clip_logits=None, iou=None):
    batch, queries = mask_logits.shape[:2]
    return SimpleNamespace(
        masks_queries_logits=mask_logits,
        class_queries_logits=class_logits,
        clip_class_logits=clip_logits,
        iou_scores=iou if iou is not None else torch.ones(batch, queries),
    )


def confident(label, num_classes, strength=10.0):
    logits = torch.full((num_classes + 1,), -strength)
    logits[label] = strength
    return logits


@pytest.mark.parametrize("dense_assignment", [False, True])
def test_panoptic_crop_resize_fusion_and_invariants(dense_assignment):
    processor = PosSAMImageProcessor()
    # original image 100 x 200 -> reshaped 512 x 1024 inside the 1024 x 1024 padding -> masks at 256 x 256
    low = torch.full((1, 4, 256, 256), -10.0)
    low[0, 0, :64, :128] = 10.0  # top-left quarter of the valid region (valid rows 0..127)
    low[0, 1, :64, 128:] = 10.0  # top-right quarter
    low[0, 2, 64:128, :] = 10.0  # bottom half
    low[0, 3, 128:, :] = 10.0  # padding only: must vanish
    classes = torch.stack([confident(0, 3), confident(0, 3), confident(1, 3), confident(2, 3)])[None]
    outputs = make_outputs(low, classes)
    (thing,) = processor.post_process_panoptic_segmentation(
        outputs, target_sizes=[(100, 200)], reshaped_input_sizes=[(512, 1024)], dense_assignment=dense_assignment
    )
    segmentation, info = thing["segmentation"], thing["segments_info"]
    assert segmentation.shape == (100, 200) and segmentation.dtype == torch.int32
    assert [s["label_id"] for s in info] == [0, 0, 1]  # query 3 lies in the padding: no segment
    assert len({s["id"] for s in info}) == 3
    # each segment covers its region, none overlaps (one id per pixel), ids match segments_info
    assert (segmentation[5:45, 5:95] == info[0]["id"]).all()
    assert (segmentation[5:45, 105:195] == info[1]["id"]).all()
    assert (segmentation[55:95] == info[2]["id"]).all()
    assert set(torch.unique(segmentation).tolist()) <= {0} | {s["id"] for s in info}

    # label 0 as stuff: both queries fuse into one segment
    (stuff,) = processor.post_process_panoptic_segmentation(
        outputs,
        target_sizes=[(100, 200)],
        reshaped_input_sizes=[(512, 1024)],
        label_ids_to_fuse=[0],
        dense_assignment=dense_assignment,
    )
    assert [(s["label_id"], s["was_fused"]) for s in stuff["segments_info"]] == [(0, True), (1, False)]
    assert (stuff["segmentation"][5:45, 5:195] == stuff["segments_info"][0]["id"]).all()


@pytest.mark.parametrize("dense_assignment", [False, True])
def test_void_queries_and_empty_results(dense_assignment):
    processor = PosSAMImageProcessor()
    masks = torch.randn(2, 3, 16, 16)
    void = torch.full((3, 4), -10.0)
    void[:, -1] = 10.0  # every query void
    outputs = make_outputs(masks, torch.stack([void, void]))
    results = processor.post_process_panoptic_segmentation(
        outputs, target_sizes=[(30, 40), (50, 20)], dense_assignment=dense_assignment
    )
    for result, size in zip(results, [(30, 40), (50, 20)]):
        assert result["segments_info"] == [] and result["segmentation"].shape == size
        assert (result["segmentation"] == 0).all()


@pytest.mark.parametrize("dense_assignment", [False, True])
def test_overlap_threshold_drops_mostly_hidden_masks(dense_assignment):
    processor = PosSAMImageProcessor()
    masks = torch.full((1, 2, 32, 32), -10.0)
    masks[0, 0] = 10.0  # whole image, lower score
    masks[0, 1, :, :24] = 10.0  # covers 75% of the image, higher score
    classes = torch.stack([confident(0, 2, 2.0), confident(1, 2, 10.0)])[None]
    (result,) = processor.post_process_panoptic_segmentation(
        make_outputs(masks, classes), overlap_mask_area_threshold=0.8, dense_assignment=dense_assignment
    )
    assert [s["label_id"] for s in result["segments_info"]] == [1]  # query 0 keeps only 25% of its mask


def test_class_scores_void_rule_and_mase_switch():
    class_logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])  # K = 2 + void; query 1 is void
    clip_logits = torch.tensor([[[0.0, 3.0], [1.0, 0.0]]])
    iou = torch.tensor([[0.5, 0.9]])
    outputs = make_outputs(torch.zeros(1, 2, 4, 4), class_logits, clip_logits, iou)
    scores, is_void = class_scores(outputs, seen_mask=torch.tensor([True, False]))
    assert is_void.tolist() == [[False, True]]
    p_void = class_logits.softmax(-1)[..., -1]
    ldp = class_logits[..., :2].softmax(-1)
    clip = clip_logits.softmax(-1)
    fixed, fixed_void = class_scores(outputs, seen_mask=torch.tensor([True, False]), use_mase=False)
    # FC-CLIP's eval branch (fcclip.py): geometric ensemble, softmax of its log, times 1 - p_void, void appended,
    # log(. + 1e-8), and the inference functions' softmax over K + 1
    geometric = (ldp ** torch.tensor([0.6, 0.2]) * clip ** torch.tensor([0.4, 0.8])).log().softmax(-1)
    final = torch.log(torch.cat([geometric * (1 - p_void)[..., None], p_void[..., None]], -1) + 1e-8).softmax(-1)
    torch.testing.assert_close(fixed, final[..., :2])
    assert fixed_void.tolist() == (final.argmax(-1) == 2).tolist()
    # MASE keeps the IoU weighting in its score: below the renormalized fixed ensemble's for IoU < 1
    assert scores[0, 0].sum() < fixed[0, 0].sum()
    # the weights change the ensemble; they must be numbers in [0, 1]
    other, _ = class_scores(outputs, seen_mask=torch.tensor([True, False]), alpha=0.1, beta=0.3)
    assert not torch.allclose(other, scores)
    for bad in (-0.1, 1.5, "0.4", None, True):
        with pytest.raises(ValueError, match="mase_alpha must be a number in \\[0, 1\\]"):
            class_scores(outputs, alpha=bad)


def test_semantic_and_instance_shapes():
    processor = PosSAMImageProcessor()
    masks = torch.full((1, 3, 256, 256), -10.0)
    masks[0, 0, :, :128] = 10.0
    masks[0, 1, :, 128:] = 10.0
    classes = torch.stack([confident(1, 4), confident(3, 4), confident(0, 4, 0.1)])[None]
    outputs = make_outputs(masks, classes)
    (semantic,) = processor.post_process_semantic_segmentation(
        outputs, target_sizes=[(60, 60)], reshaped_input_sizes=[(1024, 1024)]
    )
    assert semantic.shape == (60, 60)
    assert (semantic[:, :28] == 1).all() and (semantic[:, 32:] == 3).all()
    (instance,) = processor.post_process_instance_segmentation(
        outputs, target_sizes=[(60, 60)], num_top_instances=5, return_binary_maps=True
    )
    info = instance["segments_info"]
    assert len(info) == len(instance["binary_masks"]) <= 5
    assert [s["score"] for s in info] == sorted((s["score"] for s in info), reverse=True)
    assert {info[0]["label_id"], info[1]["label_id"]} == {1, 3}
    (things,) = processor.post_process_instance_segmentation(outputs, thing_label_ids=[3])
    assert {s["label_id"] for s in things["segments_info"]} == {3}


def dense_panoptic_reference(processor, outputs, target_size, reshaped_size, mask_threshold=0.5, overlap=0.8):
    """The definition, computed the slow way: every kept mask upsampled to the output, argmax per pixel."""
    scores, is_void = class_scores(outputs)
    query_scores, query_labels = scores[0].max(-1)
    keep = (~is_void[0]) & (query_scores > 0.0)
    masks = processor._masks_to_target(outputs.masks_queries_logits[0][keep].float(), reshaped_size, target_size)
    probs = masks.sigmoid()
    kept_scores = query_scores[keep]
    assignment = (probs * kept_scores[:, None, None]).argmax(0)
    inside = probs.gather(0, assignment[None])[0] >= mask_threshold
    count = masks.shape[0]
    assigned = torch.bincount(assignment.flatten(), minlength=count)
    segment = torch.bincount(assignment[inside], minlength=count)
    own = (probs >= mask_threshold).flatten(1).sum(-1)
    valid = (segment > 0) & (own > 0) & (assigned >= overlap * own)
    lookup = torch.zeros(count, dtype=torch.int32)
    lookup[valid] = torch.arange(1, int(valid.sum()) + 1, dtype=torch.int32)
    labels = query_labels[keep][valid].tolist()
    return torch.where(inside, lookup[assignment], 0), labels, (assigned, segment, own)


def blob_logits(queries, size, generator):
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(queries, 2, generator=generator) * size
    radii = 2 + torch.rand(queries, 1, 1, generator=generator) * size / 6
    distance = ((ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2).sqrt()
    return (radii - distance) / (0.5 + 3 * torch.rand(queries, 1, 1, generator=generator)) + 0.3 * torch.randn(
        queries, size, size, generator=generator
    )


@pytest.mark.parametrize("dense_assignment", [False, True])
def test_panoptic_matches_dense_upsampling_of_every_mask(dense_assignment):
    """
    Both panoptic paths, the cell-bound algorithm (mask_resampling, CPU) and the sync-free chunked one (GPU), give
    the result of the definition: same segments, same pixels.
    """
    processor = PosSAMImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    generator = torch.Generator().manual_seed(0)
    cases = [((96, 128), (96, 128)), ((96, 128), (61, 83)), ((96, 128), (200, 290)), (None, (77, 45)), (None, None)]
    for seed, (reshaped, target) in enumerate(cases):
        queries, classes = 25, 12
        mask_logits = blob_logits(queries, 32, generator)[None]
        class_logits = torch.randn(1, queries, classes + 1, generator=generator) * 3
        class_logits[..., -1] -= 6.0  # mostly non-void
        clip_logits = torch.randn(1, queries, classes, generator=generator)
        outputs = make_outputs(mask_logits, class_logits, clip_logits, torch.rand(1, queries, generator=generator))
        # target alone: the padding is still cropped, by SAM's resize rule (longest side -> 128)
        expected, labels, _ = dense_panoptic_reference(
            processor, outputs, target, reshaped or sam_reshaped_size(target, 128)
        )
        (result,) = processor.post_process_panoptic_segmentation(
            outputs,
            target_sizes=[target] if target else None,
            reshaped_input_sizes=[reshaped] if reshaped else None,
            dense_assignment=dense_assignment,
        )
        assert result["segmentation"].shape == expected.shape
        assert [s["label_id"] for s in result["segments_info"]] == labels and len(labels) > 3
        assert torch.equal(result["segmentation"], expected), (
            f"case {seed}: {(result['segmentation'] != expected).sum()} pixels differ"
        )


@pytest.mark.parametrize("dense_assignment", [False, True])
def test_panoptic_matches_dense_on_noise_logits(dense_assignment):
    """Noise masks: almost every cell has several candidates, so nearly every pixel takes the exact path."""
    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    generator = torch.Generator().manual_seed(1)
    mask_logits = torch.randn(1, 30, 16, 16, generator=generator) * 2
    class_logits = torch.randn(1, 30, 6, generator=generator) * 3
    class_logits[..., -1] -= 6.0
    outputs = make_outputs(
        mask_logits, class_logits, torch.randn(1, 30, 5, generator=generator), torch.rand(1, 30, generator=generator)
    )
    for overlap in (0.0, 0.3):
        expected, labels, _ = dense_panoptic_reference(processor, outputs, (90, 70), (48, 64), overlap=overlap)
        (result,) = processor.post_process_panoptic_segmentation(
            outputs,
            target_sizes=[(90, 70)],
            reshaped_input_sizes=[(48, 64)],
            overlap_mask_area_threshold=overlap,
            dense_assignment=dense_assignment,
        )
        assert [s["label_id"] for s in result["segments_info"]] == labels and len(labels) >= 3
        assert torch.equal(result["segmentation"], expected)


@pytest.mark.parametrize(
    "reshaped_size,target_size", [((48, 64), (50, 70)), ((48, 64), (17, 23)), (None, (130, 90)), (None, None)]
)
def test_semantic_equals_fcclip_order_dense(reshaped_size, target_size, monkeypatch):
    """
    FC-CLIP's semantic inference, densely: every mask's logits resized to the output (F.interpolate to the padded
    size, crop, F.interpolate to the target), then sigmoid, then the class-weighted sum, argmax. Ours works in row
    bands (forced small here) with the same bilinear weights: labels may differ only at float ties.
    """
    from transformers_possam import postprocessing

    monkeypatch.setattr(postprocessing, "SEMANTIC_BAND_ELEMENTS", 12 * 64 * 3)  # a few rows per band
    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    generator = torch.Generator().manual_seed(3)
    queries, classes = 12, 40
    outputs = make_outputs(
        blob_logits(queries, 16, generator)[None],
        torch.randn(1, queries, classes + 1, generator=generator) * 3,
        torch.randn(1, queries, classes, generator=generator),
        torch.rand(1, queries, generator=generator),
    )
    (labels,) = processor.post_process_semantic_segmentation(
        outputs, target_sizes=target_size and [target_size], reshaped_input_sizes=reshaped_size and [reshaped_size]
    )
    scores, _ = class_scores(outputs)
    masks = outputs.masks_queries_logits[0]
    # target alone: the padding is still cropped, by SAM's resize rule (longest side -> 64)
    reshaped_size = reshaped_size or sam_reshaped_size(target_size, 64)
    if reshaped_size is not None:
        masks = F.interpolate(masks[None], size=(64, 64), mode="bilinear", align_corners=False)[0][
            :, : reshaped_size[0], : reshaped_size[1]
        ]
    if target_size is not None:
        masks = F.interpolate(masks[None], size=target_size, mode="bilinear", align_corners=False)[0]
    class_maps = torch.einsum("qk,qhw->khw", scores[0], masks.sigmoid())
    expected = class_maps.argmax(0)
    assert labels.shape == expected.shape and len(labels.unique()) > 3
    differ = labels != expected
    top2 = class_maps.topk(2, dim=0).values
    assert differ.float().mean() < 1e-3 and bool(((top2[0] - top2[1])[differ] < 1e-5).all())
    # return_segmentation_scores: the same labels, and the K class maps they are the argmax of (Mask2Former's output)
    (with_scores,) = processor.post_process_semantic_segmentation(
        outputs,
        target_sizes=target_size and [target_size],
        reshaped_input_sizes=reshaped_size and [reshaped_size],
        return_segmentation_scores=True,
    )
    assert torch.equal(with_scores.segmentation, labels)
    assert with_scores.segmentation_scores.shape == (classes, *labels.shape)
    torch.testing.assert_close(with_scores.segmentation_scores, class_maps, atol=1e-5, rtol=1e-5)
    assert torch.equal(with_scores.segmentation_scores.argmax(0), labels)
    if reshaped_size is None and target_size is None:
        return  # nothing is resized: the order cannot matter
    # the order matters: sigmoid at mask resolution, then resize, labels other pixels
    wrong = processor._masks_to_target(
        torch.einsum("qk,qhw->khw", scores[0], outputs.masks_queries_logits[0].sigmoid()), reshaped_size, target_size
    )
    assert (wrong.argmax(0) != expected).any()


def test_instance_matches_dense_reference():
    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    generator = torch.Generator().manual_seed(4)
    queries, classes = 20, 6
    outputs = make_outputs(
        blob_logits(queries, 16, generator)[None],
        torch.randn(1, queries, classes + 1, generator=generator) * 3,
        torch.randn(1, queries, classes, generator=generator),
        torch.rand(1, queries, generator=generator),
    )
    (result,) = processor.post_process_instance_segmentation(
        outputs,
        target_sizes=[(50, 70)],
        reshaped_input_sizes=[(48, 64)],
        num_top_instances=30,
        return_binary_maps=True,
    )
    # the definition, with every selected (query, class) pair's mask resized separately
    scores, _ = class_scores(outputs)
    top_scores, top_index = scores[0].flatten().topk(30)
    pair_queries, pair_labels = top_index // classes, top_index % classes
    masks = processor._masks_to_target(outputs.masks_queries_logits[0][pair_queries], (48, 64), (50, 70))
    binary = masks > 0
    final = top_scores * (masks.sigmoid() * binary).flatten(1).sum(-1) / (binary.flatten(1).sum(-1) + 1e-6)
    keep = (final > 0) & binary.flatten(1).any(-1)
    order = torch.nonzero(keep).flatten()
    order = order[final[order].argsort(descending=True)]
    assert [s["label_id"] for s in result["segments_info"]] == pair_labels[order].tolist() and len(order) > 5
    assert [s["score"] for s in result["segments_info"]] == [round(float(v), 6) for v in final[order]]
    assert torch.equal(result["binary_masks"], binary[order])
    expected = torch.zeros(50, 70, dtype=torch.int32)
    for rank in reversed(range(len(order))):
        expected[binary[order[rank]]] = rank + 1
    assert torch.equal(result["segmentation"], expected)


def test_instance_inference_with_nothing_to_report():
    """No thing pair in the top 100, no thing class at all, or no query: empty results of the output size, no crash."""
    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    masks = torch.randn(1, 3, 16, 16)
    classes = torch.stack([confident(2, 3), confident(2, 3), confident(1, 3)])[None]  # classes 1, 2 are stuff here
    for outputs, things in [
        (make_outputs(masks, classes), [0]),  # the top pairs are all stuff: FC-CLIP keeps none of them
        (make_outputs(masks, classes), []),  # a vocabulary without thing classes
        (make_outputs(masks[:, :0], classes[:, :0]), [0]),  # zero queries
    ]:
        (result,) = processor.post_process_instance_segmentation(
            outputs, target_sizes=[(20, 30)], thing_label_ids=things, num_top_instances=2, return_binary_maps=True
        )
        assert (
            result["segments_info"] == []
            and result["segmentation"].shape == (20, 30)
            and not result["segmentation"].any()
        )
        assert result["binary_masks"].shape == (0, 20, 30)
