"""
Gradient accumulation (issue 14, item 5): G accumulated micro-batches give the gradients of one batch of all their
images, although the loss averages over the batch's masks (Mask2Former's `num_masks`) and class weights.

The loss samples points at random (the matcher's uniform points, PointRend's importance sampling). The comparisons
replace `torch.rand` by `batch_invariant_rand`, which gives every mask the same points whatever batch it is in, so
that batch 2 and 2 x batch 1 see identical samples and only the normalization can make them differ.
"""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
from transformers_possam.modeling.loss import LossNormalizers, PosSAMLoss, accumulation_loss_normalizers

from .conftest import load_training_script


_TORCH_RAND = torch.rand


def criterion_of(config) -> PosSAMLoss:
    """The criterion `PosSAMForPanopticSegmentation` builds from `config`."""
    return PosSAMLoss.from_possam_config(config)


def batch_invariant_rand(*size, generator=None, **kwargs):
    """
    `torch.rand` whose rows do not depend on the batch: a `(P, 2)` request (the matcher's points, one draw per image)
    and each row of a `(N, P, 2)` request (PointRend's points, one row per matched mask) are the same fixed draw.
    """
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)
    row_shape = shape[1:] if len(shape) == 3 else shape
    fixed = torch.Generator().manual_seed(hash(row_shape) % 2**31)
    row = _TORCH_RAND(*row_shape, generator=fixed, dtype=kwargs.get("dtype") or torch.float32)
    row = row.to(kwargs.get("device") or "cpu")
    return row.expand(shape).contiguous() if len(shape) == 3 else row


def random_targets(mask_counts, size=32, seed=0):
    """Per image, `(N_i, size, size)` uint8 masks (random blobs, some overlapping) and `(N_i,)` labels in [0, 5)."""
    generator = torch.Generator().manual_seed(seed)
    masks, labels = [], []
    for count in mask_counts:
        masks.append((torch.rand(count, size, size, generator=generator) > 0.6).to(torch.uint8))
        labels.append(torch.randint(0, 5, (count,), generator=generator))
    return masks, labels


