"""
The open-vocabulary segmentation pipeline, checked two ways:

- against a controlled model (the tiny model with its `forward` replaced by outputs whose segmentation is known from
  geometry alone: vertical stripes, one query each), so labels, masks, fusing, thresholds and sizes have exact
  expected values that come from no code of ours;
- with the real tiny model, against the same steps run by hand (processor -> model -> the processor's
  post-processing), so the pipeline's glue (cached text embeddings, seen mask, sizes, stuff ids) changes nothing.
"""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamImageProcessor, pipeline

from transformers_possam import (
    OpenVocabularyPanopticSegmentationPipeline,
    PosSAMForPanopticSegmentation,
    PosSAMModel,
    PosSAMProcessor,
)

from .conftest import save_tiny_checkpoint


# "lighthouse" is no COCO class: unseen by the tiny model (trained on COCO's vocabulary), so MASE weighs it apart.
LABELS = [
    ["person", "people"],  # synonyms as a list (issue 13: a comma inside a str label now warns)
    "car",
    {"name": "sky", "synonyms": ["clouds"], "isthing": False},
    {"name": "road", "isthing": False},
    "lighthouse",
]
# Display names, read off LABELS by hand: the first synonym of each label.
NAMES = ["person", "car", "sky", "road", "lighthouse"]
IS_THING = [True, True, False, False, True]
# Controlled model: query q covers the q-th of 8 equal vertical stripes of the (padded, square) model input and is
# confidently class STRIPE_CLASSES[q]. Adjacent things stay separate segments; adjacent stuff queries are fused.
STRIPE_CLASSES = [0, 0, 1, 1, 2, 2, 3, 3]
STRIPES = len(STRIPE_CLASSES)
MASK_LOGIT = 12.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """
    The random tiny model, with its void embedding pointed away from its LDP embeddings: at random initialization the
    learned void class wins every query (every mask would be dropped and the comparisons below would be vacuous).
    """
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("possam-tiny"))
    processor = PosSAMProcessor.from_pretrained(path)
    model = PosSAMForPanopticSegmentation.from_pretrained(path).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image(), candidate_labels=LABELS, return_tensors="pt"))
        model.classifier.void_embedding.weight.copy_(-outputs.ldp_embeddings.mean((0, 1))[None])
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return pipeline("open-vocabulary-panoptic-segmentation", model=str(checkpoint))


