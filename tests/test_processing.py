import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SamImageProcessor
from transformers.image_transforms import rgb_to_id
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from transformers_possam import (
    VILD_TEMPLATES,
    PosSAMImageProcessor,
    PosSAMImageProcessorPil,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
    load_vocabulary,
)
from transformers_possam.processing_possam import resolve_vocabulary, seen_class_mask


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer_from_bpe()


def panoptic_png(height=60, width=80):
    """Segment 5 = top rows, 7 = bottom-left, 256 * 1 = bottom-right (crowd), colours R + 256 G."""
    png = np.zeros((height, width, 3), np.uint8)
    png[: height // 3, :, 0] = 5
    png[height // 3 :, : width // 2, 0] = 7
    png[height // 3 :, width // 2 :, 1] = 1
    segments = [
        {"id": 5, "category_id": 17, "iscrowd": 0},
        {"id": 7, "category_id": 3, "iscrowd": 0},
        {"id": 256, "category_id": 3, "iscrowd": 1},
    ]
    return png, segments


@pytest.mark.parametrize("cls", [PosSAMImageProcessor, PosSAMImageProcessorPil])
def test_resize_longest_side_pad_and_pixel_mask(cls):
    processor = cls()
    image = Image.fromarray(np.full((300, 500, 3), 200, np.uint8))
    out = processor(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 1024, 1024)
    assert [tuple(int(v) for v in s) for s in out["original_sizes"]] == [(300, 500)]
    assert [tuple(int(v) for v in s) for s in out["reshaped_input_sizes"]] == [
        (614, 1024)
    ]  # int(300 * 1024 / 500 + 0.5)
    assert out["pixel_mask"].shape == (1, 1024, 1024)
    assert out["pixel_mask"][0, :614].all() and not out["pixel_mask"][0, 614:].any()
    assert torch.all(out["pixel_values"][0, :, 614:] == 0)  # padded after normalisation
    expected = (200 / 255 - 0.485) / 0.229
    torch.testing.assert_close(out["pixel_values"][0, 0, 300, 300], torch.tensor(expected), atol=1e-3, rtol=0)


def test_backends_agree():
    image = Image.fromarray((np.random.default_rng(0).random((123, 77, 3)) * 255).astype(np.uint8))
    a = PosSAMImageProcessor()(image, return_tensors="pt")["pixel_values"]
    b = PosSAMImageProcessorPil()(image, return_tensors="pt")["pixel_values"]
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 0.05  # torchvision vs PIL resampling (transformers' tests allow 1e-1)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (40, 30), 128),  # grayscale
        Image.new("RGBA", (40, 30), (10, 20, 30, 0)),
        Image.new("RGB", (5, 7)),  # tiny
        Image.new("RGB", (2000, 40)),  # extreme aspect ratio
        Image.fromarray(np.full((30, 40), 40000, np.uint16)),  # 16-bit
        np.zeros((30, 40, 3), np.uint8),  # numpy HWC
        np.zeros((3, 30, 40), np.uint8),  # numpy CHW
        torch.zeros(3, 30, 40, dtype=torch.uint8),
    ],
)
def test_image_kinds(image):
    out = PosSAMImageProcessor()(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 1024, 1024)
    assert torch.isfinite(out["pixel_values"]).all()


def test_bad_images_raise():
    with pytest.raises(ValueError, match="empty"):
        PosSAMImageProcessor()(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="dict"):
        PosSAMImageProcessor()({"not": "an image"})


def test_coco_panoptic_annotation_encoding():
    png, segments = panoptic_png()
    assert rgb_to_id(png)[0, 0] == 5 and rgb_to_id(png)[-1, -1] == 256
    image = Image.new("RGB", (80, 60))
    label_map = {17: 1, 3: 0}
    out = PosSAMImageProcessor()(
        image, annotations={"panoptic_map": Image.fromarray(png), "segments_info": segments}, label_map=label_map
    )
    masks, labels = out["mask_labels"][0], out["class_labels"][0]
    assert masks.dtype == torch.uint8 and masks.shape == (2, 1024, 1024)  # crowd segment left out
    assert labels.tolist() == [1, 0]
    height, width = [int(v) for v in out["reshaped_input_sizes"][0]]
    assert (height, width) == (768, 1024)
    # segment 5 = top third of the image, nothing in the padding
    assert masks[0, : height // 3 - 2].all() and not masks[0, height // 3 + 2 :].any()
    assert masks[1, height // 3 + 2 : height, : width // 2 - 2].all() and not masks[1, height:].any()
    assert not (masks[0] & masks[1]).any()
    bad = [dict(segments[0], id=99)]
    with pytest.raises(ValueError, match="segment id 99"):
        PosSAMImageProcessor()(image, annotations={"panoptic_map": png, "segments_info": bad})
    with pytest.raises(ValueError, match="label_map"):
        PosSAMImageProcessor()(image, annotations={"panoptic_map": png, "segments_info": segments}, label_map={17: 0})


def test_two_channel_annotation_encoding():
    annotation = np.zeros((20, 20, 2), np.uint8)
    annotation[..., 0] = 255  # unlabeled
    annotation[:10, :10] = (2, 1)
    annotation[:10, 10:] = (2, 2)
    annotation[10:, :] = (4, 0)
    out = PosSAMImageProcessorPil()(Image.new("RGB", (20, 20)), annotations=annotation)
    masks, labels = out["mask_labels"][0], out["class_labels"][0]
    assert sorted(labels.tolist()) == [2, 2, 4]
    assert sorted(masks.sum(dim=(1, 2)).tolist()) == [512 * 512, 512 * 512, 512 * 1024]
    assert masks.sum(0).max() == 1


def test_vocabulary_tokens_layout(tokenizer):
    processor = PosSAMProcessor(PosSAMImageProcessor(), tokenizer)
    tokens = processor.encode_vocabulary(["person,people", "car"])
    assert tokens["input_ids"].shape[:3] == (2, 2, len(VILD_TEMPLATES)) and len(VILD_TEMPLATES) == 14
    assert tokens["synonym_mask"].tolist() == [[True, True], [True, False]]
    expected = tokenizer("There is the people in the scene")["input_ids"]
    assert tokens["input_ids"][0, 1, 3, : len(expected)].tolist() == expected
    # padding slot of "car" repeats its first synonym
    assert torch.equal(tokens["input_ids"][1, 1], tokens["input_ids"][1, 0])


def test_tokenizer_matches_open_clip(tokenizer):
    open_clip = pytest.importorskip("open_clip")
    texts = ["a photo of a chest of drawers.", "There is a large traffic light in the scene.", "café, naïve — 42!"]
    ours = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    reference = open_clip.get_tokenizer("convnext_large_d_320")(texts)
    for row in range(len(texts)):
        end = int((reference[row] == 49407).nonzero()[0]) + 1
        assert torch.equal(ours[row, :end], reference[row, :end])


def test_seen_masks():
    coco = load_vocabulary("coco_panoptic_133")
    ade_seen = seen_class_mask(load_vocabulary("ade20k_150"), coco.names)
    assert int(ade_seen.sum()) == 64 and int((~ade_seen).sum()) == 86
    assert seen_class_mask(coco, coco.names).all()
    custom = resolve_vocabulary(["dog", "unicorn,pegasus", "person,someone"])
    assert seen_class_mask(custom, coco.names).tolist() == [True, False, True]


def test_vocabulary_errors():
    with pytest.raises(ValueError, match="empty"):
        resolve_vocabulary([])
    with pytest.raises(ValueError, match="blank"):
        resolve_vocabulary(["cat", "  "])
    with pytest.raises(ValueError, match="Duplicate"):
        resolve_vocabulary(["cat", "dog", "Cat"])
    # issue 13: a string that is no preset lists classes, as transformers' zero-shot pipelines split it (was an error)
    assert resolve_vocabulary("cat,dog").names == ("cat", "dog")
    assert len(resolve_vocabulary("ade20k")) == 150
    vocabulary = resolve_vocabulary(["cat", {"name": "sky,clouds", "isthing": False}])
    assert vocabulary.is_thing == (True, False) and vocabulary.display_names == ["cat", "sky"]


def test_processor_round_trip(tokenizer, tmp_path):
    processor = PosSAMProcessor(PosSAMImageProcessor(), tokenizer)
    processor.save_pretrained(tmp_path)
    loaded = PosSAMProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded.image_processor, PosSAMImageProcessor)
    image = Image.new("RGB", (30, 20))
    a = processor(images=image, candidate_labels=["cat", "dog,puppy"], return_tensors="pt")
    b = loaded(images=image, candidate_labels=["cat", "dog,puppy"], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_processor_saved_after_encoding_a_vocabulary_loads_and_encodes_the_same(tokenizer, tmp_path):
    """
    The conversion script's order: encode a vocabulary (`set_default_vocabulary`), then save the processor. The
    truncating tokenizer call used to stay in the fast tokenizer's backend, reach tokenizer.json and come back as
    `stride=0, max_length=78` defaults, so the reloaded processor refused every vocabulary.
    """
    labels = ["cat", ["dog", "puppy"]]
    reference = PosSAMProcessor(PosSAMImageProcessor(), clip_tokenizer_from_bpe()).encode_vocabulary(labels)
    processor = PosSAMProcessor(PosSAMImageProcessor(), tokenizer)
    processor.encode_vocabulary(labels)
    assert tokenizer.backend_tokenizer.truncation is None  # left as found
    processor.save_pretrained(tmp_path)
    loaded = PosSAMProcessor.from_pretrained(tmp_path)
    assert torch.equal(loaded(candidate_labels=labels, return_tensors="pt")["input_ids"], reference["input_ids"])

    # a tokenizer.json saved with a truncation state by other code (or by this package before the fix) still works
    tokenizer.backend_tokenizer.enable_truncation(max_length=78)
    try:
        processor.save_pretrained(tmp_path / "with-state")
    finally:
        tokenizer.backend_tokenizer.no_truncation()
    loaded = PosSAMProcessor.from_pretrained(tmp_path / "with-state")
    assert loaded.tokenizer.init_kwargs["max_length"] == 78  # positive control: the state came back as a default
    assert torch.equal(loaded(candidate_labels=labels, return_tensors="pt")["input_ids"], reference["input_ids"])
    # ... while a max_length given by the caller still applies
    cut = loaded(candidate_labels=labels, max_length=20, padding="max_length", return_tensors="pt")
    assert cut["input_ids"].shape[-1] == 20


def small_processor(tokenizer, **image_processor_kwargs):
    image_processor = PosSAMImageProcessor(
        size={"longest_edge": 32}, pad_size={"height": 32, "width": 32}, **image_processor_kwargs
    )
    return PosSAMProcessor(image_processor, tokenizer)


@pytest.mark.parametrize(
    "ours,sam",
    [(PosSAMImageProcessor, SamImageProcessor), (PosSAMImageProcessorPil, SamImageProcessorPil)],
)
def test_return_tensors_defaults_to_none_like_sam(ours, sam):
    """transformers' convention, as SAM's processors of the same backend follow it: no tensor type unless asked."""
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (20, 30), (0, 90, 0))]
    size = {"size": {"longest_edge": 32}, "pad_size": {"height": 32, "width": 32}}
    reference = sam(**size)(images)
    out = ours(**size)(images)
    for key in reference:
        assert type(out[key]) is type(reference[key]) and len(out[key]) == 2
        assert all(type(mine) is type(theirs) for mine, theirs in zip(out[key], reference[key]))
    # the pixel mask follows the pixel values' per-image type, 1 on the resized image, 0 on the padding
    assert type(out["pixel_mask"]) is list and all(
        type(m) is type(reference["pixel_values"][0]) for m in out["pixel_mask"]
    )
    assert [np.asarray(m).tolist() for m in out["pixel_mask"]] == [
        [[int(row < 24) for _ in range(32)] for row in range(32)],
        [[int(column < 21) for column in range(32)] for _ in range(32)],
    ]
    tensors = ours(**size)(images, return_tensors="pt")
    assert torch.equal(tensors["pixel_mask"], torch.from_numpy(np.stack([np.asarray(m) for m in out["pixel_mask"]])))
    torch.testing.assert_close(tensors["pixel_values"], torch.stack([torch.as_tensor(v) for v in out["pixel_values"]]))
    arrays = ours(**size)(images, return_tensors="np")
    assert all(isinstance(arrays[key], np.ndarray) for key in ("pixel_values", "pixel_mask", "original_sizes"))


def test_processor_return_tensors_defaults_to_none(tokenizer):
    processor = small_processor(tokenizer)
    image, labels = Image.new("RGB", (40, 30)), ["cat", "dog,puppy"]
    out = processor(images=image, candidate_labels=labels)
    # the tokenizer's convention without return_tensors: nested Python lists, here (K, S, T, L)
    assert isinstance(out["input_ids"], list) and isinstance(out["input_ids"][0][0][0], list)
    assert isinstance(out["synonym_mask"], list) and out["synonym_mask"] == [[True, False], [True, True]]
    assert isinstance(out["pixel_values"], list)
    tensors = processor(images=image, candidate_labels=labels, return_tensors="pt")
    assert torch.equal(tensors["input_ids"], torch.tensor(out["input_ids"]))
    assert torch.equal(tensors["attention_mask"], torch.tensor(out["attention_mask"]))
    arrays = processor(images=image, candidate_labels=labels, return_tensors="np")
    assert isinstance(arrays["input_ids"], np.ndarray) and np.array_equal(arrays["input_ids"], tensors["input_ids"])


def test_model_input_names_are_what_the_processor_returns(tokenizer):
    processor = small_processor(tokenizer)
    out = processor(images=Image.new("RGB", (40, 30)), candidate_labels=["cat", "sky"], return_tensors="pt")
    assert "synonym_mask" in processor.model_input_names
    assert set(out.keys()) == set(processor.model_input_names)


def test_structured_kwargs_reach_their_processor(tokenizer):
    """images_kwargs go to the image processor, text_kwargs to the tokenizer, common_kwargs to both."""
    processor = small_processor(tokenizer)
    image, labels = Image.new("RGB", (40, 30), (120, 60, 30)), ["cat", "dog,puppy"]
    out = processor(
        images=image,
        candidate_labels=labels,
        images_kwargs={"do_normalize": False},
        text_kwargs={"padding": "max_length", "max_length": 20},
        common_kwargs={"return_tensors": "pt"},
    )
    expected = processor.image_processor(image, do_normalize=False, return_tensors="pt")["pixel_values"]
    assert torch.equal(out["pixel_values"], expected)
    assert not torch.equal(out["pixel_values"], processor.image_processor(image, return_tensors="pt")["pixel_values"])
    # the tokenizer's own padding of one prompt to max_length
    reference = tokenizer(VILD_TEMPLATES[3].format("puppy"), padding="max_length", max_length=20)
    assert out["input_ids"].shape == (2, 2, len(VILD_TEMPLATES), 20)
    assert out["input_ids"][1, 1, 3].tolist() == reference["input_ids"]
    assert out["attention_mask"][1, 1, 3].tolist() == reference["attention_mask"]
    # the same options given flat
    flat = processor(
        images=image,
        candidate_labels=labels,
        do_normalize=False,
        padding="max_length",
        max_length=20,
        return_tensors="pt",
    )
    assert all(torch.equal(flat[key], out[key]) for key in out)
    with pytest.raises(ValueError, match="passed two times"):
        processor(images=image, images_kwargs={"do_normalize": False}, do_normalize=True)
    with pytest.raises(ValueError, match="passed two times"):
        processor(candidate_labels=labels, text_kwargs={"padding": "longest"}, padding="max_length")


def test_vocabulary_max_length_cuts_like_the_tokenizer(tokenizer):
    processor = small_processor(tokenizer)
    label = "very " * 8 + "long cat"
    with pytest.warns(UserWarning, match=r"max_length=12 keeps at most 12 tokens, so the prompts of label 0"):
        out = processor(candidate_labels=[label, "dog"], max_length=12, return_tensors="pt")
    reference = tokenizer(VILD_TEMPLATES[0].format(label), truncation=True, max_length=12)["input_ids"]
    assert len(reference) == 12 and out["input_ids"][0, 0, 0].tolist() == reference
    with pytest.raises(ValueError, match=r"truncation=False, but the prompts of label 0"):
        processor(candidate_labels=[label, "dog"], max_length=12, truncation=False)
    # prompts within max_length: truncation=False changes nothing
    uncut = processor(candidate_labels=["dog"], max_length=12, truncation=False, return_tensors="pt")
    assert torch.equal(uncut["input_ids"], processor(candidate_labels=["dog"], return_tensors="pt")["input_ids"])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"text": ["cat"]}, TypeError, r"takes no text=: .*candidate_labels"),
        ({"videos": [np.zeros((2, 8, 8, 3))]}, TypeError, r"takes no videos="),
        ({"do_normalise": False}, TypeError, r"unknown keyword argument 'do_normalise'.*Did you mean do_normalize"),
        ({"padding": False}, ValueError, r"padding=False cannot be used for the vocabulary"),
        ({"max_length": 78}, ValueError, r"max_length=78 is outside 1..77"),
        ({"padding_side": "left"}, ValueError, r"padding_side='left'"),
        ({"return_overflowing_tokens": True}, ValueError, r"\['return_overflowing_tokens'\] cannot be applied"),
        ({"annotations": np.zeros((8, 8, 2), np.uint8)}, ValueError, r"annotations were given without images"),
    ],
)
def test_processor_refuses_what_it_cannot_honour(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        small_processor(tokenizer)(candidate_labels=["cat", "dog"], **kwargs)


def test_bpe_file_is_closed(monkeypatch):
    """Building the tokenizer must not leave the gzip file open (a ResourceWarning, a leaked handle)."""
    from transformers_possam import tokenization

    opened = []
    real_open = tokenization.gzip.open

    def recording_open(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tokenization.gzip, "open", recording_open)
    tokenization.clip_tokenizer_from_bpe()
    assert len(opened) == 1 and opened[0].closed
