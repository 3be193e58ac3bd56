"""
Parity of our post-processors (`use_mase=False`) with FC-CLIP's inference, as transcribed in `fcclip_reference.py`.

The inputs are synthetic but shaped like real model outputs: smooth mask logits in about [-10, 10] at 1/4 of the
padded input, confident thing and stuff queries (some stuff classes predicted by two queries, to be fused), void
queries, ambiguous queries where the CLIP branch decides, seen and unseen classes, two images whose resized size
inside the 128x128 padding differs, and output sizes that are neither the padded nor the resized size.

The first group of tests checks the reference on its own (no code of ours involved); the parity tests then compare
ours with it.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from transformers_possam import PosSAMImageProcessor

from .fcclip_reference import (
    fcclip_ensemble_logits,
    fcclip_ensemble_probs,
    fcclip_inference,
    fcclip_upsample_masks,
    sem_seg_postprocess,
    semantic_inference,
)


NUM_CLASSES = 10
THING_IDS = (0, 1, 2, 3, 4, 5)
STUFF_IDS = (6, 7, 8, 9)
# FC-CLIP's category_overlapping_mask: 1 = class of the training vocabulary (exponent alpha), 0 = unseen (beta)
SEEN_MASK = torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.bool)
ALPHA, BETA = 0.4, 0.8
PADDED_SIZE = (128, 128)
MASK_SIZE = (32, 32)  # 1/4 of the padded input, as the model's mask head
# image 0: 100x150 original -> 85x128 inside the padding; image 1: portrait, 150x100 -> 128x85
ORIGINAL_SIZES = [(100, 150), (150, 100)]
RESHAPED_SIZES = [(85, 128), (128, 85)]

# query roles, per image, in this order: each of the first ones owns a region of the image
STUFF_QUERY_LABELS = (6, 6, 7, 8, 8, 9)  # classes 6 and 8 own two regions each: FC-CLIP fuses them
THING_QUERY_LABELS = (0, 1, 2, 3, 4, 5, 0, 2, 3, 5)
# (in-vocabulary favourite, CLIP favourite): the two branches disagree and the geometric ensemble decides
AMBIGUOUS_QUERY_LABELS = ((1, 2), (7, 4), (4, 9))
DUPLICATED_THING_QUERY = (
    6  # one more query repeats this thing query's mask, less sure: it should lose the overlap test
)
NUM_VOID_QUERIES = 4
NUM_QUERIES = len(STUFF_QUERY_LABELS) + len(THING_QUERY_LABELS) + len(AMBIGUOUS_QUERY_LABELS) + 1 + NUM_VOID_QUERIES

PIXEL_AGREEMENT = 0.999
SCORE_TOLERANCE = 1e-5
SEMANTIC_TIE_GAP = 1e-4
MASK_LOGIT_SCALE = 10.0  # real mask logits saturate around +-10 away from edges
EDGE_SHARPNESS = 2.5  # how fast a region's logits go from -10 to 10 across its border (in mask cells)


# ---------------------------------------------------------------------------------------------------------------
# synthetic model outputs


def smooth_noise(generator: torch.Generator, grid: int = 4) -> torch.Tensor:
    """`(32, 32)` low-frequency noise: a `grid x grid` standard normal field, bicubic-upsampled."""
    coarse = torch.randn(1, 1, grid, grid, generator=generator)
    return F.interpolate(coarse, size=MASK_SIZE, mode="bicubic", align_corners=False)[0, 0]


def gaussian_bump(
    generator: torch.Generator, valid_size: tuple[float, float], sigma_range: tuple[float, float]
) -> torch.Tensor:
    """`(32, 32)` elliptic Gaussian of peak 1, centred inside the image part (`valid_size`) of the mask grid."""
    rows = torch.arange(MASK_SIZE[0], dtype=torch.float32)[:, None]
    cols = torch.arange(MASK_SIZE[1], dtype=torch.float32)[None, :]
    center = torch.rand(2, generator=generator) * torch.tensor(valid_size)
    sigma = sigma_range[0] + torch.rand(2, generator=generator) * (sigma_range[1] - sigma_range[0])
    return torch.exp(-0.5 * (((rows - center[0]) / sigma[0]) ** 2 + ((cols - center[1]) / sigma[1]) ** 2))


def region_mask_logits(region_fields: torch.Tensor) -> torch.Tensor:
    """
    `(R, 32, 32)` fields -> mask logits of R queries that split the image like a trained model's: query r is positive
    where its field beats every other one, with smooth, saturating borders.
    """
    logits = []
    for index in range(len(region_fields)):
        others = torch.cat([region_fields[:index], region_fields[index + 1 :]]).amax(0)
        logits.append(MASK_LOGIT_SCALE * torch.tanh(EDGE_SHARPNESS * (region_fields[index] - others)))
    return torch.stack(logits)


def in_and_out_vocab_logits(
    generator: torch.Generator, in_vocab_label: int | None, clip_label: int | None, strength: float
):
    """
    `(K + 1,)` in-vocabulary logits (void last; `in_vocab_label=None`: a void query) and `(K,)` CLIP logits shaped
    like FC-CLIP's: logit_scale (100) x cosine similarities around 0.15, higher on `clip_label`.
    """
    in_vocab = torch.randn(NUM_CLASSES + 1, generator=generator)
    in_vocab[NUM_CLASSES if in_vocab_label is None else in_vocab_label] += strength
    out_vocab = 100.0 * (0.15 + 0.02 * torch.randn(NUM_CLASSES, generator=generator))
    if clip_label is not None:
        out_vocab[clip_label] += 5.0
    return in_vocab, out_vocab


def make_synthetic_outputs(seed: int = 0) -> SimpleNamespace:
    """
    Two images in our model-output layout (`tests/test_postprocessing.py::make_outputs`). Stuff regions come from
    smooth random fields, things and ambiguous objects are Gaussian bumps on top; the duplicate and the void queries
    have masks of their own that overlap the others.
    """
    generator = torch.Generator().manual_seed(seed)
    masks, in_vocab, out_vocab = [], [], []
    for reshaped in RESHAPED_SIZES:
        valid_size = (reshaped[0] * MASK_SIZE[0] / PADDED_SIZE[0], reshaped[1] * MASK_SIZE[1] / PADDED_SIZE[1])
        fields = [smooth_noise(generator, grid=3) for _ in STUFF_QUERY_LABELS]
        # object bumps reach 2 above the stuff fields (amplitude ~1) at their centre
        fields += [
            3.0 * gaussian_bump(generator, valid_size, (1.5, 3.5)) - 1.0 + 0.2 * smooth_noise(generator)
            for _ in THING_QUERY_LABELS
        ]
        fields += [
            3.0 * gaussian_bump(generator, valid_size, (2.0, 4.0)) - 1.0 + 0.2 * smooth_noise(generator)
            for _ in AMBIGUOUS_QUERY_LABELS
        ]
        image_masks = list(region_mask_logits(torch.stack(fields)))
        duplicated = len(STUFF_QUERY_LABELS) + DUPLICATED_THING_QUERY
        image_masks.append(image_masks[duplicated] + 2.0 * smooth_noise(generator))
        for _ in range(NUM_VOID_QUERIES):
            bump = gaussian_bump(generator, valid_size, (2.0, 8.0))
            image_masks.append(MASK_LOGIT_SCALE * torch.tanh(3.0 * (bump - 0.5) + 0.5 * smooth_noise(generator)))

        # (in-vocabulary label, CLIP label, in-vocabulary confidence) per query, in the order of the masks
        classes = [(label, label, 7.0) for label in STUFF_QUERY_LABELS]
        classes += [(label, label, 8.0) for label in THING_QUERY_LABELS]
        classes += [(in_label, clip_label, 2.5) for in_label, clip_label in AMBIGUOUS_QUERY_LABELS]
        duplicate_label = THING_QUERY_LABELS[DUPLICATED_THING_QUERY]
        classes.append((duplicate_label, duplicate_label, 5.0))
        classes += [(None, None, 8.0)] * NUM_VOID_QUERIES
        class_logits = [in_and_out_vocab_logits(generator, *query_classes) for query_classes in classes]
        masks.append(torch.stack(image_masks))
        in_vocab.append(torch.stack([logits for logits, _ in class_logits]))
        out_vocab.append(torch.stack([logits for _, logits in class_logits]))
    iou = 0.5 + 0.5 * torch.rand(len(RESHAPED_SIZES), NUM_QUERIES, generator=generator)  # unused without MASE
    return SimpleNamespace(
        masks_queries_logits=torch.stack(masks),
        class_queries_logits=torch.stack(in_vocab),
        clip_class_logits=torch.stack(out_vocab),
        iou_scores=iou,
    )


@pytest.fixture(scope="module")
def outputs() -> SimpleNamespace:
    return make_synthetic_outputs()


@pytest.fixture(scope="module")
def reference(outputs) -> list[dict]:
    return fcclip_inference(
        outputs.class_queries_logits,
        outputs.clip_class_logits,
        outputs.masks_queries_logits,
        SEEN_MASK.long(),
        PADDED_SIZE,
        RESHAPED_SIZES,
        ORIGINAL_SIZES,
        THING_IDS,
        alpha=ALPHA,
        beta=BETA,
    )


@pytest.fixture(scope="module")
def processor() -> PosSAMImageProcessor:
    return PosSAMImageProcessor(
        size={"longest_edge": PADDED_SIZE[0]}, pad_size={"height": PADDED_SIZE[0], "width": PADDED_SIZE[1]}
    )


def common_kwargs() -> dict:
    return {
        "target_sizes": ORIGINAL_SIZES,
        "reshaped_input_sizes": RESHAPED_SIZES,
        "seen_mask": SEEN_MASK,
        "use_mase": False,
        "mase_alpha": ALPHA,
        "mase_beta": BETA,
    }


# ---------------------------------------------------------------------------------------------------------------
# the reference on its own


def test_reference_ensemble_is_a_distribution_with_void_last(outputs):
    probs = fcclip_ensemble_probs(
        outputs.class_queries_logits, outputs.clip_class_logits, SEEN_MASK.long(), ALPHA, BETA
    )
    assert probs.shape == outputs.class_queries_logits.shape
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs[..., -1], outputs.class_queries_logits.softmax(-1)[..., -1], atol=1e-7, rtol=0)


def test_reference_ensemble_exponents(outputs):
    in_logits, clip_logits = outputs.class_queries_logits, outputs.clip_class_logits
    p_void = in_logits.softmax(-1)[..., -1:]
    p_in, p_clip = in_logits[..., :-1].softmax(-1), clip_logits.softmax(-1)
    only_in = fcclip_ensemble_probs(in_logits, clip_logits, SEEN_MASK.long(), alpha=0.0, beta=0.0)
    torch.testing.assert_close(only_in[..., :-1], p_in * (1 - p_void))
    only_clip = fcclip_ensemble_probs(in_logits, clip_logits, SEEN_MASK.long(), alpha=1.0, beta=1.0)
    torch.testing.assert_close(only_clip[..., :-1], p_clip * (1 - p_void))
    # seen classes take alpha, unseen ones beta: alpha=0, beta=1 picks p_in on seen and p_clip on unseen classes,
    # renormalized over the K classes
    mixed = fcclip_ensemble_probs(in_logits, clip_logits, SEEN_MASK.long(), alpha=0.0, beta=1.0)
    picked = torch.where(SEEN_MASK, p_in, p_clip)
    torch.testing.assert_close(mixed[..., :-1], picked / picked.sum(-1, keepdim=True) * (1 - p_void))
    # the general case: geometric mean with exponent alpha / beta, renormalized
    geometric = torch.where(SEEN_MASK, p_in ** (1 - ALPHA) * p_clip**ALPHA, p_in ** (1 - BETA) * p_clip**BETA)
    general = fcclip_ensemble_probs(in_logits, clip_logits, SEEN_MASK.long(), ALPHA, BETA)
    torch.testing.assert_close(general[..., :-1], geometric / geometric.sum(-1, keepdim=True) * (1 - p_void))


def test_reference_ensemble_logits_are_log_probs_plus_epsilon(outputs):
    args = (outputs.class_queries_logits, outputs.clip_class_logits, SEEN_MASK.long(), ALPHA, BETA)
    probs, logits = fcclip_ensemble_probs(*args), fcclip_ensemble_logits(*args)
    # what every inference sees after its softmax
    expected = (probs + 1e-8) / (1 + (NUM_CLASSES + 1) * 1e-8)
    torch.testing.assert_close(logits.softmax(-1), expected, atol=1e-7, rtol=1e-6)


def test_reference_sem_seg_postprocess_crops_then_resizes():
    maps = torch.randn(3, 16, 16)
    assert sem_seg_postprocess(maps, (16, 16), 16, 16).equal(maps)  # same size: identity
    cropped = sem_seg_postprocess(maps, (10, 12), 25, 30)
    assert cropped.shape == (3, 25, 30)
    torch.testing.assert_close(cropped, F.interpolate(maps[None, :, :10, :12], size=(25, 30), mode="bilinear")[0])
    padding_changed = maps.clone()
    padding_changed[:, 10:] = 1e6
    padding_changed[:, :, 12:] = 1e6
    assert sem_seg_postprocess(padding_changed, (10, 12), 25, 30).equal(cropped)  # the padding never leaks in


def test_reference_semantic_inference_is_score_weighted_mask_sum(outputs):
    logits = fcclip_ensemble_logits(
        outputs.class_queries_logits, outputs.clip_class_logits, SEEN_MASK.long(), ALPHA, BETA
    )
    masks = outputs.masks_queries_logits[0]
    semseg = semantic_inference(logits[0], masks)
    assert semseg.shape == (NUM_CLASSES, *MASK_SIZE)
    expected = sum(logits[0, q].softmax(-1)[:-1, None, None] * masks[q].sigmoid()[None] for q in range(NUM_QUERIES))
    torch.testing.assert_close(semseg, expected)


def test_reference_panoptic_invariants(reference):
    for result, size in zip(reference, ORIGINAL_SIZES, strict=True):
        segmentation, segments_info = result["panoptic_seg"]
        assert segmentation.shape == size and segmentation.dtype == torch.int32
        assert [s["id"] for s in segments_info] == list(range(1, len(segments_info) + 1))  # ids start at 1
        assert set(torch.unique(segmentation).tolist()) <= {0} | {s["id"] for s in segments_info}
        assert all(0 <= s["category_id"] < NUM_CLASSES for s in segments_info)  # never void
        assert all(s["isthing"] == (s["category_id"] in THING_IDS) for s in segments_info)
        stuff_labels = [s["category_id"] for s in segments_info if not s["isthing"]]
        assert len(stuff_labels) == len(set(stuff_labels))  # stuff is fused: one segment per class
        assert all(0 < s["score"] <= 1 for s in segments_info)


def test_reference_instance_keeps_things_of_the_top_100_pairs(outputs, reference):
    logits = fcclip_ensemble_logits(
        outputs.class_queries_logits, outputs.clip_class_logits, SEEN_MASK.long(), ALPHA, BETA
    )
    for image, (result, size) in enumerate(zip(reference, ORIGINAL_SIZES, strict=True)):
        instances = result["instances"]
        labels = instances["pred_classes"]
        assert set(labels.tolist()) <= set(THING_IDS)
        # top-100 first, THEN the thing filter: as many results as thing pairs among the 100 best pairs (fewer
        # than 100: some of those are stuff pairs)
        top_pairs = logits[image].softmax(-1)[:, :-1].flatten().topk(100).indices
        thing_pairs = sum(int(pair % NUM_CLASSES) in THING_IDS for pair in top_pairs.tolist())
        assert len(labels) == thing_pairs < 100
        assert instances["pred_masks"].shape == (len(labels), *size)
        assert set(torch.unique(instances["pred_masks"]).tolist()) <= {0.0, 1.0}
        assert ((instances["scores"] >= 0) & (instances["scores"] <= 1)).all()


def test_synthetic_outputs_exercise_every_path(outputs, reference):
    """The inputs reach the cases the parity tests are about (otherwise a parity test could pass vacuously)."""
    logits = fcclip_ensemble_logits(
        outputs.class_queries_logits, outputs.clip_class_logits, SEEN_MASK.long(), ALPHA, BETA
    )
    scores, labels = logits.softmax(-1).max(-1)
    in_vocab_labels = outputs.class_queries_logits[..., :-1].argmax(-1)
    seen_classes = set(SEEN_MASK.nonzero().flatten().tolist())
    assert NUM_QUERIES * NUM_CLASSES > 100  # instance inference's top-100 selects
    for image, result in enumerate(reference):
        kept = labels[image] != NUM_CLASSES
        assert (~kept).sum() >= NUM_VOID_QUERIES  # void queries are dropped
        # the CLIP branch overrides the in-vocabulary choice of some kept query
        assert ((labels[image] != in_vocab_labels[image]) & kept).any()
        segmentation, segments_info = result["panoptic_seg"]
        segment_labels = {s["category_id"] for s in segments_info}
        assert segment_labels & set(THING_IDS) and segment_labels & set(STUFF_IDS)
        assert segment_labels & seen_classes and segment_labels - seen_classes
        # some kept queries lose the overlap test (the duplicate at least) or own no pixel
        assert len(segments_info) < kept.sum()
        # a stuff segment is the fusion of two queries that each own pixels of it
        masks = fcclip_upsample_masks(outputs.masks_queries_logits[image : image + 1], PADDED_SIZE)[0]
        probs = sem_seg_postprocess(masks, RESHAPED_SIZES[image], *ORIGINAL_SIZES[image]).sigmoid()
        kept_queries = kept.nonzero().flatten()
        winner = kept_queries[(scores[image, kept, None, None] * probs[kept]).argmax(0)]
        fused = []
        for segment in segments_info:
            if not segment["isthing"]:
                inside = segmentation == segment["id"]
                owners = {q for q in kept_queries.tolist() if ((winner == q) & (probs[q] >= 0.5) & inside).any()}
                fused.append(len(owners) >= 2)
        assert any(fused)
        instances = result["instances"]
        assert len(instances["scores"]) > 0 and (instances["scores"] > 0).any()


# ---------------------------------------------------------------------------------------------------------------
# order matters: the semantic parity test can fail


def semantic_sigmoid_before_resize(
    mask_cls: torch.Tensor, mask_logits: torch.Tensor, image_size, output_size
) -> torch.Tensor:
    """The wrong order: FC-CLIP's class-map sum at mask resolution (sigmoid there), then upsample, crop and resize."""
    class_maps = semantic_inference(mask_cls, mask_logits)
    upsampled = fcclip_upsample_masks(class_maps[None], PADDED_SIZE)[0]
    return sem_seg_postprocess(upsampled, image_size, *output_size)