def image(height=60, width=90, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------------
# Controlled model


def stripe_outputs(pixel_values, class_embeddings, stripe_classes=STRIPE_CLASSES):
    """Model outputs for a batch: query q -> stripe q (mask logits +-MASK_LOGIT at 1/4 resolution), class
    `stripe_classes[q]` in both the LDP and the CLIP logits (other classes and void far below), predicted IoU 1."""
    batch_size, _, height, width = pixel_values.shape
    num_classes = class_embeddings.shape[0]
    mask_height, mask_width = height // 4, width // 4
    stripe = torch.arange(mask_width) * STRIPES // mask_width  # stripe of each mask column
    masks = torch.where(stripe[None, :] == torch.arange(STRIPES)[:, None], MASK_LOGIT, -MASK_LOGIT)
    masks = masks[:, None, :].expand(STRIPES, mask_height, mask_width)
    class_logits = torch.full((STRIPES, num_classes + 1), -10.0)
    class_logits[torch.arange(STRIPES), torch.tensor(stripe_classes)] = 10.0
    return SimpleNamespace(
        class_queries_logits=class_logits.expand(batch_size, -1, -1).clone(),
        clip_class_logits=class_logits[:, :num_classes].expand(batch_size, -1, -1).clone(),
        masks_queries_logits=masks.expand(batch_size, -1, -1, -1).clone(),
        iou_scores=torch.ones(batch_size, STRIPES),
    )


@pytest.fixture(scope="module")
def controlled(checkpoint):
    """A pipeline whose model returns `stripe_outputs`; records the inputs it is given."""
    segmenter = pipeline("open-vocabulary-panoptic-segmentation", model=str(checkpoint))
    segmenter.forward_inputs = []

    def forward(pixel_values, pixel_mask, class_embeddings, synonym_mask, **kwargs):
        segmenter.forward_inputs.append({"pixel_values": pixel_values, "pixel_mask": pixel_mask})
        stripe_classes = segmenter.stripe_classes
        return stripe_outputs(pixel_values, class_embeddings, stripe_classes)

    segmenter.stripe_classes = STRIPE_CLASSES
    segmenter.model.forward = forward
    return segmenter


def stripe_of_columns(width):
    """Stripe of each column of an image `width` wide (wider than tall): the stripes split the model input's width
    evenly, and the image fills that width, so column c's centre (c + 0.5) / width decides."""
    return (np.arange(width) + 0.5) * STRIPES / width


def expected_segments(size, stripe_classes=STRIPE_CLASSES, fuse=True, things_only=False, by_class=False):
    """`{(label, mask bytes)}` expected for an image of `size` (width, height), width >= height, width a multiple of 8.
    Panoptic: one segment per thing query, one per stuff class (fused); semantic (`by_class`): one per class."""
    width, height = size
    stripe = np.floor(stripe_of_columns(width)).astype(int)
    groups = {}
    for query, label in enumerate(stripe_classes):
        if things_only and not IS_THING[label]:
            continue
        key = label if by_class or (fuse and not IS_THING[label]) else ("query", query)
        groups.setdefault(key, (label, np.zeros(width, bool)))[1][stripe == query] = True
    return sorted(
        (NAMES[label], np.broadcast_to(columns, (height, width)).tobytes()) for label, columns in groups.values()
    )


def segments(results, size):
    """The pipeline's segments as sorted `(label, mask bytes)`, after checking each one's form."""
    assert isinstance(results, list) and results, "the controlled model always yields segments"
    found = []
    for segment in results:
        assert set(segment) == {"score", "label", "mask"}
        assert segment["mask"].mode == "L" and segment["mask"].size == size
        mask = np.asarray(segment["mask"])
        assert set(np.unique(mask)) <= {0, 255}
        found.append((segment["label"], (mask == 255).tobytes()))
    return sorted(found)


@pytest.mark.parametrize("subtask", ["panoptic", "semantic", "instance"])
def test_pipeline_segments_equal_the_controlled_models_stripes(controlled, subtask):
    size = (128, 96)  # the longest edge equals the model input's: no resizing, stripes 16 pixels wide
    results = controlled(image(96, 128), candidate_labels=LABELS, subtask=subtask, threshold=0.5)
    expected = expected_segments(
        size, fuse=subtask == "panoptic", things_only=subtask == "instance", by_class=subtask == "semantic"
    )
    assert segments(results, size) == expected
    assert len(results) == {"panoptic": 6, "semantic": 4, "instance": 4}[subtask]
    if subtask == "semantic":
        assert all(segment["score"] is None for segment in results)
    else:
        # confident class (softmax of +10 against -10 everywhere else) and mask (sigmoid(12) inside)
        assert all(0.99 < segment["score"] <= 1 for segment in results)


def test_pipeline_thresholds_reach_post_processing(controlled):
    # instance scores of the unconfident (query, class) pairs are near 0: with threshold 0 they are listed too
    everything = controlled(image(96, 128), candidate_labels=LABELS, subtask="instance", threshold=0.0)
    assert len(everything) > 4
    assert {segment["label"] for segment in everything} == {"person", "car", "lighthouse"}  # only things
    # a threshold above every score leaves nothing
    assert controlled(image(96, 128), candidate_labels=LABELS, subtask="instance", threshold=1.0) == []
    assert controlled(image(96, 128), candidate_labels=LABELS, threshold=1.0) == []
    # mask_threshold reaches the instance post-processor too (the masks' sigmoid(12) < 1: no pixel reaches 1.0)
    assert controlled(image(96, 128), candidate_labels=LABELS, subtask="instance", mask_threshold=1.0) == []
    assert controlled(image(96, 128), candidate_labels=LABELS, subtask="instance", mask_threshold=0.99)


def test_pipeline_thresholds_without_effect_are_said_to_have_none(controlled, caplog):
    """
    Semantic maps have no segments to threshold, instances no contested pixels: such arguments are not dropped
    silently, a warning names them (and the result is the one without them).
    """
    plain = controlled(image(96, 128), candidate_labels=LABELS, subtask="semantic")
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings: this test needs its own
    with caplog.at_level("WARNING"):
        thresholded = controlled(image(96, 128), candidate_labels=LABELS, subtask="semantic", threshold=0.5)
        controlled(image(96, 128), candidate_labels=LABELS, subtask="instance", overlap_mask_area_threshold=0.5)
    assert "threshold: no effect on semantic segmentation" in caplog.text
    assert "overlap_mask_area_threshold has no effect on instance segmentation" in caplog.text
    assert segments(thresholded, (128, 96)) == segments(plain, (128, 96))


@pytest.mark.parametrize(
    ("picture", "size"),
    [
        (Image.new("L", (40, 30)), (40, 30)),
        (Image.new("RGBA", (40, 30)), (40, 30)),
        (Image.new("RGB", (8, 5)), (8, 5)),  # each stripe one pixel wide
        (Image.new("RGB", (2000, 40)), (2000, 40)),
        (np.zeros((30, 40, 3), np.uint8), (40, 30)),
    ],
    ids=["L", "RGBA", "8x5", "2000x40", "numpy"],
)
def test_pipeline_image_kinds(controlled, picture, size):
    controlled.forward_inputs.clear()
    results = controlled(picture, candidate_labels=LABELS)
    assert segments(results, size) == expected_segments(size)
    # what reached the model: one RGB image resized to the 128-pixel longest edge, padded at the bottom
    (inputs,) = controlled.forward_inputs
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 128, 128)
    valid_rows = round(size[1] * 128 / size[0])
    assert inputs["pixel_mask"][0, :, 0].tolist() == [1] * valid_rows + [0] * (128 - valid_rows)


