"""
Mask2Former habits give the right answer (issue 13, item 3).

(a) `post_process_*(outputs, target_sizes=...)` without `reshaped_input_sizes`: the reference is the map computed
    with the `reshaped_input_sizes` the processor's own preprocessing returned (and, for the semantic map, a dense
    computation with `F.interpolate`); before the fix the padding was stretched into the picture.
(b) `processor(images, segmentation_maps=..., instance_id_to_semantic_id=...)`: the reference is transformers'
    `Mask2FormerImageProcessor` on the same maps.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from transformers import Mask2FormerImageProcessor
from transformers.image_transforms import rgb_to_id
from transformers.models.mask2former.image_processing_pil_mask2former import Mask2FormerImageProcessorPil

from transformers_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMImageProcessor,
    PosSAMImageProcessorPil,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
)
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


# ---------------------------------------------------------------------------------------------------------------
# (b) processor(images, segmentation_maps=..., instance_id_to_semantic_id=...) as Mask2Former's image processor

COCO_SAMPLE = Path("/work/shared/data/coco-panoptic-sample")
MASK2FORMER_BACKENDS = [Mask2FormerImageProcessor, Mask2FormerImageProcessorPil]


def coco_maps(index):
    """
    A real COCO panoptic sample as Mask2Former-style maps: the image, an instance map (0 = unlabeled, instances
    1..N), its `{instance: class}` (contiguous COCO-133 indices), and a semantic map (class index, 255 = unlabeled).
    """
    if not COCO_SAMPLE.is_dir():
        pytest.skip("the COCO panoptic sample is not on this machine")
    data = json.loads((COCO_SAMPLE / "panoptic_examples.json").read_text())
    categories = json.loads((COCO_SAMPLE / "panoptic_coco_categories.json").read_text())
    class_of = {category["id"]: position for position, category in enumerate(categories)}
    annotation = data["annotations"][index]
    image = Image.open(COCO_SAMPLE / "input_images" / annotation["file_name"].replace(".png", ".jpg")).convert("RGB")
    png = np.asarray(Image.open(COCO_SAMPLE / "panoptic_examples" / annotation["file_name"]))
    segment_ids = rgb_to_id(png.astype(np.int64))
    instances = np.zeros(segment_ids.shape, np.int64)
    semantic = np.full(segment_ids.shape, 255, np.int64)
    mapping = {}
    for number, segment in enumerate(annotation["segments_info"], start=1):
        instances[segment_ids == segment["id"]] = number
        semantic[segment_ids == segment["id"]] = class_of[segment["category_id"]]
        mapping[number] = class_of[segment["category_id"]]
    assert len(mapping) > 10 and len(np.unique(semantic)) > 3
    return image, instances, mapping, semantic


def label_cases(instances, mapping, semantic):
    """(name, map, instance_id_to_semantic_id, processor kwargs) in each of Mask2Former's label conventions."""
    reduced_semantic = np.where(semantic == 255, 0, semantic + 1)  # ADE20k style: 0 = "other", classes from 1
    return [
        ("instance map", instances, mapping, {"ignore_index": 0}),
        ("semantic map", semantic, None, {"ignore_index": 255}),
        ("semantic map, reduce labels", reduced_semantic, None, {"ignore_index": 255, "do_reduce_labels": True}),
        (
            "instance map, reduce labels",
            instances,
            {key: value + 1 for key, value in mapping.items()},
            {"ignore_index": 255, "do_reduce_labels": True},
        ),
        ("semantic map, nothing ignored", semantic, None, {"ignore_index": None}),
    ]


def assert_same_labels_as_mask2former(ours, reference, reshaped):
    """Same classes in the same order; masks equal on the image, ours empty on the padding."""
    height, width = reshaped
    for masks, classes, reference_masks, reference_classes in zip(
        ours["mask_labels"], ours["class_labels"], reference["mask_labels"], reference["class_labels"]
    ):
        # the PIL backend gives numpy arrays, the torchvision one tensors
        reference_masks, reference_classes = torch.as_tensor(reference_masks), torch.as_tensor(reference_classes)
        assert torch.equal(classes, reference_classes.long()), (classes, reference_classes)
        assert masks.shape == reference_masks.shape and len(classes) > 1
        # Mask2Former fills its masks' padding with ignore_index: compare the image region, where both are 0 / 1
        assert torch.equal(masks[:, :height, :width], reference_masks[:, :height, :width].to(masks.dtype))
        assert not masks[:, height:].any() and not masks[:, :, width:].any()


def mask2former_on_our_resize(backend, reshaped, image, segmentation_map, mapping, kwargs):
    """Mask2Former's labels with its resize set to our resized size and its padding to our padded size."""
    processor = backend(
        size={"height": reshaped[0], "width": reshaped[1]},
        size_divisor=0,
        pad_size={"height": 1024, "width": 1024},
        do_reduce_labels=kwargs.get("do_reduce_labels", False),
        ignore_index=kwargs.get("ignore_index"),
    )
    # the PIL backend resizes maps through PIL images, which hold at most 32-bit ids
    return processor(image, segmentation_maps=segmentation_map.astype(np.int32), instance_id_to_semantic_id=mapping)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reference_backend", MASK2FORMER_BACKENDS)
