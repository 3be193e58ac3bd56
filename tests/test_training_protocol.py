"""
The training data path follows FC-CLIP's mapper exactly, checked on the real COCO sample against a transcription of
detectron2's transforms (the reference), plus the training labels' validation and the optimizer recipe.

Reference transforms (facebookresearch/detectron2, `detectron2/data/transforms/augmentation_impl.py` and
`transform.py`, as FC-CLIP's `coco_panoptic_new_baseline_dataset_mapper.py` chains them):
RandomFlip (p = 0.5) -> ResizeScale(0.1, 2.0, target) -> FixedSizeCrop(target, pad=True); uint8 images and the RGB
panoptic PNG are resized through PIL (bilinear / nearest); then `rgb2id`, one mask per non-crowd segment.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import IterableDataset
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, tiny_config
from transformers_possam.data import decode_panoptic_sample, large_scale_jitter
from transformers_possam.data.stream import PanopticTrainStream
from transformers_possam.image_processing_possam import encode_panoptic_annotation


SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-panoptic-sample"
if not SAMPLE.is_dir():  # a clone elsewhere: the workspace's shared folder
    SAMPLE = Path("/work/shared/data/coco-panoptic-sample")


def coco_rows() -> list[dict]:
    """The two real COCO val2017 samples in the training schema (encoded bytes, as parquet holds them)."""
    annotations = json.loads((SAMPLE / "panoptic_examples.json").read_text())
    images = {image["id"]: image for image in annotations["images"]}
    return [
        {
            "image": {
                "bytes": (SAMPLE / "input_images" / images[a["image_id"]]["file_name"]).read_bytes(),
                "path": None,
            },
            "label": {"bytes": (SAMPLE / "panoptic_examples" / a["file_name"]).read_bytes(), "path": None},
            "image_id": str(a["image_id"]),
            "segments_info": a["segments_info"],
        }
        for a in annotations["annotations"]
    ]


def coco_label_map() -> dict[int, int]:
    categories = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
    return {c["id"]: index for index, c in enumerate(categories)}


class ScriptedGenerator:
    """Stands in for `np.random.Generator`, returning chosen draws: random() -> flip draw, uniform(a, b) -> a + (b - a) * u."""

    def __init__(self, flip_draw: float, scale_unit: float, crop_unit: float):
        self.flip_draw, self.units = flip_draw, [scale_unit, crop_unit]

    def random(self):
        return self.flip_draw

    def uniform(self, low=0.0, high=1.0):
        return low + (high - low) * self.units.pop(0)


def detectron2_lsj(
    image: np.ndarray, panoptic_rgb: np.ndarray, flip: bool, scale: float, crop_unit: float, target: int
):
    """
    Transcription of detectron2's RandomFlip -> ResizeScale -> FixedSizeCrop on (uint8 image, uint8 RGB PNG).
    Returns the cropped image, the cropped id map (rgb2id) and the (height, width) before padding.
    """
    if flip:  # HFlipTransform: np.flip(img, axis=1)
        image, panoptic_rgb = np.flip(image, axis=1), np.flip(panoptic_rgb, axis=1)
    # ResizeScale._get_resize
    input_size = image.shape[:2]
    target_scale_size = np.multiply((target, target), scale)
    output_scale = np.minimum(target_scale_size[0] / input_size[0], target_scale_size[1] / input_size[1])
    new_h, new_w = np.round(np.multiply(input_size, output_scale)).astype(int)
    # ResizeTransform.apply_image / apply_segmentation (uint8 -> PIL; NEAREST for the segmentation)
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((int(new_w), int(new_h)), Image.BILINEAR))
    panoptic_rgb = np.asarray(
        Image.fromarray(np.ascontiguousarray(panoptic_rgb)).resize((int(new_w), int(new_h)), Image.NEAREST)
    )
    # FixedSizeCrop._get_crop: one uniform draw scales both offsets
    max_offset = np.maximum(np.subtract((new_h, new_w), (target, target)), 0)
    top, left = np.round(np.multiply(max_offset, crop_unit)).astype(int)
    image = image[top : top + target, left : left + target]
    panoptic_rgb = panoptic_rgb[top : top + target, left : left + target]
    return image, rgb2id(panoptic_rgb), image.shape[:2]


@pytest.mark.parametrize(
    "flip,scale_unit,crop_unit", [(False, 0.0, 0.5), (True, 0.2, 0.9), (False, 0.55, 0.3), (True, 0.99, 0.0)]
)
def test_jitter_equals_detectron2_on_real_coco(flip, scale_unit, crop_unit):
    """Same draws -> the same pixels and the same segment ids as detectron2's transforms (scales 0.1 .. 2.0)."""
    target = 256
    for row in coco_rows():
        image, ids, _ = decode_panoptic_sample(row)
        panoptic_rgb = np.asarray(Image.open(__import__("io").BytesIO(row["label"]["bytes"])).convert("RGB"))
        ours_image, ours_ids = large_scale_jitter(
            image, ids, ScriptedGenerator(0.0 if flip else 0.9, scale_unit, crop_unit), target_size=target
        )
        scale = 0.1 + 1.9 * scale_unit
        ref_image, ref_ids, _ = detectron2_lsj(np.asarray(image), panoptic_rgb, flip, scale, crop_unit, target)
        assert np.array_equal(np.asarray(ours_image), ref_image)
        assert np.array_equal(ours_ids, ref_ids)