def test_pipeline_presets(controlled):
    # ADE20K-150 ids (its objectInfo150 order, 0-based): wall 0, sky 2, person 12, car 20; wall and sky are stuff
    controlled.stripe_classes = [12, 12, 20, 20, 2, 2, 0, 0]
    try:
        results = controlled(image(96, 128), candidate_labels="ade20k")
    finally:
        controlled.stripe_classes = STRIPE_CLASSES
    assert sorted(segment["label"] for segment in results) == ["car", "car", "person", "person", "sky", "wall"]


def test_pipeline_batch_equals_single_images(controlled, tmp_path):
    path = tmp_path / "img.png"
    image(40, 48, seed=1).save(path)  # 48 wide, 40 high: stripes 6 pixels wide
    calls = controlled.text_encoding_calls
    batch = controlled([image(96, 128), str(path)], candidate_labels=LABELS, batch_size=2)
    assert [segments(result, size) for result, size in zip(batch, [(128, 96), (48, 40)])] == [
        expected_segments((128, 96)),
        expected_segments((48, 40)),
    ]
    assert controlled.text_encoding_calls == calls  # same vocabulary as before: the text tower is not run again


# ---------------------------------------------------------------------------------------------------------------------
# Real tiny model against the same steps run by hand


def by_hand(checkpoint, picture, subtask, threshold=0.0):
    """`[(label, score, mask)]` from the processor, the model and the processor's post-processing, called directly."""
    processor = PosSAMProcessor.from_pretrained(checkpoint)
    model = PosSAMForPanopticSegmentation.from_pretrained(checkpoint).eval()
    inputs = processor(images=picture, candidate_labels=LABELS, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, return_clip_logits=True)
    options = {
        "target_sizes": inputs["original_sizes"].tolist(),
        "reshaped_input_sizes": inputs["reshaped_input_sizes"].tolist(),
        "candidate_labels": LABELS,
        "training_vocabulary": model.config.training_vocabulary,
    }
    if subtask == "semantic":
        (class_map,) = processor.post_process_semantic_segmentation(outputs, **options)
        return [(NAMES[label], None, (class_map == label).numpy()) for label in torch.unique(class_map).tolist()]
    if subtask == "instance":
        (result,) = processor.post_process_instance_segmentation(
            outputs, threshold=threshold, return_binary_maps=True, **options
        )
        return [
            (NAMES[info["label_id"]], info["score"], mask.numpy())
            for info, mask in zip(result["segments_info"], result["binary_masks"])
        ]
    (result,) = processor.post_process_panoptic_segmentation(outputs, threshold=threshold, **options)
    return [
        (NAMES[info["label_id"]], info["score"], (result["segmentation"] == info["id"]).numpy())
        for info in result["segments_info"]
    ]


