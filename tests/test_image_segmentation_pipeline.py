"""
transformers' standard `pipeline("image-segmentation")` (what the cards' `pipeline_tag` and the Hub widget use)
segments with the checkpoint's default vocabulary, `config.training_vocabulary` exposed as `id2label` (issue 13,
item 2); `pipeline("open-vocabulary-panoptic-segmentation")` without a model says that no default checkpoint exists.
"""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageSegmentation, pipeline
from transformers.pipelines import ImageSegmentationPipeline

from transformers_possam import (
    PosSAMConfig,
    PosSAMForPanopticSegmentation,
    PosSAMProcessor,
    Vocabulary,
    tiny_config,
)

from .conftest import save_tiny_checkpoint


COCO_TSV = (
    Path(__file__).resolve().parents[1] / "src" / "transformers_possam" / "vocabularies" / "coco_panoptic_133.tsv"
)


def image(seed: int, height: int, width: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "possam-tiny", default_vocabulary=True)


def test_default_id2label_is_coco_133():
    """The COCO panoptic categories in id order (read from the tsv file, not through the package's loader)."""
    with COCO_TSV.open(encoding="utf-8") as file:
        rows = sorted(csv.DictReader(file, delimiter="\t"), key=lambda row: int(row["id"]))
    first_names = {index: row["names"].split(",")[0].strip() for index, row in enumerate(rows)}
    config = PosSAMConfig()
    assert len(config.id2label) == 133
    assert config.id2label == first_names
    assert config.label2id == {name: index for index, name in first_names.items()}
    assert config.id2label[0] == "person"


def test_id2label_follows_training_vocabulary_and_must_agree():
    config = tiny_config(training_vocabulary=["cat,kitty", "grass"])
    assert config.id2label == {0: "cat", 1: "grass"}
    assert tiny_config(id2label={0: "cat", 1: "dog"}).training_vocabulary == ["cat", "dog"]
    assert PosSAMConfig.from_dict(config.to_dict()).id2label == config.id2label
    with pytest.raises(ValueError, match="id2label must name the classes of training_vocabulary"):
        tiny_config(training_vocabulary=["cat", "grass"], id2label={0: "dog", 1: "grass"})


def test_forward_without_vocabulary_needs_the_default_vocabulary():
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    pixels = torch.randn(1, 3, 128, 128)
    with pytest.raises(ValueError, match="set_default_vocabulary"):
        model(pixel_values=pixels)


def test_default_vocabulary_equals_the_explicit_one(checkpoint):
    """forward with no vocabulary = forward with the tokenized training vocabulary."""
    model = PosSAMForPanopticSegmentation.from_pretrained(checkpoint).eval()
    processor = PosSAMProcessor.from_pretrained(checkpoint)
    names = tuple(model.config.training_vocabulary)
    tokens = processor.encode_vocabulary(Vocabulary(names=names, is_thing=(True,) * len(names)))
    pixels = processor(images=image(0, 128, 128), return_tensors="pt")
    with torch.no_grad():
        default = model(pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"])
        explicit = model(pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"], **tokens)
    torch.testing.assert_close(default.class_queries_logits, explicit.class_queries_logits)
    torch.testing.assert_close(default.clip_class_logits, explicit.clip_class_logits)


def run_by_hand(checkpoint: Path, picture: Image.Image):
    """The model run by hand with its training vocabulary given explicitly: (outputs, processor, inputs, names)."""
    model = PosSAMForPanopticSegmentation.from_pretrained(checkpoint).eval()
    processor = PosSAMProcessor.from_pretrained(checkpoint)
    names = tuple(model.config.training_vocabulary)
    tokens = processor.encode_vocabulary(Vocabulary(names=names, is_thing=(True,) * len(names)))
    inputs = processor(images=picture, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], **tokens)
    return outputs, processor, inputs, names


def reference_segments(checkpoint: Path, picture: Image.Image, threshold: float, overlap: float):
    """The model run by hand: explicit vocabulary, post-processing given the image's padded and original sizes."""
    outputs, processor, inputs, names = run_by_hand(checkpoint, picture)
    (result,) = processor.image_processor.post_process_panoptic_segmentation(
        outputs,
        threshold=threshold,
        overlap_mask_area_threshold=overlap,
        target_sizes=[(picture.height, picture.width)],
        reshaped_input_sizes=[tuple(int(side) for side in inputs["reshaped_input_sizes"][0])],
    )
    first_names = [name.split(",")[0] for name in names]
    return [
        (first_names[info["label_id"]], info["score"], (result["segmentation"] == info["id"]).numpy())
        for info in result["segments_info"]
    ]


def check_pipeline(checkpoint: Path, picture: Image.Image):
    segmenter = pipeline("image-segmentation", model=str(checkpoint))
    assert isinstance(segmenter, ImageSegmentationPipeline)
    found = segmenter(picture, threshold=0.0, overlap_mask_area_threshold=0.0)
    expected = reference_segments(checkpoint, picture, threshold=0.0, overlap=0.0)
    assert expected, "positive control: the tiny model finds segments in this image"
    assert [segment["label"] for segment in found] == [label for label, _, _ in expected]
    np.testing.assert_allclose([segment["score"] for segment in found], [score for _, score, _ in expected], atol=1e-5)
    for segment, (_, _, mask) in zip(found, expected):
        assert segment["mask"].size == picture.size
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, mask)