def image_processor(size=256):
    return PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})


def stream_of(rows, **kwargs):
    dataset = IterableDataset.from_generator(lambda: iter(rows))
    return PanopticTrainStream(dataset, image_processor(), coco_label_map(), shuffle_buffer=0, **kwargs)


def test_stream_sample_is_fcclip_mapper_output_on_real_coco():
    """
    Each streamed sample = detectron2's jitter (same draws as the stream's generator for that sample), normalized and
    padded only (never resized again), with one target per non-crowd segment (empty where the crop removed it).
    """
    rows = coco_rows()
    stream = stream_of(rows * 4, seed=7)
    iterator = iter(stream)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    empty_targets = 0
    for index in range(8):
        sample = next(iterator)
        row = rows[index % 2]
        image, _, segments = decode_panoptic_sample(row)
        # the stream's per-sample generator, drawn in the order flip, scale, crop offset
        generator = np.random.default_rng([7, 0, 0, 0, index])  # (seed, epoch, rank, shard, row of the shard)
        flip_draw, scale, crop_unit = generator.random(), generator.uniform(0.1, 2.0), generator.uniform(0.0, 1.0)
        panoptic_rgb = np.asarray(Image.open(__import__("io").BytesIO(row["label"]["bytes"])).convert("RGB"))
        ref_image, ref_ids, (height, width) = detectron2_lsj(
            np.asarray(image), panoptic_rgb, flip_draw < 0.5, scale, crop_unit, 256
        )
        # pixel_mask covers exactly the jittered image: min(s, 1)^2 of the canvas for square crops
        expected_mask = np.zeros((256, 256), np.int64)
        expected_mask[:height, :width] = 1
        assert np.array_equal(sample["pixel_mask"].numpy(), expected_mask)
        pixels = sample["pixel_values"].numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(pixels[:height, :width], (ref_image / 255.0 - mean) / std, atol=1e-5)
        assert not pixels[height:].any() and not pixels[:, width:].any()
        # FC-CLIP's targets: every non-crowd segment in segments_info order, mask = (id map == id), padding = background
        kept = [s for s in segments if not s["iscrowd"]]
        assert sample["class_labels"].tolist() == [coco_label_map()[s["category_id"]] for s in kept]
        expected = np.zeros((len(kept), 256, 256), np.uint8)
        for k, segment in enumerate(kept):
            expected[k, :height, :width] = ref_ids == segment["id"]
        assert np.array_equal(sample["mask_labels"].numpy(), expected)
        empty_targets += int((expected.reshape(len(kept), -1).sum(1) == 0).sum())
    assert empty_targets > 0  # some crops removed segments, which kept empty targets
    # the flag drops them instead
    dropping = next(iter(stream_of(rows, seed=7, drop_cropped_segments=True)))
    assert (dropping["mask_labels"].reshape(len(dropping["mask_labels"]), -1).sum(1) > 0).all()


