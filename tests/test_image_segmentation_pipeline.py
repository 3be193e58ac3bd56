"""
transformers' standard `pipeline("image-segmentation")` (what the cards' `pipeline_tag` and the Hub widget use)
segments with the checkpoint's default vocabulary, `config.training_vocabulary` exposed as `id2label` (issue 13,
item 2); `pipeline("open-vocabulary-panoptic-segmentation")` without a model says that no default checkpoint exists.
"""

import csv
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
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "possam-tiny")
    model = PosSAMForPanopticSegmentation.from_pretrained(path)
    model.set_default_vocabulary(PosSAMProcessor.from_pretrained(path))
    model.save_pretrained(path)
    return path


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


def reference_segments(checkpoint: Path, picture: Image.Image, threshold: float, overlap: float):
    """The model run by hand: explicit vocabulary, post-processing given the image's padded and original sizes."""
    model = PosSAMForPanopticSegmentation.from_pretrained(checkpoint).eval()
    processor = PosSAMProcessor.from_pretrained(checkpoint)
    names = tuple(model.config.training_vocabulary)
    tokens = processor.encode_vocabulary(Vocabulary(names=names, is_thing=(True,) * len(names)))
    inputs = processor(images=picture, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"], **tokens)
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
