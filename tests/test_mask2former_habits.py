"""
Mask2Former habits give the right answer (issue 13, item 3).

(a) `post_process_*(outputs, target_sizes=...)` without `reshaped_input_sizes`: the reference is the map computed
    with the `reshaped_input_sizes` the processor's own preprocessing returned (and, for the semantic map, a dense
    computation with `F.interpolate`); before the fix the padding was stretched into the picture.
(b) `processor(images, segmentation_maps=..., instance_id_to_semantic_id=...)`: the reference is transformers'
    `Mask2FormerImageProcessor` on the same maps.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from transformers_possam import PosSAMImageProcessor, PosSAMImageProcessorPil, PosSAMProcessor, clip_tokenizer_from_bpe
from transformers_possam.postprocessing import class_scores


BACKENDS = [PosSAMImageProcessor, PosSAMImageProcessorPil]
# (height, width): portrait (the 451 x 300), landscape, square, very thin both ways, small
IMAGE_SIZES = [(451, 300), (300, 451), (640, 640), (17, 900), (1200, 9), (33, 50)]
SUBTASKS = ["panoptic", "semantic", "instance"]


@pytest.fixture(scope="module")
def possam_processor():
    return PosSAMProcessor(PosSAMImageProcessor(), clip_tokenizer_from_bpe())


def structured_outputs(queries=20, classes=7, seed=0, mask_size=256):
    """Model-like outputs: smooth blob masks over the whole padded input (padding included), random classes."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, queries, 24, 24, generator=generator) * 8
    masks = F.interpolate(coarse, size=(mask_size, mask_size), mode="bilinear", align_corners=False)
    class_logits = torch.randn(1, queries, classes + 1, generator=generator) * 3
    class_logits[..., -1] -= 4  # mostly non-void
    return SimpleNamespace(
        masks_queries_logits=masks,
        class_queries_logits=class_logits,
        clip_class_logits=torch.randn(1, queries, classes, generator=generator),
        iou_scores=torch.rand(1, queries, generator=generator),
    )


def post_process(processor, subtask, outputs, **kwargs):
    method = getattr(processor, f"post_process_{subtask}_segmentation")
    if subtask == "panoptic":
        kwargs.setdefault("overlap_mask_area_threshold", 0.0)  # the random blobs overlap: keep several segments
    (result,) = method(outputs, **kwargs)
    return result if subtask == "semantic" else result["segmentation"]


