"""
Careless and hostile image inputs (issue 11, item 4: "no code execution, no silent garbage").

Every case either expects a ValueError whose message names the offending image (its index, or the path / URL) and
the problem, or compares the result with a reference: the same picture as uint8, or pixel values computed here from
the SAM formula `(pixel / 255 - mean) / std`. Pictures are made at the tiny target size (longest side 128), so that
most comparisons involve no resampling and can be exact.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from transformers_possam import PosSAMImageProcessor, PosSAMImageProcessorPil, PosSAMProcessor, clip_tokenizer_from_bpe

from .conftest import IMAGE_SIZE, save_tiny_checkpoint


BACKENDS = pytest.mark.parametrize(
    "backend", [PosSAMImageProcessor, PosSAMImageProcessorPil], ids=["torchvision", "pil"]
)
LABELS = ["cat", "dog", {"name": "sky", "isthing": False}]
# Pictures 96x128 already have the target longest side: no resampling, so conversions can be compared exactly.
HEIGHT, WIDTH = 96, IMAGE_SIZE
# One 8-bit level after normalization (std >= 0.224): the most a uint8 resize can differ from a float resize.
ONE_LEVEL = 1 / 255 / 0.224 + 1e-4
RESCALED_WARNING = "already rescaled"


def tiny_processor(backend: type, longest_edge: int = IMAGE_SIZE):
    """The image processor at the tiny checkpoint's size (or `longest_edge`), padded to a square."""
    return backend(size={"longest_edge": longest_edge}, pad_size={"height": longest_edge, "width": longest_edge})