def test_image_segmentation_pipeline_uses_the_default_vocabulary(checkpoint):
    """A square image fills the padded input: no padding to crop."""
    assert AutoModelForImageSegmentation.from_pretrained(checkpoint).__class__ is PosSAMForPanopticSegmentation
    check_pipeline(checkpoint, image(0, 128, 128))


def test_image_segmentation_pipeline_on_a_padded_image(checkpoint):
    check_pipeline(checkpoint, image(2, 100, 150))


def test_open_vocabulary_pipeline_without_model_says_there_is_no_default():
    with pytest.raises(ValueError, match="no default checkpoint"):
        pipeline("open-vocabulary-panoptic-segmentation")


def test_instance_subtask_accepts_what_the_pipeline_passes(checkpoint, caplog):
    """
    transformers' pipeline passes `mask_threshold` and `overlap_mask_area_threshold` to every post-processor
    (`subtask="instance"` raised TypeError before). `mask_threshold` binarizes the instance masks; the overlap
    threshold cannot apply to overlapping instances, and a warning says so rather than dropping it silently.
    """
    picture = image(0, 128, 128)
    segmenter = pipeline("image-segmentation", model=str(checkpoint))
    logging.Logger.warning_once.cache_clear()  # transformers' once-per-process warnings: this test needs its own
    with caplog.at_level("WARNING"):
        found = segmenter(picture, subtask="instance", threshold=0.0, mask_threshold=0.5)
    assert "overlap_mask_area_threshold has no effect" in caplog.text
    # the reference: the instance post-processor called directly with its documented defaults (FC-CLIP: logits > 0)
    outputs, processor, _, names = run_by_hand(checkpoint, picture)
    (expected,) = processor.image_processor.post_process_instance_segmentation(
        outputs, target_sizes=[(128, 128)], reshaped_input_sizes=[(128, 128)]
    )
    assert expected["segments_info"], "positive control: instances are found"
    first_names = [name.split(",")[0] for name in names]
    assert [segment["label"] for segment in found] == [
        first_names[info["label_id"]] for info in expected["segments_info"]
    ]
    for segment, info in zip(found, expected["segments_info"]):
        np.testing.assert_array_equal(
            np.asarray(segment["mask"]) > 0, (expected["segmentation"] == info["id"]).numpy()
        )


def test_instance_mask_threshold_is_applied(checkpoint):
    """A higher `mask_threshold` gives each instance a subset of its pixels; 1.0 leaves no pixel, so no instance."""
    segmenter = pipeline("image-segmentation", model=str(checkpoint))
    picture = image(0, 128, 128)
    loose = segmenter(picture, subtask="instance", threshold=0.0, mask_threshold=0.5)
    strict = segmenter(picture, subtask="instance", threshold=0.0, mask_threshold=0.9)
    assert loose
    assert sum((np.asarray(s["mask"]) > 0).sum() for s in strict) < sum(
        (np.asarray(s["mask"]) > 0).sum() for s in loose
    )
    assert segmenter(picture, subtask="instance", threshold=0.0, mask_threshold=1.0) == []
    with pytest.raises(ValueError, match="mask_threshold must be in"):
        segmenter(picture, subtask="instance", mask_threshold=1.5)


@pytest.mark.parametrize("subtask", ["panoptic", "instance"])
def test_the_pipelines_default_threshold_warns_when_it_removes_everything(checkpoint, caplog, subtask):
    """
    transformers' pipeline defaults to threshold=0.9; PosSAM's IoU-weighted scores stay well below it, so the call
    returns nothing. That must not look like an empty image: a warning names the threshold, the best score and the
    fix (threshold=0.0). With threshold=0.0 nothing is removed and nothing is said.
    """
    segmenter = pipeline("image-segmentation", model=str(checkpoint))
    picture = image(0, 128, 128)
    with caplog.at_level("WARNING"):
        assert segmenter(picture, subtask=subtask) == []
    assert "threshold=0.9 removed every segment" in caplog.text
    assert "pass threshold=0.0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert segmenter(picture, subtask=subtask, threshold=0.0, overlap_mask_area_threshold=0.0)
    assert "removed every segment" not in caplog.text