def test_zoomed_out_samples_stay_small_on_the_canvas():
    """s ~ U(0.1, 2): on square images the valid area is min(s, 1)^2 of the canvas, < 1/2 in ~1/3 of the samples."""
    square = np.zeros((64, 64), np.int64)
    square[16:48, 16:48] = 5
    picture = Image.fromarray(np.full((64, 64, 3), 90, np.uint8))
    row = {
        "image": picture,
        "label": Image.fromarray(id2rgb(square)),
        "image_id": "square",
        "segments_info": [{"id": 5, "category_id": 1, "iscrowd": 0}],
    }
    stream = iter(
        PanopticTrainStream(
            IterableDataset.from_generator(lambda: iter([row] * 300)), image_processor(64), {1: 0}, shuffle_buffer=0
        )
    )
    fractions, outside = [], 0
    for _ in range(300):
        sample = next(stream)
        fractions.append(sample["pixel_mask"].float().mean().item())
        outside += int(sample["mask_labels"][:, sample["pixel_mask"] == 0].sum())
    fractions = np.array(fractions)
    assert outside == 0  # masks never reach into the padding
    # P(min(s, 1)^2 < 1/2) = (sqrt(1/2) - 0.1) / 1.9 = 0.319; 300 draws: well within 0.22 .. 0.42
    assert 0.22 < (fractions < 0.5).mean() < 0.42
    # P(s >= 1) = 0.526: the canvas is full then
    assert 0.42 < (fractions == 1.0).mean() < 0.63


def test_masks_resize_like_pil_nearest_on_real_coco():
    """Inference-style resizing of annotations (longest side to 1024) equals PIL NEAREST on the RGB PNG, pixel for pixel."""
    for row in coco_rows():
        image, ids, segments = decode_panoptic_sample(row)
        scale = 1024 / max(image.size)
        reshaped = (int(image.height * scale + 0.5), int(image.width * scale + 0.5))
        masks, labels = encode_panoptic_annotation(
            {"panoptic_map": ids, "segments_info": segments}, reshaped, (1024, 1024), coco_label_map()
        )
        panoptic_rgb = Image.open(__import__("io").BytesIO(row["label"]["bytes"])).convert("RGB")
        reference = rgb2id(np.asarray(panoptic_rgb.resize(reshaped[::-1], Image.NEAREST)))
        kept = [s for s in segments if not s["iscrowd"]]
        assert labels.tolist() == [coco_label_map()[s["category_id"]] for s in kept]
        for mask, segment in zip(masks.numpy(), kept):
            assert np.array_equal(mask[: reshaped[0], : reshaped[1]], reference == segment["id"])
            assert not mask[reshaped[0] :].any() and not mask[:, reshaped[1] :].any()


# ----- training labels


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return PosSAMForPanopticSegmentation(tiny_config(train_num_points=64, use_auxiliary_loss=False)).train()


def loss_for(model, masks, labels):
    torch.manual_seed(0)  # the same sampled points for every call
    embeddings = torch.nn.functional.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    return model(pixel_values=pixels, class_embeddings=embeddings, mask_labels=[masks], class_labels=[labels]).loss


