import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from .conftest import save_tiny_checkpoint


LABELS = ["person,people", "car", {"name": "sky,clouds", "isthing": False}, {"name": "road", "isthing": False}]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("possam-tiny"))
    return pipeline("open-vocabulary-panoptic-segmentation", model=str(path))


def image(height=60, width=90, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def check(results, size):
    assert isinstance(results, list)
    for segment in results:
        assert set(segment) == {"score", "label", "mask"}
        assert segment["mask"].mode == "L" and segment["mask"].size == size
        assert segment["label"] in {"person", "car", "sky", "road"}


def test_pipeline_end_to_end_and_cache(segmenter, tmp_path):
    results = segmenter(image(), candidate_labels=LABELS)
    check(results, (90, 60))
    masks = [np.asarray(s["mask"]) > 0 for s in results]
    if masks:
        assert np.sum(masks, axis=0).max() <= 1  # panoptic segments never overlap
    calls = segmenter.text_encoding_calls
    path = tmp_path / "img.png"
    image(40, 30, seed=1).save(path)
    batch = segmenter([image(), str(path)], candidate_labels=LABELS, batch_size=2)
    assert len(batch) == 2
    check(batch[1], (30, 40))
    assert segmenter.text_encoding_calls == calls  # same vocabulary: text tower not run again
    semantic = segmenter(image(), candidate_labels=LABELS, subtask="semantic")
    check(semantic, (90, 60))
    assert all(s["score"] is None for s in semantic)
    instances = segmenter(image(), candidate_labels=LABELS, subtask="instance")
    check(instances, (90, 60))
    assert all(s["label"] in {"person", "car"} for s in instances)  # instances only for things


@pytest.mark.parametrize(
    "picture",
    [
        Image.new("L", (40, 30)),
        Image.new("RGBA", (40, 30)),
        Image.new("RGB", (5, 7)),
        Image.new("RGB", (2000, 40)),
        np.zeros((30, 40, 3), np.uint8),
    ],
)
def test_pipeline_image_kinds(segmenter, picture):
    size = picture.size if isinstance(picture, Image.Image) else (40, 30)
    check(segmenter(picture, candidate_labels=LABELS), size)


def test_pipeline_presets(segmenter):
    check_labels = segmenter(image(), candidate_labels="ade20k")
    assert all(isinstance(s["label"], str) for s in check_labels)


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
    with pytest.raises(ValueError, match="Cannot segment a dict"):
        segmenter({"x": 1}, candidate_labels=["cat"])
    with pytest.raises(ValueError, match="candidate_labels is required"):
        segmenter(image())
