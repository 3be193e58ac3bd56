"""
`transformers_possam.visualization`: pictures of segmentation results.

The expected values come from the inputs built here (segments drawn as known rectangles / stripes), from the WCAG 2.x
contrast formula (https://www.w3.org/TR/WCAG21/#dfn-contrast-ratio, checked on its published endpoints) and from the
documented layout (the picture is the output's top rows, the legend below), never from the drawing code itself.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import transformers_possam
from transformers_possam import PosSAMImageProcessor
from transformers_possam.visualization import (
    PALETTE,
    contrast_ratio,
    draw_segmentation,
    label_colour,
    legend_entries,
    segments_from_result,
    side_by_side,
    text_colour,
)


NAMES = ["person", "car", "sky", "road"]
HEIGHT, WIDTH = 40, 64


def picture(seed=0, height=HEIGHT, width=WIDTH):
    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8))


def panoptic_result():
    """Three segments on known rectangles (ids 1, 2, 5), the rest of the image unsegmented (id 0)."""
    segmentation = torch.zeros(HEIGHT, WIDTH, dtype=torch.int32)
    segmentation[:10, :] = 1  # sky band on top
    segmentation[20:35, 5:20] = 2  # a person
    segmentation[20:35, 30:50] = 5  # a car
    segments_info = [
        {"id": 1, "label_id": 2, "was_fused": True, "score": 0.9},
        {"id": 2, "label_id": 0, "was_fused": False, "score": 0.8},
        {"id": 5, "label_id": 1, "was_fused": False, "score": 0.7},
    ]
    return {"segmentation": segmentation, "segments_info": segments_info}


def legend_region(drawn, scale=1):
    return np.asarray(drawn)[HEIGHT * scale :]


# ---------------------------------------------------------------------------------------------------------------------
# colours and contrast


def test_contrast_ratio_matches_wcag_endpoints():
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((123, 45, 67), (123, 45, 67)) == pytest.approx(1.0)
    # WCAG's worked value: #777777 on white is 4.48:1 (just below AA)
    assert contrast_ratio((0x77, 0x77, 0x77), (255, 255, 255)) == pytest.approx(4.48, abs=0.01)


@pytest.mark.parametrize("colour", PALETTE)
def test_tag_text_contrast_passes_wcag_aa_for_every_palette_colour(colour):
    assert contrast_ratio(text_colour(colour), colour) >= 4.5


def test_never_white_on_yellow():
    yellow = (243, 195, 0)
    assert contrast_ratio((255, 255, 255), yellow) < 4.5  # white on yellow would be unreadable
    assert text_colour(yellow) == (0, 0, 0)


def test_palette_colours_are_distinct_and_not_grey():
    assert len(set(PALETTE)) == len(PALETTE) >= 16
    for colour in PALETTE:
        assert max(colour) - min(colour) > 20, f"{colour} is greyish: it would read as 'no colour'"


def test_colour_is_consistent_per_label():
    assert label_colour("car", 1) == label_colour("car", 1) == PALETTE[1]
    assert label_colour("lighthouse") == label_colour("lighthouse")  # by name when no class index is known
    assert len({label_colour(name, index) for index, name in enumerate(NAMES)}) == len(NAMES)


# ---------------------------------------------------------------------------------------------------------------------
# the picture


def test_legend_lists_exactly_the_drawn_labels():
    result = panoptic_result()
    entries = legend_entries(segments_from_result(result, NAMES))
    # read off panoptic_result by hand, ordered by class index
    assert [name for name, _ in entries] == ["person", "car", "sky"]
    drawn = np.asarray(draw_segmentation(picture(), result, NAMES, scale=1))
    legend = legend_region(drawn).reshape(-1, 3)
    present = {tuple(colour) for colour in legend.tolist()}
    for index, name in enumerate(NAMES):
        swatch = PALETTE[index]
        assert (swatch in present) == (name in {"person", "car", "sky"}), name


@pytest.mark.parametrize("scale", [1, 3])
def test_pixels_outside_every_segment_are_the_input_image(scale):
    image = picture()
    result = panoptic_result()
    drawn = draw_segmentation(image, result, NAMES, scale=scale, show_tags=False)
    assert drawn.width == WIDTH * scale
    region = np.asarray(drawn)[: HEIGHT * scale]
    expected = np.asarray(image).repeat(scale, 0).repeat(scale, 1)
    unsegmented = (result["segmentation"] == 0).numpy().repeat(scale, 0).repeat(scale, 1)
    assert unsegmented.any()
    np.testing.assert_array_equal(region[unsegmented], expected[unsegmented])
    assert (region[~unsegmented] != expected[~unsegmented]).any(axis=-1).mean() > 0.9  # segments are tinted


def test_pixels_far_from_segments_are_untouched_with_tags_on():
    image = picture(height=200, width=300)
    segmentation = torch.zeros(200, 300, dtype=torch.int32)
    segmentation[90:110, 140:160] = 1
    result = {"segmentation": segmentation, "segments_info": [{"id": 1, "label_id": 0, "score": 0.5}]}
    drawn = np.asarray(draw_segmentation(image, result, NAMES, scale=1))[:200]
    far = np.ones((200, 300), bool)
    far[60:140, 70:230] = False  # the segment with a generous margin for its tag
    np.testing.assert_array_equal(drawn[far], np.asarray(image)[far])


def test_contours_on_segment_borders():
    grey = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))
    result = panoptic_result()
    alpha = 0.6
    drawn = np.asarray(draw_segmentation(grey, result, NAMES, scale=1, alpha=alpha, show_tags=False))[:HEIGHT]
    drawn = drawn.astype(int)
    segmentation = result["segmentation"].numpy()
    for info in result["segments_info"]:
        mask = segmentation == info["id"]
        padded = np.pad(mask, 1, mode="edge")  # the image's edge is no border
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        border = mask & ~inner
        deep = mask.copy()
        for _ in range(2):
            padded = np.pad(deep, 1, mode="edge")
            deep = deep & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        colour = np.array(PALETTE[info["label_id"]])
        tint = np.rint((1 - alpha) * 128 + alpha * colour)  # a grey image stays grey under the tint's grey base
        assert border.any() and deep.any()
        np.testing.assert_allclose(drawn[deep], np.broadcast_to(tint, drawn[deep].shape), atol=1)
        # every border pixel is drawn darker than the segment's fill: a visible contour all around
        assert (drawn[border].sum(-1) < tint.sum() - 30).all()


def test_tags_are_drawn_in_the_contrasting_text_colour():
    result = panoptic_result()
    drawn = np.asarray(draw_segmentation(picture(), result, NAMES, scale=4))[: HEIGHT * 4]
    for info in result["segments_info"]:
        background = PALETTE[info["label_id"]]
        ys, xs = np.nonzero((drawn == background).all(-1))  # the tag's opaque box
        assert len(ys) > 50, f"no tag box for {NAMES[info['label_id']]}"
        box = drawn[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        ink = text_colour(background)
        near_ink = [contrast_ratio(pixel, ink) < 1.5 for pixel in box.reshape(-1, 3).tolist()]
        assert sum(near_ink) > 20  # the glyphs are drawn in the chosen colour


def stripe_outputs(num_classes):
    """Model outputs whose query q covers the q-th of 4 vertical stripes of the padded input, confidently class q."""
    queries, size = 4, 32
    stripe = torch.arange(size) * queries // size
    masks = torch.where(stripe[None, :] == torch.arange(queries)[:, None], 12.0, -12.0)
    masks = masks[:, None, :].expand(queries, size, size)
    logits = torch.full((queries, num_classes + 1), -10.0)
    logits[torch.arange(queries), torch.arange(queries)] = 10.0
    return SimpleNamespace(
        class_queries_logits=logits[None],
        clip_class_logits=logits[None, :, :num_classes],
        masks_queries_logits=masks[None],
        iou_scores=torch.ones(1, queries),
    )


@pytest.mark.parametrize("kind", ["panoptic", "instance", "semantic", "pipeline"])
def test_every_result_kind_is_drawn(kind):
    processor = PosSAMImageProcessor()
    outputs = stripe_outputs(len(NAMES))
    sizes = {"target_sizes": [(32, 32)], "reshaped_input_sizes": [(1024, 1024)]}  # no padding
    image = picture(height=32, width=32)
    if kind == "panoptic":
        result = processor.post_process_panoptic_segmentation(outputs, label_ids_to_fuse=[2, 3], **sizes)[0]
    elif kind == "instance":
        result = processor.post_process_instance_segmentation(outputs, **sizes)[0]
    elif kind == "semantic":
        result = processor.post_process_semantic_segmentation(outputs, **sizes)[0]
    else:
        columns = np.arange(32) * 4 // 32
        result = [
            {
                "score": 0.9,
                "label": name,
                "mask": Image.fromarray(np.where(columns == q, 255, 0).astype(np.uint8)[None].repeat(32, 0)),
            }
            for q, name in enumerate(NAMES)
        ]
    segments = segments_from_result(result, NAMES)
    assert sorted(segment.label for segment in segments) == sorted(NAMES)  # each stripe's class, by construction
    for segment in segments:
        q = NAMES.index(segment.label)
        np.testing.assert_array_equal(segment.mask.any(0), np.arange(32) * 4 // 32 == q)
    drawn = draw_segmentation(image, result, NAMES, scale=2)
    assert drawn.width == 64 and drawn.height > 64
    assert [name for name, _ in legend_entries(segments)] == NAMES


def test_pipeline_output_without_labels_uses_stable_colours():
    mask = Image.fromarray(np.pad(np.full((10, 10), 255, np.uint8), ((5, 25), (5, 49))))
    segments = segments_from_result([{"score": None, "label": "lighthouse", "mask": mask}])
    assert legend_entries(segments) == [("lighthouse", label_colour("lighthouse"))]
    draw_segmentation(picture(), [{"score": None, "label": "lighthouse", "mask": mask}], scale=1)


def test_side_by_side():
    panel = side_by_side([picture(), picture(1)], ["input", "prediction"], gap=4)
    assert panel.width == 2 * WIDTH + 3 * 4 and panel.height > HEIGHT
    with pytest.raises(ValueError, match="one title per picture"):
        side_by_side([picture()], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        side_by_side([])


def test_exported_from_the_package():
    assert transformers_possam.draw_segmentation is draw_segmentation
    assert transformers_possam.side_by_side is side_by_side


# ---------------------------------------------------------------------------------------------------------------------
# hostile inputs


def test_empty_result_leaves_the_image_as_is():
    image = picture()
    empty = {"segmentation": torch.zeros(HEIGHT, WIDTH, dtype=torch.int32), "segments_info": []}
    for result in (empty, []):
        drawn = draw_segmentation(image, result, NAMES, scale=1)
        np.testing.assert_array_equal(np.asarray(drawn)[:HEIGHT], np.asarray(image))
        assert legend_entries(segments_from_result(result, NAMES)) == []


def test_mismatched_sizes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"40x64 \(H x W\) but the image is 50x64.*target_sizes"):
        draw_segmentation(picture(height=50), panoptic_result(), NAMES)
    with pytest.raises(ValueError, match="but the image is"):
        draw_segmentation(picture(height=50), torch.zeros(HEIGHT, WIDTH, dtype=torch.long), NAMES)


@pytest.mark.parametrize(
    "result, labels, error, match",
    [
        (panoptic_result(), None, ValueError, "pass `labels`"),
        (panoptic_result(), ["person"], ValueError, "class index 2.*no entry"),
        ({"segmentation": torch.zeros(HEIGHT, WIDTH)}, NAMES, ValueError, "'segments_info'"),
        ({"segmentation": torch.zeros(3, HEIGHT, WIDTH), "segments_info": []}, NAMES, ValueError, r"\(H, W\)"),
        (torch.zeros(HEIGHT, WIDTH), NAMES, ValueError, "integer class-id map"),
        (torch.full((HEIGHT, WIDTH), 7), NAMES, ValueError, "class index 7"),
        ([[{"label": "a", "mask": None}]], NAMES, ValueError, "draw each image's list separately"),
        ("segments", NAMES, TypeError, "result must be"),
        (panoptic_result(), "person", TypeError, "labels must be"),
    ],
)
def test_bad_results_are_clear_errors(result, labels, error, match):
    with pytest.raises(error, match=match):
        draw_segmentation(picture(), result, labels)


def test_bad_image_and_options_are_clear_errors():
    with pytest.raises(TypeError, match="image must be"):
        draw_segmentation(np.zeros((HEIGHT, WIDTH, 3), np.float32), panoptic_result(), NAMES)
    with pytest.raises(ValueError, match="alpha"):
        draw_segmentation(picture(), panoptic_result(), NAMES, alpha=0)
    with pytest.raises(ValueError, match="scale"):
        draw_segmentation(picture(), panoptic_result(), NAMES, scale=0)


def test_semantic_ignore_index_is_left_clear():
    image = picture()
    class_map = torch.full((HEIGHT, WIDTH), 255)
    class_map[:, :10] = 3
    drawn = np.asarray(draw_segmentation(image, class_map, NAMES, scale=1, show_tags=False, ignore_index=255))
    np.testing.assert_array_equal(drawn[:HEIGHT, 20:], np.asarray(image)[:, 20:])


def test_demo_prediction_panel_shows_input_prediction_and_ground_truth(monkeypatch):
    """`make demo`'s prediction.png: input | prediction | ground truth, with one colour per class in both pictures."""
    from .conftest import REPOSITORY

    monkeypatch.syspath_prepend(str(REPOSITORY / "training"))
    demo = pytest.importorskip("demo")
    from transformers_possam.data import TOY_CATEGORIES, toy_panoptic_rows

    row = next(iter(toy_panoptic_rows(1, seed=0, split="validation")))
    names = [category["name"].split(",")[0] for category in TOY_CATEGORIES]
    ground_truth = demo.ground_truth_result(row)
    # a perfect prediction (no scores) must be drawn exactly as the ground truth
    panel = np.asarray(demo.prediction_panel(row["image"], ground_truth, ground_truth, names))
    scale = 4  # 128 px toy images are drawn at least 480 px wide
    side = 128 * scale
    assert panel.shape[1] == 3 * side + 4 * 12
    pictures = [panel[:, 12 + index * (side + 12) : 12 + index * (side + 12) + side] for index in range(3)]
    # the pictures start below the titles: the input's first row is the image's (the panel's background is white)
    first_row = np.nonzero((pictures[0] != 255).any(-1).sum(-1) > side // 2)[0][0]
    np.testing.assert_array_equal(pictures[1][first_row:], pictures[2][first_row:])
    expected_input = np.asarray(row["image"]).repeat(scale, 0).repeat(scale, 1)
    np.testing.assert_array_equal(pictures[0][first_row : first_row + side], expected_input)
    assert not np.array_equal(pictures[1][first_row : first_row + side], expected_input)  # segments drawn


def test_overlapping_pipeline_instances_higher_score_on_top():
    grey = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 128))

    def mask(rows, columns):
        pixels = np.zeros((HEIGHT, WIDTH), np.uint8)
        pixels[rows, columns] = 255
        return Image.fromarray(pixels)

    result = [  # as the pipeline returns them: by score, highest first
        {"score": 0.9, "label": "person", "mask": mask(slice(10, 30), slice(10, 30))},
        {"score": 0.5, "label": "car", "mask": mask(slice(0, HEIGHT), slice(0, WIDTH))},
        {"score": 0.1, "label": "sky", "mask": mask(slice(12, 20), slice(12, 20))},  # under both: hidden
    ]
    alpha = 0.6
    drawn = np.asarray(draw_segmentation(grey, result, NAMES, scale=1, alpha=alpha, show_tags=False))[:HEIGHT]
    tint = {name: np.rint((1 - alpha) * 128 + alpha * np.array(PALETTE[NAMES.index(name)])) for name in NAMES}
    np.testing.assert_allclose(drawn[20, 20], tint["person"], atol=1)  # inside the high-score instance
    np.testing.assert_allclose(drawn[5, 50], tint["car"], atol=1)
    entries = [name for name, _ in legend_entries(segments_from_result(result, NAMES))]
    assert entries == ["person", "car", "sky"]  # what the result holds ...
    drawn_full = draw_segmentation(grey, result, NAMES, scale=1)
    legend = {tuple(colour) for colour in legend_region(drawn_full).reshape(-1, 3).tolist()}
    assert PALETTE[NAMES.index("sky")] not in legend  # ... but a hidden instance is not listed in the picture
    assert {PALETTE[0], PALETTE[1]} <= legend and drawn_full.width == WIDTH