def test_sigmoid_before_resize_changes_the_semantic_map(outputs, reference):
    logits = fcclip_ensemble_logits(
        outputs.class_queries_logits, outputs.clip_class_logits, SEEN_MASK.long(), ALPHA, BETA
    )
    for image, result in enumerate(reference):
        wrong = semantic_sigmoid_before_resize(
            logits[image], outputs.masks_queries_logits[image], RESHAPED_SIZES[image], ORIGINAL_SIZES[image]
        )
        changed = (wrong.argmax(0) != result["sem_seg"].argmax(0)).float().mean().item()
        assert changed > 0.005, f"image {image}: only {changed:.4%} of the pixels depend on the order"


# ---------------------------------------------------------------------------------------------------------------
# parity of ours with the reference


def test_semantic_parity(processor, outputs, reference):
    ours = processor.post_process_semantic_segmentation(outputs, **common_kwargs())
    for image, (class_map, result) in enumerate(zip(ours, reference, strict=True)):
        semseg = result["sem_seg"]
        assert class_map.shape == semseg.shape[-2:] and class_map.dtype == torch.int64
        agree = class_map == semseg.argmax(0)
        agreement = agree.float().mean().item()
        assert agreement >= PIXEL_AGREEMENT, f"image {image}: class maps agree on {agreement:.4%} of the pixels"
        # float rounding may flip an exact tie, nothing else
        top_two = semseg.topk(2, dim=0).values
        largest_gap = (top_two[0] - top_two[1])[~agree].max().item() if not agree.all() else 0.0
        assert largest_gap < SEMANTIC_TIE_GAP, (
            f"image {image}: disagreement where the reference's top-2 gap is {largest_gap:.3g}"
        )


