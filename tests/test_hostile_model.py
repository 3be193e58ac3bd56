"""
Model inputs as a careless or hostile user passes them (issue 11, item 7): each case either raises the documented
error type (TypeError: not a tensor / not a bool / unknown keyword; ValueError: wrong shape, dtype or values) with a
message naming the argument and what was expected, or gives a result equal to the canonical input's.

Inputs are batch 1 on the tiny model (128x128 SAM input, CLIP embedding width 32, 5 classes) to keep the file fast.
"""

from collections.abc import Callable

import numpy as np
import pytest
import torch

from transformers_possam import PosSAMForPanopticSegmentation

from .conftest import IMAGE_SIZE, NUM_CLASSES, make_vocabulary


EMBED_DIM = 32  # tiny_config's clip_embed_dim
COMPARED_OUTPUTS = ("class_queries_logits", "clip_class_logits", "masks_queries_logits", "iou_scores")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """Canonical input: contiguous float32 `(1, 3, 128, 128)`, SAM-normalized-like values."""
    return torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def class_embeddings() -> torch.Tensor:
    """A precomputed vocabulary `(K, S, D)` = `(5, 2, 32)`: skips the text tower in most cases."""
    return torch.randn(NUM_CLASSES, 2, EMBED_DIM, generator=torch.Generator().manual_seed(8))


@pytest.fixture(scope="module")
def reference(model: PosSAMForPanopticSegmentation, pixels: torch.Tensor, class_embeddings: torch.Tensor):
    """The outputs of the canonical inputs, which every accepted alternative form must reproduce."""
    with torch.no_grad():
        return model(pixels, class_embeddings=class_embeddings)