def loss_predictions(batch_size, num_queries=8, num_classes=5, num_layers=3, size=16, seed=1):
    """Leaf predictions `(B, Q, h, w)` masks, `(B, Q, K + 1)` classes, `(B, Q)` IoU logits for each decoder layer."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "masks_queries_logits": torch.randn(batch_size, num_queries, size, size, generator=generator),
            "class_queries_logits": torch.randn(batch_size, num_queries, num_classes + 1, generator=generator),
            "iou_logits": torch.randn(batch_size, num_queries, generator=generator),
        }
        for _ in range(num_layers)
    ]


def criterion_gradients(criterion, layers, mask_labels, class_labels, micro_batches, normalized):
    """
    Gradients of the weighted loss w.r.t. every prediction, accumulated over `micro_batches` (image index ranges)
    the way accelerate does (each micro-batch's loss divided by their number); `normalized` passes the window's
    `accumulation_loss_normalizers`.
    """
    leaves = [{key: value.clone().requires_grad_() for key, value in layer.items()} for layer in layers]
    window = [[class_labels[i] for i in images] for images in micro_batches]
    normalizers = accumulation_loss_normalizers(window, num_queries=8, no_object_weight=criterion.eos_coef)
    with mock.patch.object(torch, "rand", batch_invariant_rand):
        for images in micro_batches:
            index = torch.tensor(list(images))
            parts = [{key: value[index] for key, value in layer.items()} for layer in leaves]
            losses = criterion(
                **parts[-1],
                mask_labels=[mask_labels[i] for i in images],
                class_labels=[class_labels[i] for i in images],
                auxiliary_predictions=parts[:-1],
                loss_normalizers=normalizers if normalized else None,
            )
            (criterion.weighted_total(losses) / len(micro_batches)).backward()
    return [leaf.grad for layer in leaves for leaf in layer.values()]


@pytest.mark.parametrize("iou_loss_on_unmatched", [False, True])
def test_two_micro_batches_of_one_give_the_gradients_of_one_batch_of_two(iou_loss_on_unmatched):
    # 3 and 11 masks: the second image has more masks than the 8 queries, so only 8 of its masks are matched
    criterion = criterion_of(tiny_config(iou_loss_on_unmatched=iou_loss_on_unmatched))
    mask_labels, class_labels = random_targets([3, 11])
    layers = loss_predictions(batch_size=2)
    batch = criterion_gradients(criterion, layers, mask_labels, class_labels, [(0, 1)], normalized=False)
    accumulated = criterion_gradients(criterion, layers, mask_labels, class_labels, [(0,), (1,)], normalized=True)
    for ours, reference in zip(accumulated, batch):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-8)
    # positive control: each micro-batch normalized by its own masks and weights gives other gradients
    unnormalized = criterion_gradients(criterion, layers, mask_labels, class_labels, [(0,), (1,)], normalized=False)
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(unnormalized, batch))
    # and a window of one batch normalizes exactly as the batch does by itself
    window_of_one = criterion_gradients(criterion, layers, mask_labels, class_labels, [(0, 1)], normalized=True)
    for ours, reference in zip(window_of_one, batch):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-9)


def test_window_normalizers_follow_mask2former_and_cross_entropy_definitions():
    """The values against their definitions: Mask2Former's mask count, F.cross_entropy's weighted-mean denominator."""
    labels = [[torch.zeros(3)], [torch.zeros(11), torch.zeros(0)]]  # 2 micro-batches: 1 image, then 2 images
    normalizers = accumulation_loss_normalizers(labels, num_queries=8, no_object_weight=0.1)
    assert isinstance(normalizers, LossNormalizers)
    torch.testing.assert_close(normalizers.num_masks, torch.tensor(14 / 2))
    # matched queries weigh 1, the others no_object_weight: 3 + 0.1 * 5, 8 (11 masks, 8 queries), 0.1 * 8
    torch.testing.assert_close(normalizers.class_weight_sum, torch.tensor((3.5 + 8 + 0.8) / 2))
    torch.testing.assert_close(normalizers.num_predictions, torch.tensor(3 * 8 / 2))
    # no mask at all: at least 1 mask in the window, as Mask2Former clamps a batch's count
    empty = accumulation_loss_normalizers([[torch.zeros(0)], [torch.zeros(0)]], num_queries=8, no_object_weight=0.1)
    torch.testing.assert_close(empty.num_masks, torch.tensor(0.5))
    with pytest.raises(ValueError, match="at least one micro-batch"):
        accumulation_loss_normalizers([], num_queries=8, no_object_weight=0.1)


def test_model_forward_with_window_normalizers_under_accelerate_accumulation():
    """
    The model end to end, with accelerate's accumulate / backward: 2 x batch 1 == batch 2 on every parameter. In
    float64: the forward has thresholds (masks binarized at logit 0 for pooling, the matching), and float32 rounds
    a batch of 2 and a batch of 1 differently (matmul blocking), which flipped one of them for some random tiny
    models (gradients 0.3% apart) while float64 gave equal gradients for the same model.
    """
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).double().train()
    generator = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(2, 3, 128, 128, generator=generator, dtype=torch.float64)
    mask_labels, class_labels = random_targets([2, 6], size=128)
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(5, 1, 32, generator=generator, dtype=torch.float64), dim=-1
    )
    parameters = [p for p in model.parameters() if p.requires_grad]

    def gradients(micro_batches, normalized):
        model.zero_grad()
        accelerator = Accelerator(gradient_accumulation_steps=len(micro_batches), cpu=True)
        window = [[class_labels[i] for i in images] for images in micro_batches]
        normalizers = accumulation_loss_normalizers(window, model.config.num_queries, model.config.no_object_weight)
        with mock.patch.object(torch, "rand", batch_invariant_rand):
            for images in micro_batches:
                with accelerator.accumulate(model):
                    index = list(images)
                    outputs = model(
                        pixel_values=pixel_values[index],
                        class_embeddings=class_embeddings,
                        mask_labels=[mask_labels[i] for i in index],
                        class_labels=[class_labels[i] for i in index],
                        loss_normalizers=normalizers if normalized else None,
                    )
                    accelerator.backward(outputs.loss)
        return [p.grad.clone() for p in parameters]

    batch = gradients([(0, 1)], normalized=False)
    accumulated = gradients([(0,), (1,)], normalized=True)
    scale = max(g.abs().max() for g in batch)
    for ours, reference in zip(accumulated, batch):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5 * scale)
    unnormalized = gradients([(0,), (1,)], normalized=False)
    assert max((a - b).abs().max() for a, b in zip(unnormalized, batch)) > 1e-2 * scale  # positive control


class _CountingSGD(torch.optim.SGD):
    """Plain SGD (the update is -lr x gradient, unlike Adam's normalized first step) that counts its steps."""

    steps = 0

    def step(self, closure=None):
        type(self).steps += 1
        return super().step(closure)


def run_train(tmp_path, name, *flags, normalized=True, record=None):
    """training/train.py in process for one optimizer step with SGD at lr 1, no clipping nor weight decay: the
    weight change is minus the gradient. Returns (initial, final) trainable weights."""
    train = load_training_script("train")
    captured = {}
    build_optimization = train.build_optimization

    def build_with_sgd(args, model):
        groups, _, _ = build_optimization(args, model)
        optimizer = _CountingSGD(groups, lr=args.learning_rate)
        captured["initial"] = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        captured["scheduler"] = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return groups, optimizer, captured["scheduler"]

    normalizers = train.accumulation_loss_normalizers

    def recording_normalizers(class_labels_of_micro_batches, **kwargs):
        # the window's micro-batches, as train.py draws them: the segment count of each image of each
        if record is not None:
            record.extend([len(labels) for labels in batch] for batch in class_labels_of_micro_batches)
        return normalizers(class_labels_of_micro_batches, **kwargs)

    patches = [
        mock.patch.object(train, "build_optimization", build_with_sgd),
        mock.patch.object(train, "accumulation_loss_normalizers", recording_normalizers),
        mock.patch.object(torch, "rand", batch_invariant_rand),
    ]
    if not normalized:  # positive control: each micro-batch normalized by itself (the behaviour before the fix)
        patches.append(mock.patch.object(train, "accumulation_loss_normalizers", lambda *args, **kwargs: None))
    _CountingSGD.steps = 0
    output_dir = tmp_path / name
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        train.main(
            [
                "--output_dir",
                str(output_dir),
                "--no_augmentation",
                "--toy_train_size",
                "8",
                "--learning_rate",
                "1.0",
                "--weight_decay",
                "0",
                "--max_grad_norm",
                "0",
                "--record_sample_ids",
                "--seed",
                "3",  # the toy stream's first two images then hold 6 and 3 segments
                *flags,
            ]
        )
    final = load_file(output_dir / "model.safetensors")
    initial = captured["initial"]
    return initial, {key: final[key] for key in initial if key in final}, captured["scheduler"], output_dir


def test_train_py_accumulation_equals_the_larger_batch(tmp_path):
    """
    Through training/train.py's loop: 1 optimizer step of 2 x batch 1 accumulated gives the weights of batch 2
    (their first two toy images hold different numbers of segments); the positive control, without the window
    normalizers, does not.
    """
    counts: list[list[int]] = []
    one_batch = ("--max_steps", "1", "--per_device_train_batch_size", "2")
    initial, batch, *_ = run_train(tmp_path, "batch", *one_batch, record=counts)
    accumulated_flags = (
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
    )
    _, accumulated, *_ = run_train(tmp_path, "accumulated", *accumulated_flags, record=counts)
    assert counts[0] == counts[1] + counts[2] and counts[1] != counts[2], counts  # the same images, unequal counts
    assert batch.keys() == accumulated.keys() and len(batch) > 10
    updates = {key: batch[key] - initial[key] for key in batch}
    scale = max(update.abs().max() for update in updates.values())
    assert scale > 0
    for key in batch:
        torch.testing.assert_close(accumulated[key] - initial[key], updates[key], rtol=1e-3, atol=1e-4 * scale)
    _, unnormalized, *_ = run_train(tmp_path, "unnormalized", *accumulated_flags, normalized=False)
    assert max((unnormalized[k] - batch[k]).abs().max() for k in batch) > 1e-2 * scale


def test_train_py_counts_optimizer_steps_with_accumulation(tmp_path):
    """--max_steps counts optimizer steps: 3 steps of 2 micro-batches of 2 images step SGD and the scheduler 3 times
    and read 12 images; gradients are clipped once per optimizer step (at the window's last micro-batch)."""
    from accelerate import Accelerator

    clip = Accelerator.clip_grad_norm_
    clips = []

    def counting_clip(self, parameters, max_norm, *args, **kwargs):
        clips.append(self.sync_gradients)
        return clip(self, parameters, max_norm, *args, **kwargs)

    flags = ("--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2")
    with mock.patch.object(Accelerator, "clip_grad_norm_", counting_clip):
        _, _, scheduler, output_dir = run_train(tmp_path, "steps", *flags, "--max_grad_norm", "1.0")
    assert _CountingSGD.steps == 3
    assert scheduler.last_epoch == 3
    assert clips == [True, True, True]
    assert len(json.loads((output_dir / "sample_ids_0.json").read_text())) == 12


def _normalizers_on_rank(rank: int, port: int, results) -> None:
    """One of 2 CPU processes as `accelerate launch` sets them up (PartialState over gloo); rank r holds r + 2 and
    3 r + 1 masks in its two micro-batches."""
    import os

    from accelerate import PartialState

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        ACCELERATE_USE_CPU="1",
    )
    PartialState(cpu=True)
    window = [[torch.zeros(rank + 2)], [torch.zeros(3 * rank + 1)]]
    normalizers = accumulation_loss_normalizers(window, num_queries=8, no_object_weight=0.1)
    criterion = criterion_of(tiny_config())
    per_batch = criterion.get_num_masks(window[0], device=torch.device("cpu"))
    results[rank] = (float(normalizers.num_masks), float(normalizers.class_weight_sum), float(per_batch))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_mask_count_is_summed_over_processes_as_mask2former():
    """
    Mask2Former: num_masks = (masks summed over processes) / processes, at least 1. Over 2 processes: batch counts
    2 and 3 give 2.5; the windows (2 + 1, 3 + 4 masks, G = 2) give 5 / 2. transformers' get_num_masks averages over
    processes and divides by their number again (1.25): PosSAMLoss sums.
    """
    import socket

    import torch.multiprocessing as multiprocessing

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = multiprocessing.Manager().dict()
    multiprocessing.spawn(_normalizers_on_rank, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        num_masks, class_weight_sum, per_batch = results[rank]
        assert per_batch == pytest.approx(2.5)
        assert num_masks == pytest.approx((2 + 1 + 3 + 4) / 2 / 2)
        # the class weights stay per process (FC-CLIP's cross-entropy is per-process): min(N, 8) + 0.1 (8 - min)
        counts = (rank + 2, 3 * rank + 1)
        assert class_weight_sum == pytest.approx(sum(n + 0.1 * (8 - n) for n in counts) / 2)


def test_forward_refuses_loss_normalizers_it_cannot_use():
    """A careless caller: a dict instead of LossNormalizers (TypeError naming the builder), normalizers without
    labels, where no loss is computed (ValueError rather than silently ignoring them)."""
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size)
    class_embeddings = torch.randn(3, model.config.clip_embed_dim)
    normalizers = accumulation_loss_normalizers(
        [[torch.tensor([0, 1])]], num_queries=model.config.num_queries, no_object_weight=0.1
    )
    with pytest.raises(TypeError, match="accumulation_loss_normalizers"):
        model(pixel_values=pixel_values, class_embeddings=class_embeddings, loss_normalizers={"num_masks": 2})
    with pytest.raises(ValueError, match="with mask_labels and class_labels"):
        model(pixel_values=pixel_values, class_embeddings=class_embeddings, loss_normalizers=normalizers)