def match_segments(reference_map, reference_ids, our_map, our_ids) -> dict[int, int]:
    """
    Reference segment id -> our segment id, each reference segment matched to the segment of ours it overlaps most;
    asserts one-to-one and IoU >= 0.95 (the pixel sets are the same up to rounding at borders).
    """
    matching = {}
    for reference_id in reference_ids:
        pixels = reference_map == reference_id
        overlapping = Counter(our_map[pixels].tolist())
        our_id, _ = overlapping.most_common(1)[0]
        ours = our_map == our_id
        iou = (pixels & ours).sum().item() / (pixels | ours).sum().item()
        assert our_id in our_ids and iou >= 0.95, (
            f"reference segment {reference_id}: best match {our_id}, IoU {iou:.3f}"
        )
        matching[reference_id] = our_id
    assert len(set(matching.values())) == len(matching) == len(our_ids), f"{matching} vs our ids {sorted(our_ids)}"
    return matching


@pytest.mark.parametrize("dense_assignment", [False, True])  # the CPU path and the sync-free (GPU) path
def test_panoptic_parity(processor, outputs, reference, dense_assignment):
    ours = processor.post_process_panoptic_segmentation(
        outputs,
        dense_assignment=dense_assignment,
        label_ids_to_fuse=list(STUFF_IDS),
        threshold=0.0,
        overlap_mask_area_threshold=0.8,
        mask_threshold=0.5,
        **common_kwargs(),
    )
    for image, (our_result, result) in enumerate(zip(ours, reference, strict=True)):
        reference_map, reference_info = result["panoptic_seg"]
        our_map, our_info = our_result["segmentation"], our_result["segments_info"]
        assert our_map.shape == reference_map.shape and our_map.dtype == torch.int32
        assert sorted(s["id"] for s in our_info) == list(range(1, len(our_info) + 1))
        our_by_id = {s["id"]: s for s in our_info}
        matching = match_segments(reference_map, [s["id"] for s in reference_info], our_map, set(our_by_id))
        for segment in reference_info:
            our_segment = our_by_id[matching[segment["id"]]]
            assert our_segment["label_id"] == segment["category_id"]
            score_error = abs(our_segment["score"] - segment["score"])
            assert score_error <= SCORE_TOLERANCE, (
                f"image {image}: {our_segment} scores {segment['score']:.6f} in FC-CLIP"
            )
            if segment["isthing"]:
                assert not our_segment["was_fused"]
        # fused stuff: one segment per stuff class
        our_stuff_labels = [s["label_id"] for s in our_info if s["label_id"] in STUFF_IDS]
        assert len(our_stuff_labels) == len(set(our_stuff_labels))
        renamed = torch.zeros_like(reference_map)
        for reference_id, our_id in matching.items():
            renamed[reference_map == reference_id] = our_id
        agreement = (renamed == our_map).float().mean().item()
        assert agreement >= PIXEL_AGREEMENT, f"image {image}: segment maps agree on {agreement:.4%} of the pixels"