@pytest.mark.parametrize("sample", [0, 1])
def test_coco_panoptic_sample_labels_equal_mask2formers(backend, reference_backend, sample):
    image, instances, mapping, semantic = coco_maps(sample)
    processor = backend()
    for name, segmentation_map, id_mapping, kwargs in label_cases(instances, mapping, semantic):
        if reference_backend is Mask2FormerImageProcessorPil and kwargs["ignore_index"] is None:
            continue  # transformers' PIL Mask2Former pads maps with np.pad(constant_values=None), which fails
        ours = processor(image, segmentation_maps=segmentation_map, instance_id_to_semantic_id=id_mapping, **kwargs)
        reshaped = tuple(int(value) for value in ours["reshaped_input_sizes"][0])
        reference = mask2former_on_our_resize(reference_backend, reshaped, image, segmentation_map, id_mapping, kwargs)
        assert_same_labels_as_mask2former(ours, reference, reshaped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_labels_at_original_resolution_equal_mask2formers(backend):
    """Without resizing (the 640 x 480 image fits the padding), the (class, mask) pairs are Mask2Former's own."""
    image, instances, mapping, semantic = coco_maps(0)
    for name, segmentation_map, id_mapping, kwargs in label_cases(instances, mapping, semantic):
        ours = backend(do_resize=False)(
            image, segmentation_maps=segmentation_map, instance_id_to_semantic_id=id_mapping, **kwargs
        )
        reference = Mask2FormerImageProcessor(do_resize=False, **kwargs)(
            image, segmentation_maps=segmentation_map, instance_id_to_semantic_id=id_mapping
        )
        height, width = semantic.shape
        pairs = {
            (int(label), mask[:height, :width].numpy().tobytes())
            for mask, label in zip(ours["mask_labels"][0], ours["class_labels"][0])
        }
        reference_pairs = {
            (int(label), mask.to(torch.uint8).numpy().tobytes())
            for mask, label in zip(reference["mask_labels"][0], reference["class_labels"][0])
        }
        assert pairs == reference_pairs and len(pairs) > 3, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(451, 300), (37, 53), (5, 700), (640, 640)])
def test_synthetic_maps_equal_mask2formers(backend, size):
    """Random blocky maps (ids 0..6 and some 255) on several aspect ratios, semantic and instance readings, a batch."""
    generator = np.random.default_rng(sum(size))
    images, maps = [], []
    for offset in range(2):
        coarse = generator.integers(0, 7, (4, 5))
        coarse[0, 0] = 255
        rows = np.minimum(np.arange(size[0]) * 4 // size[0], 3)
        cols = np.minimum(np.arange(size[1]) * 5 // size[1], 4)
        blocks = coarse[rows[:, None], cols[None, :]]
        maps.append(np.where(blocks == 255, 255, blocks + offset))
        images.append(Image.fromarray(np.full((*size, 3), 100 + offset, np.uint8)))
    instance_mappings = [{value: value % 3 for value in range(10)}, {value: value % 4 for value in range(10)}]
    for mapping in (None, instance_mappings):
        kwargs = {"ignore_index": 255}
        ours = backend()(images, segmentation_maps=maps, instance_id_to_semantic_id=mapping, **kwargs)
        for index, segmentation_map in enumerate(maps):
            reshaped = tuple(int(value) for value in ours["reshaped_input_sizes"][index])
            reference = mask2former_on_our_resize(
                Mask2FormerImageProcessor,
                reshaped,
                images[index],
                segmentation_map,
                mapping and mapping[index],
                kwargs,
            )
            one = {name: [ours[name][index]] for name in ("mask_labels", "class_labels")}
            assert_same_labels_as_mask2former(one, reference, reshaped)


def test_model_trains_on_segmentation_maps(config):
    """processor(images, segmentation_maps=..., instance_id_to_semantic_id=...) -> model(**inputs): finite loss, grads."""
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config).train()
    processor = PosSAMProcessor(
        PosSAMImageProcessor(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128}),
        clip_tokenizer_from_bpe(),
    )
    image, instances, mapping, _ = coco_maps(0)
    mapping = {key: value % 3 for key, value in mapping.items()}  # a 3-class vocabulary
    inputs = processor(
        images=[image, image],
        candidate_labels=["person", "table", "wall"],
        segmentation_maps=[instances, instances],
        instance_id_to_semantic_id=mapping,
        ignore_index=0,
        return_tensors="pt",
    )
    assert inputs["mask_labels"][0].shape[-2:] == (128, 128) and len(inputs["class_labels"][0]) > 3
    outputs = model(**inputs)
    assert torch.isfinite(outputs.loss)
    outputs.loss.backward()
    grads = [parameter.grad for parameter in model.parameters() if parameter.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)
    assert any(grad.abs().sum() > 0 for grad in grads)