def preprocessed_reshaped_size(processor, size):
    """`reshaped_input_sizes` of an image of `size`, as the processor's own preprocessing returns it."""
    image = Image.fromarray(np.zeros((*size, 3), np.uint8))
    reshaped = processor(image, return_tensors="pt")["reshaped_input_sizes"]
    return tuple(int(value) for value in reshaped[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", IMAGE_SIZES)
@pytest.mark.parametrize("subtask", SUBTASKS)
def test_target_sizes_alone_equal_the_map_with_the_processors_reshaped_sizes(backend, size, subtask):
    processor = backend()
    outputs = structured_outputs(seed=sum(size))
    reshaped = preprocessed_reshaped_size(processor, size)
    expected = post_process(processor, subtask, outputs, target_sizes=[size], reshaped_input_sizes=[reshaped])
    result = post_process(processor, subtask, outputs, target_sizes=[size])
    assert result.shape == size and len(expected.unique()) > 2
    assert torch.equal(result, expected), f"{(result != expected).float().mean():.1%} of the pixels differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_semantic_map_from_target_sizes_alone_equals_a_dense_computation(backend):
    """
    FC-CLIP's semantic inference written out densely on the issue's 451 x 300 image: mask logits upsampled to the
    padded 1024 x 1024 input, cropped to the resized image the processor reported, resized to the image, sigmoid,
    class-weighted sum, argmax. Ties aside, the labels must agree.
    """
    processor = backend()
    outputs = structured_outputs(seed=1)
    reshaped = preprocessed_reshaped_size(processor, (451, 300))
    masks = F.interpolate(outputs.masks_queries_logits, size=(1024, 1024), mode="bilinear", align_corners=False)
    masks = masks[..., : reshaped[0], : reshaped[1]]
    masks = F.interpolate(masks, size=(451, 300), mode="bilinear", align_corners=False)[0]
    scores, _ = class_scores(outputs)
    class_maps = torch.einsum("qk,qhw->khw", scores[0], masks.sigmoid())
    expected = class_maps.argmax(0)
    labels = post_process(processor, "semantic", outputs, target_sizes=[(451, 300)])
    top2 = class_maps.topk(2, dim=0).values
    differ = labels != expected
    assert differ.float().mean() < 1e-3 and bool(((top2[0] - top2[1])[differ] < 1e-4).all())


def test_pipeline_style_call_without_vocabulary(possam_processor):
    """transformers' image-segmentation pipeline passes only these arguments (no candidate_labels, no reshaped sizes)."""
    outputs = structured_outputs(seed=2)
    for processor in (possam_processor, possam_processor.image_processor):
        (result,) = processor.post_process_panoptic_segmentation(
            outputs,
            threshold=0.1,
            mask_threshold=0.5,
            overlap_mask_area_threshold=0.5,
            label_ids_to_fuse=None,
            target_sizes=[(451, 300)],
        )
        (reference,) = processor.post_process_panoptic_segmentation(
            outputs,
            threshold=0.1,
            mask_threshold=0.5,
            overlap_mask_area_threshold=0.5,
            target_sizes=[(451, 300)],
            reshaped_input_sizes=[preprocessed_reshaped_size(possam_processor.image_processor, (451, 300))],
        )
        assert result["segments_info"] and result["segments_info"] == reference["segments_info"]
        assert torch.equal(result["segmentation"], reference["segmentation"])


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_target_of_another_aspect_ratio_is_read_as_an_image_of_that_size(subtask):
    """A target size is an image size: the crop is the one the processor gives an image of that size."""
    processor = PosSAMImageProcessor()
    outputs = structured_outputs(seed=3)
    target = (100, 1000)  # whatever the picture was, this is what an image of 100 x 1000 would give
    reshaped = preprocessed_reshaped_size(processor, target)
    expected = post_process(processor, subtask, outputs, target_sizes=[target], reshaped_input_sizes=[reshaped])
    assert torch.equal(post_process(processor, subtask, outputs, target_sizes=[target]), expected)


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_processor_without_resize_crops_the_image_size(subtask):
    processor = PosSAMImageProcessor(do_resize=False)
    outputs = structured_outputs(seed=4)
    reshaped = preprocessed_reshaped_size(processor, (300, 451))
    assert reshaped == (300, 451)
    expected = post_process(processor, subtask, outputs, target_sizes=[(300, 451)], reshaped_input_sizes=[reshaped])
    assert torch.equal(post_process(processor, subtask, outputs, target_sizes=[(300, 451)]), expected)
    # an image larger than the padding cannot have been preprocessed without resizing: no guess
    with pytest.raises(ValueError, match=r"target_sizes\[0\] = \(1100, 451\).*does not fit its pad_size"):
        post_process(processor, subtask, outputs, target_sizes=[(1100, 451)])


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_processor_without_padding_crops_nothing(subtask):
    """do_pad=False: the model's input is the resized image itself (square here, as the model needs): no crop."""
    processor = PosSAMImageProcessor(do_pad=False)
    image = Image.fromarray(np.zeros((500, 500, 3), np.uint8))
    inputs = processor(image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape[-2:]) == (1024, 1024)
    outputs = structured_outputs(seed=5)
    reshaped = [tuple(int(v) for v in inputs["reshaped_input_sizes"][0])]
    expected = post_process(processor, subtask, outputs, target_sizes=[(500, 500)], reshaped_input_sizes=reshaped)
    plain = post_process(PosSAMImageProcessor(), subtask, outputs, target_sizes=[(500, 500)])
    assert torch.equal(post_process(processor, subtask, outputs, target_sizes=[(500, 500)]), expected)
    assert torch.equal(expected, plain)  # a square image fills the padded input: nothing to crop either way


@pytest.mark.parametrize("subtask", SUBTASKS)
def test_size_without_longest_edge_cannot_derive_the_crop(subtask):
    processor = PosSAMImageProcessor()
    processor.size = {"height": 1024, "width": 1024}  # not SAM's rule: the resized size cannot be known
    outputs = structured_outputs(seed=6)
    with pytest.raises(ValueError, match=r"has no longest_edge.*pass reshaped_input_sizes"):
        post_process(processor, subtask, outputs, target_sizes=[(451, 300)])
    # with the sizes the processor returned, nothing needs deriving
    post_process(processor, subtask, outputs, target_sizes=[(451, 300)], reshaped_input_sizes=[(1024, 681)])


@pytest.mark.parametrize(
    "target_sizes,error,match",
    [
        ((451, 300), TypeError, r"target_sizes\[0\] must be a \(height, width\) pair, got int 451"),
        ([("451", 300)], TypeError, r"target_sizes\[0\] must hold two ints"),
        ([(451.5, 300)], ValueError, r"target_sizes\[0\] must hold whole numbers"),
        ([(0, 300)], ValueError, r"target_sizes\[0\] must hold sizes of at least 1 pixel"),
        ("451x300", TypeError, r"target_sizes must be a list"),
    ],
)
def test_bad_target_sizes_without_reshaped_sizes(target_sizes, error, match):
    with pytest.raises(error, match=match):
        PosSAMImageProcessor().post_process_panoptic_segmentation(structured_outputs(), target_sizes=target_sizes)