def test_instance_parity(processor, outputs, reference):
    ours = processor.post_process_instance_segmentation(
        outputs, thing_label_ids=list(THING_IDS), num_top_instances=100, return_binary_maps=True, **common_kwargs()
    )
    for image, (our_result, result) in enumerate(zip(ours, reference, strict=True)):
        instances = result["instances"]
        # FC-CLIP's empty masks score 0 (they cannot change AP): ours drops them
        positive = instances["scores"] > 0
        expected = list(
            zip(
                instances["pred_classes"][positive].tolist(),
                instances["scores"][positive].tolist(),
                instances["pred_masks"][positive].bool(),
                strict=True,
            )
        )
        our_info, our_masks = our_result["segments_info"], our_result["binary_masks"]
        assert len(our_info) == len(our_masks)
        assert [s["score"] for s in our_info] == sorted((s["score"] for s in our_info), reverse=True)
        our_labels, expected_labels = (
            Counter(s["label_id"] for s in our_info),
            Counter(label for label, _, _ in expected),
        )
        assert our_labels == expected_labels, (
            f"image {image}: {len(our_info)} instances, FC-CLIP {len(expected)}; labels only ours: "
            f"{dict(our_labels - expected_labels)}, only FC-CLIP's: {dict(expected_labels - our_labels)}"
        )
        # multiset match of (label, score, mask): each reference instance takes an unused one of ours with its label,
        # a score within tolerance and the most similar mask
        unused = set(range(len(our_info)))
        for label, score, mask in sorted(expected, key=lambda item: -item[1]):
            candidates = [
                i
                for i in unused
                if our_info[i]["label_id"] == label and abs(our_info[i]["score"] - score) <= SCORE_TOLERANCE
            ]
            assert candidates, f"image {image}: no instance of ours with label {label} and score {score:.6f}"
            best = min(candidates, key=lambda i: (our_masks[i] != mask).sum().item())
            differing = (our_masks[best] != mask).float().mean().item()
            assert differing <= 1 - PIXEL_AGREEMENT, f"image {image}: label {label} masks differ on {differing:.4%}"
            unused.remove(best)
        assert not unused