def test_training_labels_are_validated(tiny_model):
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, :64], masks[1, 64:] = 1, 1
    labels = torch.tensor([0, 2])
    reference = loss_for(tiny_model, masks, labels)
    # accepted, same loss: bool / float 0-1 masks, class labels of any integer dtype
    for other_masks, other_labels in [
        (masks.bool(), labels),
        (masks.float(), labels),
        (masks.double(), labels),
        (masks, labels.int()),
        (masks, labels.to(torch.uint8)),
        (masks, labels.to(torch.int16)),
        (masks.to(torch.int32), labels),
    ]:
        torch.testing.assert_close(loss_for(tiny_model, other_masks, other_labels), reference)
    cases = [
        (masks * 255, labels, "mask_labels must be bool or hold only 0 and 1.*255"),  # 0/255 PNG-style masks
        (masks.float() * 0.5, labels, "mask_labels must be bool or hold only 0 and 1"),  # soft masks
        (torch.full((2, 128, 128), float("nan")), labels, "mask_labels must be bool or hold only 0 and 1"),  # NaN
        (masks - 1, labels, "mask_labels must be bool or hold only 0 and 1"),  # 0/-1 (uint8 wraps to 255)
        (masks, labels.float(), "class_labels must be integer class indices, got dtype torch.float32"),
        (masks, labels.bool(), "class_labels must be integer class indices"),
        (masks, torch.tensor([0, 3]), "class_labels must index the 3 classes"),  # out of the vocabulary
        (masks, torch.tensor([-1, 0]), "class_labels must index the 3 classes"),
        (masks[:1], labels, r"mask_labels must be \(num_segments, height, width\)"),  # counts differ
        (masks.numpy(), labels, "must be torch tensors"),
    ]
    for bad_masks, bad_labels, message in cases:
        with pytest.raises(ValueError, match=message):
            loss_for(tiny_model, bad_masks, bad_labels)
    with pytest.raises(ValueError, match="must be lists with one tensor per image"):
        pixels = torch.randn(1, 3, 128, 128)
        tiny_model(
            pixel_values=pixels,
            class_embeddings=torch.randn(3, 32),
            mask_labels=masks[None],
            class_labels=labels[None],
        )


# ----- optimizer and schedule (paper Appendix A, FC-CLIP's solver)


def fcclip_build_optimizer_decay(model, weight_decay=0.05):
    """
    Transcription of FC-CLIP's `train_net.py::Trainer.build_optimizer` (commit 2b0bbe2) weight-decay rule: per module,
    norm module types -> WEIGHT_DECAY_NORM (0.0), nn.Embedding -> WEIGHT_DECAY_EMBED (0.0), names with
    relative_position_bias_table / absolute_pos_embed -> 0.0, else WEIGHT_DECAY. Returns {name: decay}.
    """
    norm_module_types = (
        torch.nn.BatchNorm1d,
        torch.nn.BatchNorm2d,
        torch.nn.BatchNorm3d,
        torch.nn.SyncBatchNorm,
        torch.nn.GroupNorm,
        torch.nn.InstanceNorm1d,
        torch.nn.InstanceNorm2d,
        torch.nn.InstanceNorm3d,
        torch.nn.LayerNorm,
        torch.nn.LocalResponseNorm,
    )
    decay = {}
    for module_name, module in model.named_modules():
        for param_name, value in module.named_parameters(recurse=False):
            if not value.requires_grad:
                continue
            hyper = weight_decay
            if "relative_position_bias_table" in param_name or "absolute_pos_embed" in param_name:
                hyper = 0.0
            if isinstance(module, norm_module_types):
                hyper = 0.0
            if isinstance(module, torch.nn.Embedding):
                hyper = 0.0
            decay[f"{module_name}.{param_name}" if module_name else param_name] = hyper
    return decay