def picture(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """A random uint8 RGB picture, (H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def sam_normalized(processor, rgb_in_units: np.ndarray) -> torch.Tensor:
    """Reference pixel values of an (H, W, 3) picture on the 0..255 scale: SAM's rescale and normalize, by hand."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float64).view(3, 1, 1)
    pixels = torch.from_numpy(np.asarray(rgb_in_units, dtype=np.float64)).permute(2, 0, 1)
    return ((pixels / 255 - mean) / std).float()


def image_area(pixel_values: torch.Tensor, index: int = 0, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """The unpadded part of image `index` in `pixel_values`."""
    return pixel_values[index, :, :height, :width]


def sizes(values) -> list[tuple[int, int]]:
    """`original_sizes` / `reshaped_input_sizes` as plain (height, width) tuples."""
    return [tuple(int(v) for v in size) for size in values]


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file of `image`, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("possam-tiny"))
    return pipeline("open-vocabulary-panoptic-segmentation", model=str(checkpoint))


# --- float pictures already in [0, 1]: detected, warned about, not divided by 255 a second time -------------------

UNIT_RANGE_FLOATS: dict[str, Callable[[np.ndarray], object]] = {
    "numpy_float32_hwc": lambda rgb: rgb.astype(np.float32) / 255,
    "numpy_float64_hwc": lambda rgb: rgb / 255.0,
    "torch_float32_chw": lambda rgb: torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,  # torchvision's to_tensor
}


@BACKENDS
@pytest.mark.parametrize("as_unit_float", UNIT_RANGE_FLOATS.values(), ids=UNIT_RANGE_FLOATS.keys())
def test_unit_range_float_equals_the_uint8_picture_with_a_warning(backend, as_unit_float):
    # expected: a "already rescaled" warning and the uint8 picture's pixel values (before: a nearly black image)
    processor, rgb = tiny_processor(backend), picture()
    with pytest.warns(UserWarning, match=RESCALED_WARNING):
        result = processor(as_unit_float(rgb), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(result, processor(rgb, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)


@BACKENDS
def test_unit_range_float_is_rescaled_once_when_resized(backend):
    # expected: equal to the same picture as float on 0..255 (exactly) and as uint8 (within one 8-bit level: the
    # torchvision backend resizes uint8 in 8 bits), 60x80 -> 96x128
    processor, rgb = tiny_processor(backend), picture(60, 80)
    with pytest.warns(UserWarning, match=RESCALED_WARNING):
        result = processor(rgb.astype(np.float32) / 255, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        result, processor(rgb.astype(np.float32), return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(result, processor(rgb, return_tensors="pt")["pixel_values"], atol=ONE_LEVEL, rtol=0)


@BACKENDS
def test_fractional_float_on_0_255_scale_is_rescaled_without_warning(backend):
    # expected: the SAM formula on the float values (the PIL backend rounds to 8 bits: within half a level); no warning
    processor = tiny_processor(backend)
    rgb = picture().astype(np.float32) * (254 / 255) + 0.25  # fractional, inside [0, 255]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = processor(rgb, return_tensors="pt")["pixel_values"]
    assert not [w for w in caught if RESCALED_WARNING in str(w.message)]
    tolerance = 1e-5 if backend is PosSAMImageProcessor else ONE_LEVEL / 2
    torch.testing.assert_close(image_area(result), sam_normalized(processor, rgb), atol=tolerance, rtol=0)


# --- 16-bit pictures ---------------------------------------------------------------------------------------------


@BACKENDS
def test_uint16_array_equals_pil_i16_and_the_16_bit_formula(backend):
    # expected: numpy uint16 == the same data as a PIL "I;16" image == SAM formula on value * 255 / 65535 (the PIL
    # backend works in 8 bits: within half a level)
    processor = tiny_processor(backend)
    gray16 = np.random.default_rng(1).integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    from_pil = processor(Image.fromarray(gray16), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(gray16, return_tensors="pt")["pixel_values"], from_pil, atol=0, rtol=0)
    reference = sam_normalized(processor, np.repeat(gray16[..., None] * (255 / 65535), 3, axis=-1))
    tolerance = 1e-5 if backend is PosSAMImageProcessor else ONE_LEVEL / 2
    torch.testing.assert_close(image_area(from_pil), reference, atol=tolerance, rtol=0)


def test_pipeline_16_bit_png_path_equals_the_pil_opened_file(segmenter, tmp_path):
    # expected: the path gives the pixel values of Image.open(path) (before: clipped to white by the RGB conversion)
    gray16 = np.random.default_rng(2).integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint16)
    path = tmp_path / "depth16.png"
    Image.fromarray(gray16).save(path)
    from_path = segmenter.preprocess(str(path))["pixel_values"]
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
        from_pil = segmenter.preprocess(opened)["pixel_values"]
    torch.testing.assert_close(from_path, from_pil, atol=0, rtol=0)
    reference = sam_normalized(segmenter.image_processor, np.repeat(gray16[..., None] * (255 / 65535), 3, axis=-1))
    torch.testing.assert_close(image_area(from_path), reference, atol=1e-5, rtol=0)


# --- NaN / inf ----------------------------------------------------------------------------------------------------


@BACKENDS
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "minus_inf"])
def test_non_finite_pixels_raise_naming_the_image(backend, bad_value):
    # expected: ValueError "Image 1 has NaN or infinite pixels: pixels must be finite" (before: NaN outputs or an
    # unrelated range error)
    broken = picture().astype(np.float32)
    broken[5, 7, 1] = bad_value
    with pytest.raises(ValueError, match="Image 1 has NaN or infinite pixels.*finite"):
        tiny_processor(backend)([picture(), broken])


def test_pipeline_non_finite_pixels_raise(segmenter):
    # expected: ValueError naming image 0 and NaN
    with pytest.raises(ValueError, match="Image 0 has NaN or infinite pixels"):
        segmenter(np.full((HEIGHT, WIDTH, 3), np.nan, np.float32), candidate_labels=LABELS)


# --- strips of extreme aspect: at least one pixel on the short side -----------------------------------------------

STRIP_COLOUR = (200, 100, 50)
STRIPS = {  # id: (picture of STRIP_COLOUR, (height, width), longest_edge)
    "pil_500x1_at_128": (lambda: Image.new("RGB", (500, 1), STRIP_COLOUR), (1, 500), 128),
    "pil_1x500_at_128": (lambda: Image.new("RGB", (1, 500), STRIP_COLOUR), (500, 1), 128),
    "numpy_hwc_500x1_at_128": (lambda: np.tile(np.uint8(STRIP_COLOUR), (500, 1, 1)), (500, 1), 128),
    "torch_chw_1x500_at_128": (
        lambda: torch.tensor(STRIP_COLOUR, dtype=torch.uint8)[:, None, None].expand(3, 1, 500),
        (1, 500),
        128,
    ),
    "pil_20000x20_at_1024": (lambda: Image.new("RGB", (20000, 20), STRIP_COLOUR), (20, 20000), 1024),
    "pil_20x20000_at_1024": (lambda: Image.new("RGB", (20, 20000), STRIP_COLOUR), (20000, 20), 1024),
    "pil_40000x10_at_1024": (lambda: Image.new("RGB", (40000, 10), STRIP_COLOUR), (10, 40000), 1024),
}


@BACKENDS
@pytest.mark.parametrize("make_strip, original, longest_edge", STRIPS.values(), ids=STRIPS.keys())
def test_extreme_aspect_strip_keeps_one_pixel_on_the_short_side(backend, make_strip, original, longest_edge):
    # expected: longest side -> longest_edge, short side max(1, round(short * scale)), pixel_mask covering exactly
    # that area, the strip's colour inside it (before: SizeDict(height=0) ValueError from the resize)
    processor = tiny_processor(backend, longest_edge)
    out = processor(make_strip(), return_tensors="pt")
    scale = longest_edge / max(original)
    expected = tuple(max(1, int(side * scale + 0.5)) for side in original)
    assert min(expected) == 1
    assert out["pixel_values"].shape == (1, 3, longest_edge, longest_edge)
    assert sizes(out["original_sizes"]) == [original] and sizes(out["reshaped_input_sizes"]) == [expected]
    assert int(out["pixel_mask"].sum()) == expected[0] * expected[1]
    assert out["pixel_mask"][0, : expected[0], : expected[1]].all()
    colour = sam_normalized(processor, np.full((*expected, 3), STRIP_COLOUR))
    torch.testing.assert_close(image_area(out["pixel_values"], 0, *expected), colour, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [(500, 1), (1, 500)], ids=["500x1", "1x500"])
def test_pipeline_strip_gives_masks_of_the_original_size(segmenter, size):
    # expected: semantic segments (one per label present, covering every pixel) with masks of the strip's size
    results = segmenter(Image.new("RGB", size, STRIP_COLOUR), candidate_labels=LABELS, subtask="semantic")
    assert results and all(segment["mask"].size == size for segment in results)
    covered = np.sum([np.asarray(segment["mask"]) > 0 for segment in results], axis=0)
    assert (covered == 1).all()


# --- inputs that are not usable images: ValueError naming the image and the problem --------------------------------

BAD_IMAGES = {  # id: (images argument, text the ValueError must contain)
    "empty_list": ([], "No image given"),
    "empty_tuple": ((), "No image given"),
    "none": (None, "None"),
    "list_with_none": ([picture(), None], "Image 1 is a NoneType"),
    "path_string": ("photo.png", "Image 0 is a str.*pipeline"),
    "bytes": (b"\x89PNG", "Image 0 is a bytes"),
    "nested_list": ([[picture()]], "Image 0 is a list"),
    "bool_array": (np.zeros((HEIGHT, WIDTH, 3), bool), "Image 0 has dtype bool"),
    "complex_array": (np.zeros((HEIGHT, WIDTH, 3), np.complex64), "Image 0 has dtype complex64"),
    "object_array": (np.zeros((HEIGHT, WIDTH, 3), object), "Image 0 has dtype object"),
    "bool_tensor": (torch.zeros(3, HEIGHT, WIDTH, dtype=torch.bool), "Image 0 has dtype bool"),
    "rank_0": (np.array(7, np.uint8), r"Image 0 has 0 dimension"),
    "rank_1": (np.zeros(30, np.uint8), r"Image 0 has 1 dimension"),
    "rank_5": (np.zeros((1, 2, 30, 40, 3), np.uint8), r"Image 0 has 5 dimension"),
    "zero_height": (np.zeros((0, 10, 3), np.uint8), r"Image 0 is empty"),
    "zero_width_gray": (np.zeros((10, 0), np.uint8), r"Image 0 is empty"),
    "zero_size_pil": (Image.new("RGB", (0, 5)), r"Image 0 is empty"),
    "empty_4d_batch": (np.zeros((0, 30, 40, 3), np.uint8), "No image given|empty"),
    "two_channels_hwc": (np.zeros((30, 40, 2), np.uint8), r"Image 0 has shape \(30, 40, 2\).*1, 3 or 4 channels"),
    "two_channels_chw": (np.zeros((2, 30, 40), np.uint8), r"Image 0 has shape \(2, 30, 40\).*1, 3 or 4 channels"),
    "five_channels": (np.zeros((30, 40, 5), np.uint8), r"Image 0 has shape \(30, 40, 5\).*1, 3 or 4 channels"),
    "int32_negative": (np.full((30, 40, 3), -5, np.int32), r"Image 0 has int32 pixels in \[-5, -5\].*\[0, 255\]"),
    "int32_above_255": (np.full((30, 40, 3), 1000, np.int32), r"Image 0 has int32 pixels in \[1000, 1000\]"),
    "int16_negative": ([picture(), np.full((30, 40, 3), -1, np.int16)], r"Image 1 has int16 pixels in \[-1, -1\]"),
    "float_negative": (
        -np.ones((30, 40, 3), np.float32),
        r"Image 0 has float pixels in \[-1, -1\].*\[0, 1\] or \[0, 255\]",
    ),
    "float_above_255": (np.full((30, 40, 3), 300.0), r"Image 0 has float pixels in \[300, 300\]"),
    "normalized_tensor": (
        torch.randn(3, 30, 40, generator=torch.Generator().manual_seed(0)),
        "Image 0 has float pixels.*not a normalized",
    ),
    # 32-bit "I" beyond 16 bits cannot be 8- or 16-bit data (within 0..65535 it is read as 16-bit: see the PGM case)
    "pil_mode_I_above_16_bit": (
        Image.fromarray(np.full((30, 40), 70000, np.int32)),
        r"Image 0 has int32 pixels in \[70000, 70000\]",
    ),
}


@BACKENDS
@pytest.mark.parametrize("images, message", BAD_IMAGES.values(), ids=BAD_IMAGES.keys())
def test_unusable_image_raises_value_error_naming_it(backend, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_processor(backend)(images)


@BACKENDS
def test_truncated_png_opened_lazily_raises_naming_the_image(backend):
    # expected: ValueError "Image 0 ... could not be decoded" (before: PIL's OSError from deep inside the conversion)
    data = png_bytes(Image.fromarray(picture()))
    truncated = Image.open(io.BytesIO(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="Image 0 .*could not be decoded"):
        tiny_processor(backend)(truncated)


# --- documented conversions: the result equals the plain uint8 picture --------------------------------------------


def rgba_with_transparent_left_half(dtype_scale: float, dtype) -> np.ndarray:
    """96x128 RGBA picture: left half fully transparent, right half opaque; on the 0..dtype_scale scale."""
    rgba = np.concatenate([picture(), np.full((HEIGHT, WIDTH, 1), 255, np.uint8)], axis=-1)
    rgba[:, : WIDTH // 2, 3] = 0
    return (rgba.astype(np.float64) * dtype_scale / 255).astype(dtype)


def white_left_half(rgb: np.ndarray) -> np.ndarray:
    """`rgb` with its left half white: what `rgba_with_transparent_left_half` looks like composited on white."""
    composited = rgb.copy()
    composited[:, : WIDTH // 2] = 255
    return composited


def dim_gray() -> np.ndarray:
    """A uint8 grayscale picture with values 0..200 (not reaching 255, so a stretch to the maximum would show)."""
    return (picture()[..., 0].astype(np.int32) * 200 // 255).astype(np.uint8)


def sixteen_bit_pgm(gray: np.ndarray) -> Image.Image:
    """`gray` * 257 (exactly 0..65535) as a 16-bit PGM file, reopened: Pillow gives it mode "I" (32-bit)."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buffer, format="PPM")
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    assert image.mode == "I"
    return image


CONVERSIONS = {  # id: (input, reference uint8 RGB picture it must equal)
    "int64_in_0_255": (picture().astype(np.int64), picture()),
    "float_integers_0_255": (picture().astype(np.float32), picture()),
    "grayscale_2d": (picture()[..., 0], np.repeat(picture()[..., :1], 3, axis=-1)),
    "grayscale_hw1": (picture()[..., :1], np.repeat(picture()[..., :1], 3, axis=-1)),
    "uint8_rgba_on_white": (rgba_with_transparent_left_half(255, np.uint8), white_left_half(picture())),
    "float_unit_rgba_on_white": (rgba_with_transparent_left_half(1.0, np.float32), white_left_half(picture())),
    "uint8_chw_tensor": (torch.from_numpy(picture()).permute(2, 0, 1), picture()),
    "flipped_view": (picture()[::-1, ::-1], np.ascontiguousarray(picture()[::-1, ::-1])),
    "grad_tensor": (torch.from_numpy(picture()).permute(2, 0, 1).float().requires_grad_(), picture()),
    "bfloat16_tensor": (
        torch.from_numpy(picture()).permute(2, 0, 1).to(torch.bfloat16),
        picture(),
    ),  # 0..255 exact in bf16
    "pil_mode_I_in_0_200": (
        Image.fromarray(dim_gray().astype(np.int32)),
        np.repeat(dim_gray()[..., None], 3, axis=-1),
    ),
    "pil_mode_F_in_0_1": (
        Image.fromarray(dim_gray().astype(np.float32) / 255),
        np.repeat(dim_gray()[..., None], 3, axis=-1),
    ),
    # a 16-bit PGM (Pillow: mode "I"): 16-bit data, scaled by 255 / 65535 back to the 8-bit picture exactly
    "pil_mode_I_16bit_pgm": (sixteen_bit_pgm(picture()[..., 0]), np.repeat(picture()[..., :1], 3, axis=-1)),
}


@BACKENDS
@pytest.mark.parametrize("image, reference", CONVERSIONS.values(), ids=CONVERSIONS.keys())
def test_documented_conversion_equals_the_uint8_picture(backend, image, reference):
    # expected: the pixel values of the reference uint8 RGB picture (float [0, 1] inputs warn, checked above)
    processor = tiny_processor(backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + RESCALED_WARNING)
        result = processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(result, processor(reference, return_tensors="pt")["pixel_values"], atol=1e-4, rtol=0)


def pictures_one_by_one(processor, *rgbs: np.ndarray) -> torch.Tensor:
    """Reference for batches: each picture through the processor alone, stacked."""
    return torch.cat([processor(rgb, return_tensors="pt")["pixel_values"] for rgb in rgbs])


@BACKENDS
def test_4d_arrays_are_batches(backend):
    # expected: a 4-D array is a batch (transformers' make_flat_list_of_images) and a list of 4-D arrays is
    # flattened: both equal the pictures processed one by one
    processor, first, second = tiny_processor(backend), picture(seed=1), picture(seed=2)
    one_by_one = pictures_one_by_one(processor, first, second)
    torch.testing.assert_close(
        processor(np.stack([first, second]), return_tensors="pt")["pixel_values"], one_by_one, atol=0, rtol=0
    )
    torch.testing.assert_close(
        processor([np.stack([first]), np.stack([second])], return_tensors="pt")["pixel_values"],
        one_by_one,
        atol=0,
        rtol=0,
    )


@BACKENDS
def test_batch_mixing_uint8_and_unit_float_gives_each_picture_its_result(backend):
    # expected: the [0, 1] float picture is not rescaled twice because a uint8 one shares its batch
    processor, first, second = tiny_processor(backend), picture(seed=1), picture(seed=2)
    with pytest.warns(UserWarning, match=RESCALED_WARNING):
        mixed = processor([first, second.astype(np.float32) / 255], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(mixed, pictures_one_by_one(processor, first, second), atol=1e-5, rtol=0)


CUBE = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) * 9  # first and last axes could both be the channels


@BACKENDS
def test_ambiguous_3x3x3_reads_channels_first_unless_told(backend):
    # expected (transformers' rule): channels first; input_data_format="channels_last" gives the other reading, equal
    # to the transposed array read as channels first
    processor = tiny_processor(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ambiguity warning is checked below
        default = processor(CUBE, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        default,
        processor(CUBE, input_data_format="channels_first", return_tensors="pt")["pixel_values"],
        atol=0,
        rtol=0,
    )
    channels_last = processor(CUBE, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
    transposed = processor(np.moveaxis(CUBE, -1, 0), input_data_format="channels_first", return_tensors="pt")[
        "pixel_values"
    ]
    torch.testing.assert_close(channels_last, transposed, atol=0, rtol=0)
    assert not torch.equal(default, channels_last)


def test_ambiguous_3x3x3_warning_names_the_image():
    # expected: a UserWarning naming image 1, its shape and the reading chosen (transformers logs one without either)
    with pytest.warns(UserWarning, match=r"Image 1 has shape \(3, 3, 3\).*channels first.*input_data_format"):
        tiny_processor(PosSAMImageProcessor)([picture(), CUBE])


def test_explicit_input_data_format_with_wrong_channel_count_raises():
    # expected: ValueError naming image 0 and its 5 channels
    with pytest.raises(ValueError, match=r"Image 0 has 5 channels"):
        tiny_processor(PosSAMImageProcessor)(np.zeros((30, 40, 5), np.uint8), input_data_format="channels_last")


# --- through PosSAMProcessor -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def possam_processor():
    return PosSAMProcessor(tiny_processor(PosSAMImageProcessor), clip_tokenizer_from_bpe())


def test_processor_unit_float_equals_uint8(possam_processor):
    # expected: the uint8 picture's pixel values, with the warning
    with pytest.warns(UserWarning, match=RESCALED_WARNING):
        result = possam_processor(images=picture() / 255.0, candidate_labels=LABELS, return_tensors="pt")[
            "pixel_values"
        ]
    torch.testing.assert_close(
        result, possam_processor(images=picture(), return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "No image given"),
        ([picture(), np.full((30, 40, 3), np.nan, np.float32)], "Image 1 has NaN or infinite pixels"),
        (np.zeros((30, 40, 3), bool), "Image 0 has dtype bool"),
    ],
    ids=["empty_list", "nan_second_image", "bool_array"],
)
def test_processor_bad_images_raise(possam_processor, images, message):
    with pytest.raises(ValueError, match=message):
        possam_processor(images=images, candidate_labels=LABELS)


# --- pipeline: sources that are not images ----------------------------------------------------------------------


def write_file(directory, name: str, content: bytes) -> str:
    """Writes `content` to `directory / name`; returns the path as a string, as a user would pass it."""
    path = directory / name
    path.write_bytes(content)
    return str(path)


def make_directory(parent, name: str) -> str:
    """Creates the directory `parent / name`; returns its path as a string."""
    path = parent / name
    path.mkdir()
    return str(path)


PIPELINE_BAD_SOURCES = {  # id: (function of tmp_path -> pipeline input, text the ValueError must contain)
    "missing_path": (lambda tmp: str(tmp / "missing.png"), "missing.png"),
    "directory": (lambda tmp: make_directory(tmp, "holiday_photos"), "holiday_photos.*it is a directory"),
    "text_file": (lambda tmp: write_file(tmp, "notes.png", b"not an image"), "notes.png.*cannot identify"),
    "empty_file": (lambda tmp: write_file(tmp, "empty.png", b""), "empty.png"),
    "truncated_png": (lambda tmp: write_file(tmp, "cut.png", png_bytes(Image.fromarray(picture()))[:300]), "cut.png"),
    "offline_url": (lambda tmp: "http://127.0.0.1:9/street.png", r"http://127\.0\.0\.1:9/street\.png"),
    "bytes": (lambda tmp: png_bytes(Image.fromarray(picture())), "Cannot segment a bytes"),
    "none": (lambda tmp: None, r"No image given \(images=None\)"),
    "batch_4d_array": (lambda tmp: np.zeros((2, 30, 40, 3), np.uint8), r"4-D array \(2, 30, 40, 3\).*list"),
}


@pytest.mark.parametrize("make_input, message", PIPELINE_BAD_SOURCES.values(), ids=PIPELINE_BAD_SOURCES.keys())
def test_pipeline_unreadable_source_raises_value_error_naming_it(segmenter, tmp_path, make_input, message):
    with pytest.raises(ValueError, match=message):
        segmenter(make_input(tmp_path), candidate_labels=LABELS, timeout=5)


def test_pipeline_unit_float_array_equals_the_uint8_picture(segmenter):
    # expected: the uint8 picture's model inputs, with the warning
    with pytest.warns(UserWarning, match=RESCALED_WARNING):
        from_float = segmenter.preprocess(picture().astype(np.float32) / 255)
    from_uint8 = segmenter.preprocess(picture())
    torch.testing.assert_close(from_float["pixel_values"], from_uint8["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(from_float["reshaped_input_sizes"], from_uint8["reshaped_input_sizes"])