def assert_same_outputs(output, reference) -> None:
    for name in COMPARED_OUTPUTS:
        torch.testing.assert_close(getattr(output, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def with_nan(pixels: torch.Tensor) -> torch.Tensor:
    pixels = pixels.clone()
    pixels[0, 1, 5, 9] = float("nan")
    return pixels


def with_inf(pixels: torch.Tensor) -> torch.Tensor:
    pixels = pixels.clone()
    pixels[0, 2, 100, 3] = float("inf")
    return pixels


# ----- pixel_values: (bad value built from the canonical pixels, error type, message naming pixel_values)
BAD_PIXEL_VALUES = {
    "none": (lambda p: None, TypeError, "pixel_values must be a torch.Tensor.*got NoneType"),
    "numpy": (lambda p: p.numpy(), TypeError, "pixel_values must be a torch.Tensor.*got ndarray"),
    "list": (lambda p: p.tolist(), TypeError, "pixel_values must be a torch.Tensor.*got list"),
    "3d_missing_batch": (
        lambda p: p[0],
        ValueError,
        r"pixel_values must have shape \(batch_size, 3, 128, 128\).*pixel_values\[None\]",
    ),
    "5d": (
        lambda p: p[None],
        ValueError,
        r"pixel_values must have shape \(batch_size, 3, 128, 128\), got \(1, 1, 3, 128, 128\)",
    ),
    "1_channel": (
        lambda p: p[:, :1],
        ValueError,
        r"pixel_values must have 3 \(RGB\) channels.*got shape \(1, 1, 128, 128\)",
    ),
    "4_channels": (
        lambda p: torch.cat([p, p[:, :1]], 1),
        ValueError,
        r"pixel_values must have 3 \(RGB\) channels.*\(1, 4, 128, 128\)",
    ),
    "float16": (
        lambda p: p.half(),
        ValueError,
        r"pixel_values has dtype torch.float16 but the model's weights are torch.float32",
    ),
    "bfloat16": (
        lambda p: p.bfloat16(),
        ValueError,
        r"pixel_values has dtype torch.bfloat16 but the model's weights are torch.float32",
    ),
    "float64": (
        lambda p: p.double(),
        ValueError,
        r"pixel_values has dtype torch.float64 but the model's weights are torch.float32",
    ),
    "uint8_raw_image": (
        lambda p: (p * 50 + 128).clamp(0, 255).to(torch.uint8),
        ValueError,
        "pixel_values must hold normalized floating-point.*torch.uint8.*image processor",
    ),
    "int64": (lambda p: p.long(), ValueError, "pixel_values must hold normalized floating-point.*torch.int64"),
    "100x100_unpadded": (
        lambda p: p[..., :100, :100],
        ValueError,
        r"pixel_values must be padded to the SAM input size \(128, 128\).*\(1, 3, 100, 100\)",
    ),
    "256x256": (
        lambda p: p.repeat(1, 1, 2, 2),
        ValueError,
        r"pixel_values must be padded to the SAM input size \(128, 128\)",
    ),
    "empty_batch": (lambda p: p[:0], ValueError, r"pixel_values holds no image.*batch_size >= 1"),
    "nan": (with_nan, ValueError, "pixel_values contains NaN or infinite values"),
    "inf": (with_inf, ValueError, "pixel_values contains NaN or infinite values"),
}


@pytest.mark.parametrize("case", sorted(BAD_PIXEL_VALUES))
def test_bad_pixel_values_are_rejected_by_name(model, pixels, class_embeddings, case):
    make_bad, error, message = BAD_PIXEL_VALUES[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(make_bad(pixels), class_embeddings=class_embeddings)


@pytest.mark.parametrize("case", ["3d_missing_batch", "float16", "100x100_unpadded", "nan"])
def test_base_model_checks_pixel_values_too(model, pixels, case):
    """`PosSAMModel` is public on its own: same checks, same messages (expected errors as in BAD_PIXEL_VALUES)."""
    make_bad, error, message = BAD_PIXEL_VALUES[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model.model(make_bad(pixels))


def strided_view(pixels: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a twice-as-large buffer)."""
    buffer = torch.zeros(pixels.shape[0], 3, 2 * pixels.shape[2], 2 * pixels.shape[3])
    buffer[:, :, ::2, ::2] = pixels
    view = buffer[:, :, ::2, ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda p: p.to(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(strided_view, id="strided_view"),
    ],
)
def test_pixel_memory_layout_does_not_change_outputs(model, pixels, class_embeddings, reference, layout: Callable):
    """Expected: outputs equal to the contiguous input's (memory layout is not content)."""
    with torch.no_grad():
        assert_same_outputs(model(layout(pixels), class_embeddings=class_embeddings), reference)


def test_image_entry_points_check_pixel_values(model, pixels):
    """get_image_features (CLIP, any size >= its stride 32) and get_image_embeddings (SAM) name pixel_values too."""
    with torch.no_grad():
        with pytest.raises(TypeError, match="pixel_values must be a torch.Tensor.*got ndarray"):
            model.get_image_features(pixels.numpy())
        with pytest.raises(ValueError, match=r"pixel_values must be at least 32x32 pixels.*\(1, 3, 16, 16\)"):
            model.get_image_features(pixels[..., :16, :16])
        with pytest.raises(ValueError, match="pixel_values contains NaN or infinite values"):
            model.get_image_features(with_nan(pixels))
        with pytest.raises(ValueError, match="pixel_values contains NaN or infinite values"):
            model.get_image_embeddings(with_nan(pixels))
        # a CLIP-only entry point takes sizes other than SAM's: 64x64 equals CLIP on the re-normalized image
        small = pixels[..., :64, :64]
        config = model.config

        def channels(values: list[float]) -> torch.Tensor:
            return torch.tensor(values).view(1, 3, 1, 1)

        image = small * channels(config.sam_image_std) + channels(config.sam_image_mean)
        clip_pixels = (image - channels(config.clip_image_mean)) / channels(config.clip_image_std)
        torch.testing.assert_close(
            model.get_image_features(small).pooler_output, model.clip.vision_model(clip_pixels), atol=1e-5, rtol=1e-5
        )


# ----- pixel_mask


def half_padded_mask() -> torch.Tensor:
    """`(1, 128, 128)` int64 mask (the processor's dtype): the right half is padding."""
    mask = torch.ones(1, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.long)
    mask[..., IMAGE_SIZE // 2 :] = 0
    return mask


@pytest.fixture(scope="module")
def padded_reference(model, pixels, class_embeddings):
    with torch.no_grad():
        return model(pixels, pixel_mask=half_padded_mask(), class_embeddings=class_embeddings)


BAD_PIXEL_MASKS = {
    "channel_dim": (
        lambda m: m[:, None],
        ValueError,
        r"pixel_mask must have shape \(batch_size, height, width\) of pixel_values = \(1, 128, 128\), got \(1, 1, 128, 128\)",
    ),
    "batch_of_2_for_1_image": (
        lambda m: m.repeat(2, 1, 1),
        ValueError,
        r"pixel_mask must have shape .* = \(1, 128, 128\), got \(2, 128, 128\)",
    ),
    "unpadded_size": (lambda m: m[:, :100, :100], ValueError, r"pixel_mask must have shape .* got \(1, 100, 100\)"),
    "0_255_values": (
        lambda m: m * 255,
        ValueError,
        r"pixel_mask must be bool or hold only 0 and 1, got dtype torch.int64 with values like \[255",
    ),
    "soft_float": (
        lambda m: m * 0.5,
        ValueError,
        "pixel_mask must be bool or hold only 0 and 1, got dtype torch.float32",
    ),
    "numpy": (lambda m: m.numpy(), TypeError, "pixel_mask must be a torch.Tensor.*got ndarray"),
}


@pytest.mark.parametrize("case", sorted(BAD_PIXEL_MASKS))
def test_bad_pixel_masks_are_rejected_by_name(model, pixels, class_embeddings, case):
    make_bad, error, message = BAD_PIXEL_MASKS[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(pixels, pixel_mask=make_bad(half_padded_mask()), class_embeddings=class_embeddings)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_pixel_mask_dtypes_give_the_int64_mask_outputs(model, pixels, class_embeddings, padded_reference, dtype):
    """Expected: a bool / uint8 / float 0-1 mask gives exactly the outputs of the processor's int64 mask."""
    with torch.no_grad():
        output = model(pixels, pixel_mask=half_padded_mask().to(dtype), class_embeddings=class_embeddings)
    assert_same_outputs(output, padded_reference)


# ----- class_embeddings

BAD_CLASS_EMBEDDINGS = {
    "1d": (
        lambda e: e[0, 0],
        ValueError,
        r"class_embeddings must be \(num_classes, num_synonyms, 32\) or \(num_classes, 32\); got shape \(32,\)",
    ),
    "4d_batched": (lambda e: e[None], ValueError, r"class_embeddings must be .*; got shape \(1, 5, 2, 32\)"),
    "width_not_clip_embed_dim": (
        lambda e: e[..., :16],
        ValueError,
        r"class_embeddings must be \(num_classes, num_synonyms, 32\).*got shape \(5, 2, 16\)",
    ),
    "zero_classes": (
        lambda e: e[:0, 0],
        ValueError,
        r"class_embeddings holds no class.*num_classes >= 1, got shape \(0, 32\)",
    ),
    "nan": (
        lambda e: e.index_fill(0, torch.tensor([3]), float("nan")),
        ValueError,
        "class_embeddings contains NaN or infinite values",
    ),
    "integer_token_ids": (
        lambda e: torch.randint(0, 100, (NUM_CLASSES, EMBED_DIM)),
        ValueError,
        "class_embeddings must be floating-point.*torch.int64.*input_ids",
    ),
    "numpy": (lambda e: e.numpy(), TypeError, "class_embeddings must be a torch.Tensor.*got ndarray"),
    "zero_vector_at_real_slot": (
        lambda e: e.index_fill(0, torch.tensor([2]), 0.0),
        ValueError,
        r"class_embeddings has all-zero vectors at real synonym slots .*\[\[2, 0\], \[2, 1\]\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CLASS_EMBEDDINGS))
def test_bad_class_embeddings_are_rejected_by_name(model, pixels, class_embeddings, case):
    make_bad, error, message = BAD_CLASS_EMBEDDINGS[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(pixels, class_embeddings=make_bad(class_embeddings))


def test_vocabulary_is_exactly_one_of_input_ids_or_class_embeddings(model, pixels, class_embeddings):
    input_ids, synonym_mask = make_vocabulary()
    with pytest.raises(ValueError, match="Pass either input_ids .* or class_embeddings, not both"):
        model(pixels, input_ids=input_ids, class_embeddings=class_embeddings)
    with pytest.raises(ValueError, match="pass input_ids .* or class_embeddings"):
        model(pixels)
    # an attention_mask next to class_embeddings would be silently ignored
    with pytest.raises(ValueError, match="attention_mask belongs to input_ids"):
        model(pixels, attention_mask=torch.ones_like(input_ids), class_embeddings=class_embeddings)


def test_two_dimensional_class_embeddings_equal_one_synonym_slot(model, pixels, class_embeddings):
    """Expected: `(K, D)` gives the outputs of `(K, 1, D)` (one synonym per class)."""
    with torch.no_grad():
        flat = model(pixels, class_embeddings=class_embeddings[:, 0])
        slotted = model(pixels, class_embeddings=class_embeddings[:, :1])
    assert_same_outputs(flat, slotted)


# ----- input_ids / attention_mask (the tokenized vocabulary: K=5 classes, S=2 synonyms, T=3 templates, L=7 tokens)


def modified(tensor: torch.Tensor, index: tuple, value) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


BAD_INPUT_IDS = {
    "id_beyond_vocabulary": (
        lambda ids: modified(ids, (0, 0, 0, 3), 49408),
        ValueError,
        r"input_ids must be token ids in \[0, 49407\] \(text_config.vocab_size=49408\), got values in \[.*, 49408\]",
    ),
    "negative_id": (
        lambda ids: modified(ids, (1, 0, 2, 2), -1),
        ValueError,
        r"input_ids must be token ids in \[0, 49407\].*got values in \[-1,",
    ),
    "float_dtype": (
        lambda ids: ids.float(),
        ValueError,
        "input_ids must hold integer token ids .*got dtype torch.float32",
    ),
    "bool_dtype": (lambda ids: ids.bool(), ValueError, "input_ids must hold integer token ids .*got dtype torch.bool"),
    "3d": (
        lambda ids: ids[:, 0],
        ValueError,
        r"input_ids must be \(num_classes, num_synonyms, num_templates, seq_len\) or \(num_classes, seq_len\).*\(5, 3, 7\)",
    ),
    "5d": (
        lambda ids: ids[None],
        ValueError,
        r"input_ids must be \(num_classes, num_synonyms, num_templates, seq_len\).*\(1, 5, 2, 3, 7\)",
    ),
    "zero_classes": (
        lambda ids: ids[:0],
        ValueError,
        r"input_ids must be .*every size >= 1; got shape \(0, 2, 3, 7\)",
    ),
    "no_end_of_text_token": (
        lambda ids: ids[..., :-1],
        ValueError,
        "Every prompt in input_ids needs the end-of-text token 49407",
    ),
    "longer_than_77_tokens": (
        lambda ids: torch.cat([ids[..., :1].expand(-1, -1, -1, 80), ids], -1),
        ValueError,
        "input_ids has 87 tokens per prompt, more than the text tower's max_position_embeddings=77",
    ),
    "list": (lambda ids: ids.tolist(), TypeError, "input_ids must be a torch.Tensor of token ids.*got list"),
    # int16 wraps CLIP's ids above 32767 (end-of-text 49407 becomes -16129): caught by the range check
    "int16_overflow": (
        lambda ids: ids.to(torch.int16),
        ValueError,
        r"input_ids must be token ids in \[0, 49407\].*got values in \[-",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_IDS))
def test_bad_input_ids_are_rejected_by_name(model, pixels, case):
    input_ids, synonym_mask = make_vocabulary()
    make_bad, error, message = BAD_INPUT_IDS[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(pixels, input_ids=make_bad(input_ids), synonym_mask=synonym_mask)


def test_padding_synonym_slots_may_hold_anything(model):
    """Only real synonym slots are encoded: ids in padding slots (here 0s, no end-of-text) are not checked or used."""
    input_ids, synonym_mask = make_vocabulary()
    with torch.no_grad():
        reference = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask)
        zeroed = model.get_class_embeddings(
            input_ids.masked_fill(~synonym_mask[..., None, None], 0), synonym_mask=synonym_mask
        )
    for ours, expected in zip(zeroed, reference):
        torch.testing.assert_close(ours, expected)


def test_int32_input_ids_equal_int64(model):
    """Expected: int32 token ids give the int64 ids' class embeddings (int16 cannot hold CLIP's 49408 ids)."""
    input_ids, synonym_mask = make_vocabulary()
    with torch.no_grad():
        reference, _ = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask)
        narrow, _ = model.get_class_embeddings(input_ids.int(), synonym_mask=synonym_mask)
    torch.testing.assert_close(narrow, reference)


BAD_ATTENTION_MASKS = {
    "shape_mismatch": (
        lambda m: m[..., :-1],
        ValueError,
        r"attention_mask must have shape \(num_classes, num_synonyms, num_templates, seq_len\) of input_ids = "
        r"\(5, 2, 3, 7\), got \(5, 2, 3, 6\)",
    ),
    "value_2": (lambda m: m * 2, ValueError, "attention_mask must be bool or hold only 0 and 1.*values like \\[2"),
    "numpy": (lambda m: m.numpy(), TypeError, "attention_mask must be a torch.Tensor.*got ndarray"),
}


@pytest.mark.parametrize("case", sorted(BAD_ATTENTION_MASKS))
def test_bad_attention_masks_are_rejected_by_name(model, pixels, case):
    input_ids, synonym_mask = make_vocabulary()
    make_bad, error, message = BAD_ATTENTION_MASKS[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(
            pixels, input_ids=input_ids, attention_mask=make_bad(torch.ones_like(input_ids)), synonym_mask=synonym_mask
        )


def test_get_text_features_checks_its_arguments(model):
    input_ids, _ = make_vocabulary()
    prompts = input_ids[:, 0, 0]  # (5, 7)
    with pytest.raises(
        ValueError, match=r"input_ids must have shape \(num_prompts, seq_len\) with both >= 1, got \(5, 2, 3, 7\)"
    ):
        model.get_text_features(input_ids)
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, 49407\]"):
        model.get_text_features(prompts + 49407)
    with pytest.raises(
        ValueError,
        match=r"attention_mask must have shape \(num_prompts, seq_len\) of input_ids = \(5, 7\), got \(4, 7\)",
    ):
        model.get_text_features(prompts, torch.ones_like(prompts)[:4])
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor.*got list"):
        model.get_text_features(prompts.tolist())


def test_feature_entry_points_reject_unknown_keywords_and_bad_flags(model, pixels):
    """
    `get_text_features` / `get_image_features` pass transformers' common kwargs to the CLIP towers: anything else is a
    TypeError naming it, and the ConvNeXt image tower has no attentions to return (a ValueError, not a silent None).
    """
    prompts = make_vocabulary()[0][:, 0, 0]
    with pytest.raises(TypeError, match="unexpected keyword argument 'original_sizes'"):
        model.get_text_features(prompts, original_sizes=torch.tensor([[128, 128]]))
    with pytest.raises(TypeError, match="unexpected keyword argument 'pixel_value'.*did you mean 'pixel_values'"):
        model.get_image_features(pixels, pixel_value=pixels)
    with pytest.raises(TypeError, match="output_hidden_states must be True, False or None, got 'yes'"):
        model.get_image_features(pixels, output_hidden_states="yes")
    with pytest.raises(ValueError, match="output_attentions=True: the CLIP image tower is a ConvNeXt"):
        model.get_image_features(pixels, output_attentions=True)


# ----- synonym_mask

BAD_SYNONYM_MASKS = {
    "wrong_shape": (
        lambda m: m[:, :1],
        ValueError,
        r"synonym_mask must have shape \(num_classes, num_synonyms\) = \(5, 2\), got \(5, 1\)",
    ),
    "soft_float": (
        lambda m: m.float() * 0.5,
        ValueError,
        "synonym_mask must be bool or hold only 0 and 1, got dtype torch.float32",
    ),
    "int_value_2": (
        lambda m: m.long() * 2,
        ValueError,
        "synonym_mask must be bool or hold only 0 and 1, got dtype torch.int64",
    ),
    "class_without_synonym": (
        lambda m: modified(m, (3,), False),
        ValueError,
        r"Classes \[3\] have no synonym in synonym_mask",
    ),
    "list": (lambda m: m.tolist(), TypeError, "synonym_mask must be a torch.Tensor.*got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_SYNONYM_MASKS))
def test_bad_synonym_masks_are_rejected_by_name(model, pixels, class_embeddings, case):
    _, synonym_mask = make_vocabulary()
    make_bad, error, message = BAD_SYNONYM_MASKS[case]
    with torch.no_grad(), pytest.raises(error, match=message):
        model(pixels, class_embeddings=class_embeddings, synonym_mask=make_bad(synonym_mask))


def test_integer_synonym_mask_equals_bool(model):
    """Expected: a 0/1 int64 synonym_mask gives the bool mask's class embeddings and mask."""
    input_ids, synonym_mask = make_vocabulary()
    with torch.no_grad():
        reference = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask)
        from_integers = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask.long())
    for ours, expected in zip(from_integers, reference):
        torch.testing.assert_close(ours, expected)


# ----- keyword arguments and flags

UNKNOWN_KEYWORDS = {
    # what a Mask2Former-style training loop passes: before, swallowed by **kwargs and training got loss=None
    "labels": (
        "labels",
        TypeError,
        "unexpected keyword argument 'labels': PosSAM trains on mask_labels .* and class_labels",
    ),
    "typo_mask_label": (
        "mask_label",
        TypeError,
        "unexpected keyword argument 'mask_label': did you mean 'mask_labels'",
    ),
    "typo_class_embedding": (
        "class_embedding",
        TypeError,
        "unexpected keyword argument 'class_embedding': did you mean 'class_embeddings'",
    ),
}


@pytest.mark.parametrize("case", sorted(UNKNOWN_KEYWORDS))
def test_unknown_keyword_arguments_are_rejected(model, pixels, class_embeddings, case):
    name, error, message = UNKNOWN_KEYWORDS[case]
    with pytest.raises(error, match=message):
        model(pixels, class_embeddings=class_embeddings, **{name: torch.zeros(1)})


def test_misspelled_pixel_values_is_named(model, pixels, class_embeddings):
    """`pixel_value=` leaves the required `pixel_values` missing: Python's TypeError names it."""
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'pixel_values'"):
        model(pixel_value=pixels, class_embeddings=class_embeddings)


def test_base_model_rejects_unknown_keyword_arguments(model, pixels):
    with pytest.raises(
        TypeError, match="PosSAMModel.forward\\(\\) got an unexpected keyword argument 'labels'.*mask_labels"
    ):
        model.model(pixels, labels=torch.zeros(1))
    with pytest.raises(
        TypeError, match="unexpected keyword argument 'output_auxiliary_mask': did you mean 'output_auxiliary_masks'"
    ):
        model.model(pixels, output_auxiliary_mask=False)


def test_transformers_common_kwargs_are_accepted(model, pixels, class_embeddings, reference):
    """Expected: `TransformersKwargs` keys (Trainer's `num_items_in_batch`) pass and change nothing."""
    with torch.no_grad():
        output = model(pixels, class_embeddings=class_embeddings, num_items_in_batch=torch.tensor(4))
    assert_same_outputs(output, reference)


BAD_FLAGS = {
    "return_dict_string": (
        {"return_dict": "False"},
        TypeError,
        "return_dict must be True, False or None, got 'False'",
    ),
    "return_dict_int": ({"return_dict": 0}, TypeError, "return_dict must be True, False or None, got 0"),
    "output_attentions_tensor": (
        {"output_attentions": torch.tensor(True)},
        TypeError,
        "output_attentions must be True, False or None",
    ),
    "return_clip_logits_string": (
        {"return_clip_logits": "yes"},
        TypeError,
        "return_clip_logits must be True, False or None",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_non_bool_flags_are_rejected_by_name(model, pixels, class_embeddings, case):
    flags, error, message = BAD_FLAGS[case]
    with pytest.raises(error, match=message):
        model(pixels, class_embeddings=class_embeddings, **flags)


def test_return_dict_false_gives_the_outputs_as_a_tuple(model, pixels, class_embeddings, reference):
    """Expected: the tuple holds the non-None fields of the dict output, in order."""
    with torch.no_grad():
        as_tuple = model(pixels, class_embeddings=class_embeddings, return_dict=False)
    expected = reference.to_tuple()
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(expected)
    for ours, theirs in zip(as_tuple, expected):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# ----- get_class_embeddings(text_batch_size=...)

BAD_TEXT_BATCH_SIZES = {
    "zero": (0, ValueError, "text_batch_size must be a positive number of prompts or None, got 0"),
    "negative": (-1, ValueError, "text_batch_size must be a positive number of prompts or None, got -1"),
    "string": ("8", TypeError, "text_batch_size must be an int number of prompts or None, got '8'"),
    "float": (2.5, TypeError, "text_batch_size must be an int number of prompts or None, got 2.5"),
    "bool": (True, TypeError, "text_batch_size must be an int number of prompts or None, got True"),
}


@pytest.mark.parametrize("case", sorted(BAD_TEXT_BATCH_SIZES))
def test_bad_text_batch_sizes_are_rejected_by_name(model, case):
    input_ids, synonym_mask = make_vocabulary()
    value, error, message = BAD_TEXT_BATCH_SIZES[case]
    with pytest.raises(error, match=message):
        model.get_class_embeddings(input_ids, synonym_mask=synonym_mask, text_batch_size=value)


def test_numpy_integer_text_batch_size_equals_python_int(model):
    """Expected: `np.int64(4)` (e.g. read from a config array) chunks exactly like `4`."""
    input_ids, synonym_mask = make_vocabulary()
    with torch.no_grad():
        reference, _ = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask, text_batch_size=4)
        from_numpy, _ = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask, text_batch_size=np.int64(4))
    torch.testing.assert_close(from_numpy, reference)


def test_only_shape_checks_run_while_compiling(monkeypatch, model, pixels, class_embeddings):
    """
    Under torch.compile / torch.export, value checks (data-dependent branches) would break the graph: they step
    aside and the O(1) shape / dtype checks still run. Simulated here (compiling a model on CPU takes minutes).
    """
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch_size, 3, 128, 128\)"):
        model(pixels[0], class_embeddings=class_embeddings)
    with pytest.raises(ValueError, match="pixel_values has dtype torch.float16"):
        model(pixels.half(), class_embeddings=class_embeddings)
    with torch.no_grad():  # a 0/255 mask is not looked at: the forward runs
        output = model(pixels, pixel_mask=half_padded_mask() * 255, class_embeddings=class_embeddings)
    assert output.class_queries_logits.shape == (1, 8, NUM_CLASSES + 1)


def test_processor_outputs_feed_the_model_directly(tmp_path):
    """`model(**processor(images=..., candidate_labels=...))` works, as with SamModel: the size entries are ignored."""
    from PIL import Image as PILImage

    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMProcessor

    from .conftest import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "ckpt")
    model, processor = (
        PosSAMForPanopticSegmentation.from_pretrained(folder).eval(),
        PosSAMProcessor.from_pretrained(folder),
    )
    inputs = processor(images=PILImage.new("RGB", (60, 50)), candidate_labels=["cat", "sky"], return_tensors="pt")
    assert {"original_sizes", "reshaped_input_sizes"} <= set(inputs)
    with torch.no_grad():
        direct = model(**inputs)
        explicit = model(
            pixel_values=inputs["pixel_values"],
            pixel_mask=inputs["pixel_mask"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            synonym_mask=inputs["synonym_mask"],
        )
    torch.testing.assert_close(
        direct.class_queries_logits, explicit.class_queries_logits
    )  # reference: explicit inputs
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'.*mask_labels"):
        model(**inputs, labels=[0])  # still refused