def test_parameter_groups_follow_fcclip_by_name():
    from transformers_possam.optimization import group_of, parameter_groups

    model = PosSAMForPanopticSegmentation(tiny_config())
    groups = parameter_groups(model, 1e-4, 0.05)
    ours = {name: group["weight_decay"] for group in groups for name in group["names"]}
    assert ours == fcclip_build_optimizer_decay(model)  # every trainable parameter, FC-CLIP's rule
    assert {p for g in groups for p in g["params"]} == {p for p in model.parameters() if p.requires_grad}
    no_decay = [
        "model.transformer_module.queries_features.weight",  # query features (nn.Embedding)
        "model.transformer_module.queries_embedder.weight",  # query positions (nn.Embedding)
        "model.transformer_module.level_embed.weight",  # decoder level embeddings (nn.Embedding)
        "classifier.void_embedding.weight",
        "ldp.stream_embeddings.weight",
        "ldp.norm.weight",
        "ldp.norm.bias",  # LayerNorm
        "model.fpn.levels.0.1.weight",  # timm LayerNorm2d
        "model.pixel_decoder.adapter_1.1.weight",  # GroupNorm
        "model.transformer_module.decoder.layernorm.weight",
    ]
    for name in no_decay:
        assert group_of(groups, name)["weight_decay"] == 0.0, name
    decayed = [
        "model.fpn.levels.0.0.weight",
        "ldp.sam_projection.1.weight",
        "ldp.sam_projection.1.bias",
        "model.iou_head.mlp.0.0.weight",
        "classifier.logit_scale",  # a plain nn.Parameter, decayed like FC-CLIP's own class-head logit_scale
        "model.pixel_decoder.level_embed",  # a plain nn.Parameter in FC-CLIP's pixel decoder too
    ]
    for name in decayed:
        assert group_of(groups, name)["weight_decay"] == 0.05, name
    assert all(group["lr"] == 1e-4 for group in groups)
    # frozen parts are left out; a trained SAM encoder gets FC-CLIP's backbone multiplier, no decay on position tables
    assert not any(name.startswith(("clip.", "model.vision_encoder.")) for name in ours)
    model.model.vision_encoder.requires_grad_(True)
    groups = parameter_groups(model, 1e-4, 0.05, backbone_multiplier=0.1)
    assert group_of(groups, "model.vision_encoder.patch_embed.projection.weight") == group_of(
        groups, "model.vision_encoder.layers.0.attn.qkv.weight"
    )
    assert group_of(groups, "model.vision_encoder.layers.0.attn.qkv.weight")["lr"] == pytest.approx(1e-5)
    assert group_of(groups, "model.vision_encoder.pos_embed")["weight_decay"] == 0.0


def test_default_schedule_is_the_papers():
    from transformers_possam.optimization import step_decay

    from .conftest import load_training_script

    train = load_training_script("train")

    args = train.parse_args([])
    # Appendix A: 250K iterations, LR x 0.1 at 150K and 200K, batch 2 per GPU (x 8), AdamW 1e-4, wd 0.05, clip 0.01
    assert (
        args.max_steps,
        args.per_device_train_batch_size,
        args.learning_rate,
        args.weight_decay,
        args.max_grad_norm,
    ) == (250_000, 2, 1e-4, 0.05, 0.01)
    assert (args.weight_decay_norm, args.weight_decay_embed) == (0.0, 0.0)
    factor = step_decay(args.max_steps, args.lr_drops)
    assert [factor(s) for s in (0, 149_999, 150_000, 199_999, 200_000, 249_999)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    fcclip = train.parse_args(["--schedule", "fcclip"])
    factor = step_decay(fcclip.max_steps, fcclip.lr_drops)
    assert fcclip.max_steps == 368_750
    assert [factor(s) for s in (327_777, 327_778, 355_091, 355_092)] == pytest.approx([1, 0.1, 0.1, 0.01])
    short = train.parse_args(["--max_steps", "100"])  # a shorter run keeps the paper's proportions
    assert [step_decay(100, short.lr_drops)(s) for s in (59, 60, 79, 80)] == pytest.approx([1, 0.1, 0.1, 0.01])
    for bad in (["--max_steps", "0"], ["--lr_drops", "1.5"], ["--schedule", "detectron"]):
        with pytest.raises(SystemExit):  # argparse error naming the flag
            train.parse_args(bad)


def test_uneven_shards_warn(caplog):
    """A shard count the processes do not divide makes every process read every row: the stream warns, naming the fix."""
    from datasets import Dataset

    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.data import toy_panoptic_rows
    from transformers_possam.data.stream import PanopticTrainStream

    dataset = Dataset.from_list(list(toy_panoptic_rows(12)))
    image_processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    labels = {i: i for i in range(6)}
    with caplog.at_level("WARNING"):
        PanopticTrainStream(dataset.to_iterable_dataset(num_shards=4), image_processor, labels, rank=0, world_size=2)
    assert not caplog.records
    with caplog.at_level("WARNING"):
        PanopticTrainStream(dataset.to_iterable_dataset(num_shards=3), image_processor, labels, rank=1, world_size=2)
    assert "3 shards, which does not divide over 2 processes" in caplog.text and "--num_shards" in caplog.text