def assert_same_segments(results, reference):
    assert reference, "the reference yields segments, so the comparison is not vacuous"
    assert [segment["label"] for segment in results] == [label for label, _, _ in reference]
    for segment, (_, score, mask) in zip(results, reference):
        assert segment["score"] == pytest.approx(score, abs=1e-5) if score is not None else segment["score"] is None
        np.testing.assert_array_equal(np.asarray(segment["mask"]) == 255, mask)


@pytest.mark.parametrize("subtask", ["panoptic", "semantic", "instance"])
def test_pipeline_equals_processor_model_and_post_processing(segmenter, checkpoint, subtask):
    picture = image()
    results = segmenter(picture, candidate_labels=LABELS, subtask=subtask)
    assert_same_segments(results, by_hand(checkpoint, picture, subtask))
    masks = np.stack([np.asarray(segment["mask"]) == 255 for segment in results])
    if subtask != "instance":  # panoptic and semantic segments never overlap; semantic ones cover every pixel
        assert masks.sum(0).max() == 1
    if subtask == "semantic":
        assert masks.sum(0).min() == 1


def test_pipeline_class_embeddings_are_the_callers_to_modify(segmenter):
    """`class_embeddings(vocabulary)` returns copies of the pipeline's cached vocabulary: a caller who modifies them in
    place (here: flips every embedding) changes nothing the pipeline uses next, and the cache is not run again."""
    from transformers_possam.vocabularies import resolve_vocabulary

    picture = image()
    before = segmenter(picture, candidate_labels=LABELS, subtask="semantic")
    calls = segmenter.text_encoding_calls
    embeddings, synonym_mask, seen = segmenter.class_embeddings(resolve_vocabulary(LABELS))
    embeddings.mul_(-1)
    synonym_mask.zero_()
    seen.logical_not_()
    after = segmenter(picture, candidate_labels=LABELS, subtask="semantic")
    assert before and [(s["label"], s["score"]) for s in after] == [(s["label"], s["score"]) for s in before]
    assert all(np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"])) for a, b in zip(after, before))
    assert segmenter.text_encoding_calls == calls
    again = segmenter.class_embeddings(resolve_vocabulary(LABELS))
    assert torch.equal(again[0], -embeddings) and again[1].any()


def test_pipeline_bad_inputs(segmenter, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        segmenter(image(), candidate_labels=[])
    with pytest.raises(ValueError, match="blank"):
        segmenter(image(), candidate_labels=["cat", " "])
    with pytest.raises(ValueError, match="Duplicate"):
        segmenter(image(), candidate_labels=["cat", "cat"])
    with pytest.raises(ValueError, match="subtask"):
        segmenter(image(), candidate_labels=["cat"], subtask="depth")
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="missing.png"):
        segmenter(missing, candidate_labels=["cat"])
    # issue 13: a dict is an input {"image", "candidate_labels"} (transformers' zero-shot form), so another dict is
    # refused for its keys (it was "Cannot segment a dict")
    with pytest.raises(ValueError, match=r"images is a dict with the keys \['x'\].*\{'image': image"):
        segmenter({"x": 1}, candidate_labels=["cat"])
    with pytest.raises(ValueError, match="candidate_labels is required"):
        segmenter(image())


def test_pipeline_needs_possams_model_and_image_processor(segmenter):
    # PosSAMModel has no classification head, SAM's image processor no PosSAM post-processing: refused when the
    # pipeline is built, not at the first image
    with pytest.raises(TypeError, match="needs a PosSAMForPanopticSegmentation, got a PosSAMModel"):
        OpenVocabularyPanopticSegmentationPipeline(
            model=PosSAMModel(segmenter.model.config),
            image_processor=segmenter.image_processor,
            tokenizer=segmenter.tokenizer,
        )
    with pytest.raises(
        TypeError, match=r"needs a PosSAMImageProcessor \(or PosSAMImageProcessorPil\), got SamImageProcessor"
    ):
        OpenVocabularyPanopticSegmentationPipeline(
            model=segmenter.model, image_processor=SamImageProcessor(), tokenizer=segmenter.tokenizer
        )