def test_annotations_path_still_gives_the_coco_segments():
    """The COCO panoptic `annotations=` path is unchanged: the same (class, mask) pairs as the equivalent maps."""
    image, instances, mapping, _ = coco_maps(1)
    data = json.loads((COCO_SAMPLE / "panoptic_examples.json").read_text())
    annotation = data["annotations"][1]
    categories = json.loads((COCO_SAMPLE / "panoptic_coco_categories.json").read_text())
    label_map = {category["id"]: position for position, category in enumerate(categories)}
    png = Image.open(COCO_SAMPLE / "panoptic_examples" / annotation["file_name"])
    processor = PosSAMImageProcessor()
    from_annotations = processor(
        image,
        annotations={"panoptic_map": png, "segments_info": annotation["segments_info"]},
        label_map=label_map,
    )
    crowd = {
        number for number, segment in enumerate(annotation["segments_info"], start=1) if segment.get("iscrowd", 0)
    }
    without_crowd = np.where(np.isin(instances, list(crowd)), 0, instances)  # the annotations path skips crowd
    from_maps = processor(image, segmentation_maps=without_crowd, instance_id_to_semantic_id=mapping, ignore_index=0)

    def pairs(output):
        return {
            (int(label), mask.numpy().tobytes())
            for mask, label in zip(output["mask_labels"][0], output["class_labels"][0])
        }

    assert pairs(from_annotations) == pairs(from_maps) and len(pairs(from_maps)) > 10


IMAGE = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
GOOD_MAP = np.ones((30, 40), np.int64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"segmentation_maps": np.ones((30, 41), np.int64)},
            r"segmentation_maps\[0\] has size \(30, 41\) but image 0 is \(30, 40\)",
        ),
        (
            {"segmentation_maps": GOOD_MAP * 3, "instance_id_to_semantic_id": {1: 0}},
            r"segmentation_maps\[0\] holds instance ids \[3\] that instance_id_to_semantic_id does not map",
        ),
        ({"segmentation_maps": -GOOD_MAP}, r"segmentation_maps\[0\] holds the negative id -1"),
        ({"segmentation_maps": GOOD_MAP.astype(np.float32)}, r"segmentation_maps\[0\] has dtype float32: .* integer"),
        ({"segmentation_maps": torch.ones(30, 40) / 255}, r"segmentation_maps\[0\] has dtype float32"),
        ({"segmentation_maps": np.ones((30, 40, 3), np.uint8)}, r"has shape \(30, 40, 3\): a segmentation map is 2-D"),
        ({"segmentation_maps": "map.png"}, r"segmentation_maps\[0\] is a str"),
        ({"segmentation_maps": [GOOD_MAP, GOOD_MAP]}, "Got 2 segmentation maps for 1 images"),
        (
            {"segmentation_maps": GOOD_MAP, "instance_id_to_semantic_id": [{1: 0}, {1: 0}]},
            "list of 2 dicts for 1 images",
        ),
        ({"segmentation_maps": GOOD_MAP, "instance_id_to_semantic_id": {"1": 0}}, "each instance id must be an int"),
        ({"segmentation_maps": GOOD_MAP, "instance_id_to_semantic_id": {1: -2}}, "class ids are >= 0"),
        ({"instance_id_to_semantic_id": {1: 0}}, "instance_id_to_semantic_id was given without segmentation_maps"),
        (
            {"segmentation_maps": GOOD_MAP, "annotations": np.ones((30, 40, 2), np.int64)},
            "Give annotations .* or segmentation_maps .*, not both",
        ),
        ({"segmentation_maps": GOOD_MAP, "do_reduce_labels": True, "ignore_index": None}, "needs an ignore_index"),
        ({"segmentation_maps": GOOD_MAP, "ignore_index": "255"}, "ignore_index must be an int"),
        (
            {"annotations": GOOD_MAP},
            "a 2-D map of class or instance ids is a segmentation map: pass it as segmentation_maps=",
        ),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_segmentation_maps_raise_naming_the_problem(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        backend()(IMAGE, **kwargs)


def test_processor_routes_segmentation_maps_and_refuses_them_without_images(possam_processor):
    out = possam_processor(IMAGE, segmentation_maps=GOOD_MAP * 2, ignore_index=255, do_reduce_labels=True)
    assert out["class_labels"][0].tolist() == [1]  # value 2, reduced by one, as Mask2Former
    with pytest.raises(ValueError, match="segmentation_maps were given without images"):
        possam_processor(candidate_labels=["cat"], segmentation_maps=GOOD_MAP)


def test_maps_as_pil_images_and_tensors_are_the_same_ids():
    expected = PosSAMImageProcessor()(IMAGE, segmentation_maps=GOOD_MAP * 4)
    for segmentation_map in (Image.fromarray((GOOD_MAP * 4).astype(np.uint8)), torch.full((1, 30, 40), 4)):
        out = PosSAMImageProcessor()(IMAGE, segmentation_maps=segmentation_map)
        assert torch.equal(out["class_labels"][0], expected["class_labels"][0])
        assert torch.equal(out["mask_labels"][0], expected["mask_labels"][0])
