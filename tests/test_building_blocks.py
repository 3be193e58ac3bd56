import pytest
import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import sample_point

from transformers_possam.modeling import (
    LocalDiscriminativePooling,
    PosSAMFPN,
    bilinear_resize,
    mask_pool,
    sample_binary_masks,
)
from transformers_possam.modeling.loss import PosSAMHungarianMatcher, mask_iou_targets
from transformers_possam.vocabularies import load_vocabulary, split_synonyms

from .conftest import sam_attention_pair


def test_sample_binary_masks_equals_grid_sample_on_float_masks():
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 2, (4, 37, 53), generator=generator, dtype=torch.uint8)
    points = torch.rand(4, 500, 2, generator=generator) * 1.2 - 0.1  # includes points outside [0, 1]
    expected = sample_point(masks[:, None].float(), points, align_corners=False).squeeze(1)
    torch.testing.assert_close(sample_binary_masks(masks, points), expected, atol=1e-5, rtol=0)
    shared = points[0]
    expected_shared = sample_point(masks[:, None].float(), shared.expand(4, -1, -1), align_corners=False).squeeze(1)
    torch.testing.assert_close(sample_binary_masks(masks.bool(), shared), expected_shared, atol=1e-5, rtol=0)
    assert sample_binary_masks(masks[:0], shared).shape == (0, 500)


def test_mask_iou_targets_against_direct_count():
    pred = torch.full((2, 8, 8), -1.0)
    pred[0, :4, :] = 1.0  # top half
    pred[1, :, :] = 1.0  # everything
    target = torch.zeros(2, 32, 32, dtype=torch.uint8)
    target[0, :16, :16] = 1  # top-left quarter: IoU with top half = 1/2
    target[1, 8:24, 8:24] = 1  # a quarter of the image: IoU with everything = 1/4
    torch.testing.assert_close(mask_iou_targets(pred, target), torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(
        mask_iou_targets(torch.full((1, 8, 8), -1.0), torch.zeros(1, 32, 32)), torch.tensor([0.0])
    )


def test_mask_pool_is_average_inside_binarized_mask():
    features = torch.randn(1, 3, 4, 4)
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0
    pooled = mask_pool(features, logits)
    torch.testing.assert_close(pooled[0, 0], features[0, :, :2, :2].mean(dim=(-2, -1)))
    assert torch.equal(pooled[0, 1], torch.zeros(3))  # empty mask pools to zero
    # masks at another resolution are resized bilinearly first
    big = F.interpolate(logits, size=(16, 16), mode="nearest")
    torch.testing.assert_close(mask_pool(features, big), pooled)


@pytest.mark.parametrize(
    "in_size, out_size",
    [
        ((256, 256), (32, 32)),  # PosSAM's masks to the CLIP map: an integer factor, taps between pixels
        ((256, 256), (33, 17)),  # non-integer factors
        ((7, 9), (16, 5)),  # up along one axis, down along the other
        ((5, 5), (5, 5)),  # same size
        ((1, 3), (4, 1)),  # one-pixel axes: both taps on the one pixel
        ((1024, 1024), (1024, 7)),  # float32 throughout would round the taps' positions differently: 6e-4 off
        ((299, 97), (33, 1024)),
    ],
)
def test_bilinear_resize_equals_interpolate(in_size, out_size):
    """`F.interpolate(bilinear, align_corners=False)` of (batch, queries, h, w) logits, within float32 rounding (the
    taps' weights combined in another order)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, *in_size, generator=generator) * 4
    expected = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    found = bilinear_resize(logits, out_size)
    assert found.dtype == torch.float32 and found.shape == expected.shape
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5)
    # bf16 logits: resized in float32, as F.interpolate of the same values in float32 (not rounded back to bf16)
    reduced = logits.bfloat16()
    expected = F.interpolate(reduced.float(), size=out_size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(bilinear_resize(reduced, out_size), expected, rtol=0, atol=1e-5)


def test_bilinear_resize_refuses_what_interpolate_refuses():
    logits = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="two ints >= 1"):
        bilinear_resize(logits, (0, 3))  # F.interpolate: "sizes should be greater than 0"
    with pytest.raises(ValueError, match="two ints >= 1"):
        bilinear_resize(logits, (2,))  # one size for a 2-d resize
    with pytest.raises(ValueError, match="two ints >= 1"):
        bilinear_resize(logits, (2.5, 2))  # a float size
    with pytest.raises(ValueError, match="float logits"):
        bilinear_resize(torch.randint(0, 3, (1, 1, 4, 4)), (2, 2))  # integer masks: binarize after resizing
    with pytest.raises(ValueError, match="float logits"):
        bilinear_resize(torch.randn(4), (2, 2))  # no (height, width)
    with pytest.raises(ValueError, match="float logits"):
        bilinear_resize(torch.randn(1, 0, 4), (2, 2))  # an empty axis


def test_mask_pool_binarizes_the_interpolated_masks():
    """mask_pool against the FC-CLIP recipe written out with F.interpolate: logits kept away from 0 after resizing
    (at least 0.05), so that rounding cannot move a pixel across the threshold; then the pooled features are equal."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 8, 32, 32, generator=generator)
    logits = torch.randn(2, 5, 256, 256, generator=generator)
    resized = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    # nudge the source so that no resized logit lies within 0.05 of the threshold (a bilinear resize of a constant
    # shift is the shift)
    logits = logits + torch.where(resized.abs() < 0.05, 0.1, 0.0).repeat_interleave(8, -1).repeat_interleave(8, -2)
    resized = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    assert resized.abs().min() > 0.01
    masks = (resized > 0).float()
    expected = torch.einsum("bqhw,bchw->bqc", masks, features) / masks.sum(dim=(-2, -1))[..., None].clamp_min(1)
    torch.testing.assert_close(mask_pool(features, logits), expected)


def test_ldp_is_equivariant_to_query_order():
    torch.manual_seed(0)
    ldp = LocalDiscriminativePooling(16, 24, 32, num_heads=4, num_layers=2).eval()
    mask_features, clip_features = torch.randn(1, 16, 16, 16), torch.randn(1, 24, 2, 2)
    logits = torch.randn(1, 6, 16, 16)
    permutation = torch.tensor([3, 1, 5, 0, 2, 4])
    out = ldp(mask_features, clip_features, logits)
    permuted = ldp(mask_features, clip_features, logits[:, permutation])
    torch.testing.assert_close(out[:, permutation], permuted, atol=1e-5, rtol=1e-5)
    assert out.shape == (1, 6, 32)


def test_fpn_strides_and_widths():
    fpn = PosSAMFPN(64, [8, 16, 24, 32])
    outputs = fpn(torch.randn(2, 64, 8, 8))
    assert [tuple(o.shape) for o in outputs] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 24, 8, 8), (2, 32, 4, 4)]


def test_matcher_survives_nan_and_inf_costs():
    matcher = PosSAMHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=64)
    masks = torch.randn(1, 6, 16, 16)
    masks[0, 2] = float("nan")
    masks[0, 3] = float("inf")
    classes = torch.randn(1, 6, 4)
    classes[0, 4] = float("nan")
    labels = [torch.randint(0, 2, (3, 64, 64), dtype=torch.uint8)]
    ((rows, cols),) = matcher(masks, classes, labels, [torch.tensor([0, 1, 2])])
    assert len(rows) == 3 and sorted(cols.tolist()) == [0, 1, 2]
    # finite predictions are preferred over broken ones
    assert not set(rows.tolist()) & {2, 3, 4}
    ((rows, cols),) = matcher(masks, classes, [labels[0][:0]], [torch.tensor([], dtype=torch.long)])
    assert len(rows) == 0


def test_shipped_vocabularies():
    coco, ade = load_vocabulary("coco_panoptic_133"), load_vocabulary("ade20k_150")
    assert len(coco) == 133 and sum(coco.is_thing) == 80
    assert len(ade) == 150 and sum(ade.is_thing) == 100
    assert coco.display_names[0] == "person"
    assert split_synonyms(" person, people ,child") == ["person", "people", "child"]
    with pytest.raises(ValueError, match="no synonym"):
        split_synonyms(" , ")
    with pytest.raises(ValueError, match="Unknown vocabulary"):
        load_vocabulary("lvis")


def test_embedding_bag_deformable_attention_matches_grid_sample_version():
    """Same values and gradients as transformers' multi_scale_deformable_attention, incl. samples off the map."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention_embedding_bag

    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (8, 12), (16, 24)]
    batch, heads, head_dim, points = 2, 4, 8, 4
    num_values = sum(h * w for h, w in shapes)
    inputs = [
        torch.randn(batch, num_values, heads, head_dim, generator=generator),
        torch.rand(batch, 50, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2,  # some outside [0, 1]
        torch.rand(batch, 50, heads, len(shapes), points, generator=generator).softmax(-1),
    ]
    outputs, gradients = [], []
    for function in (multi_scale_deformable_attention, deformable_attention_embedding_bag):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        output = function(leaves[0], shapes, leaves[1], leaves[2])
        (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum().backward()
        outputs.append(output.detach())
        gradients.append([leaf.grad for leaf in leaves])
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for ours, reference in zip(gradients[1], gradients[0]):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the in-place (no autograd) path
        torch.testing.assert_close(
            deformable_attention_embedding_bag(inputs[0], shapes, inputs[1], inputs[2]),
            outputs[0],
            atol=1e-5,
            rtol=1e-5,
        )


# bag entries of one query: batch 2 x heads 4 x levels 3 x corners 4 x points 4
@pytest.mark.parametrize("bag_entries_per_step", [1, 7 * 384, 11 * 384 + 100, 2**40])
def test_embedding_bag_sampler_in_steps_of_queries_matches_grid_sample_version(bag_entries_per_step):
    """Eager inference goes through the queries in steps (buffers reused): one query per step (fewer entries than
    one query's still make a step of one), 7 and 11 queries per step (50 queries: a partial last step), all at once;
    batch 2, samples off the map. Each equals transformers' `multi_scale_deformable_attention`."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention_embedding_bag

    generator = torch.Generator().manual_seed(3)
    shapes = [(4, 6), (8, 12), (16, 24)]
    batch, heads, head_dim, points = 2, 4, 8, 4
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator)
    locations = torch.rand(batch, 50, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2
    attention = torch.rand(batch, 50, heads, len(shapes), points, generator=generator).softmax(-1)
    expected = multi_scale_deformable_attention(value, shapes, locations, attention)
    with torch.no_grad():
        found = deformable_attention_embedding_bag(
            value, shapes, locations, attention, bag_entries_per_step=bag_entries_per_step
        )
    torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)


def test_deformable_sampler_choice_by_device(monkeypatch):
    """`PosSAMMultiscaleDeformableAttention.sampler`, the one place the sampler is chosen (benchmarks/gpu_candidates.py
    replaces it): the embedding_bag sampler on CPU; on CUDA the fused Triton kernel where Triton runs (on an H200 the
    bf16 PosSAM-B forward at batch 8 took 136 against 190 ms), transformers' grid_sample version without Triton;
    transformers' version on every other device, even with Triton's interpreter on (`TRITON_INTERPRET=1`, for
    tests, runs kernels on host memory)."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention
    from transformers_possam.modeling.deformable_sampling_triton import deformable_attention_triton

    choose = deformable_attention.PosSAMMultiscaleDeformableAttention.sampler
    assert choose("cpu") is deformable_attention.deformable_attention_embedding_bag
    monkeypatch.setattr(deformable_attention, "triton_runs_on", lambda device: False)
    assert choose("cuda") is choose("mps") is choose("xpu") is multi_scale_deformable_attention
    monkeypatch.setattr(deformable_attention, "triton_runs_on", lambda device: True)
    assert choose("cuda") is deformable_attention_triton
    assert choose("mps") is choose("xpu") is multi_scale_deformable_attention
    assert choose("cpu") is deformable_attention.deformable_attention_embedding_bag


def test_deformable_training_sampler_choice_by_device(monkeypatch):
    """`PosSAMMultiscaleDeformableAttention.training_sampler`, the sampler where autograd needs gradients: the
    differentiable embedding_bag sampler on CPU, transformers' grid_sample version elsewhere, also on CUDA where
    Triton runs (the Triton kernel's backward is a candidate until a GPU has timed it)."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention

    choose = deformable_attention.PosSAMMultiscaleDeformableAttention.training_sampler
    for triton_runs in (False, True):
        monkeypatch.setattr(deformable_attention, "triton_runs_on", lambda device, runs=triton_runs: runs)
        assert choose("cpu") is deformable_attention.deformable_attention_embedding_bag
        assert choose("cuda") is choose("mps") is choose("xpu") is multi_scale_deformable_attention


@pytest.mark.parametrize("autocast", [False, True])
def test_deformable_layer_gives_a_marked_sampler_the_models_own_values(monkeypatch, autocast):
    """A bf16 model (or bf16 autocast): a sampler marked `reads_reduced_precision_values` gets the value projection's
    bf16 output as it is, an unmarked one its float32 copy; the locations and attention weights are float32 for
    both, and when the marked sampler upcasts by itself the layer's output is bitwise the same."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention

    received = []

    def unmarked(value, shapes, locations, weights):
        received.append(("unmarked", value.dtype, locations.dtype, weights.dtype))
        return multi_scale_deformable_attention(value, shapes, locations, weights)

    def marked(value, shapes, locations, weights):
        received.append(("marked", value.dtype, locations.dtype, weights.dtype))
        return multi_scale_deformable_attention(value.float(), shapes, locations, weights)

    marked.reads_reduced_precision_values = True
    torch.manual_seed(0)
    layer = PosSAMMultiscaleDeformableAttention(embed_dim=32, num_heads=4, n_levels=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    hidden = torch.randn(1, 20, 32)
    reference_points = torch.rand(1, 20, 2, 2)
    if not autocast:
        layer, hidden = layer.bfloat16(), hidden.bfloat16()
    outputs = []
    for sampler in (unmarked, marked):
        monkeypatch.setattr(PosSAMMultiscaleDeformableAttention, "sampler", staticmethod(lambda _, s=sampler: s))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs.append(
                layer(
                    hidden,
                    encoder_hidden_states=hidden,
                    position_embeddings=torch.zeros_like(hidden),
                    reference_points=reference_points,
                    spatial_shapes_list=shapes,
                )[0]
            )
    assert received == [
        ("unmarked", torch.float32, torch.float32, torch.float32),
        ("marked", torch.bfloat16, torch.float32, torch.float32),
    ]
    assert torch.equal(outputs[0], outputs[1])


def test_deformable_layer_replaces_an_inference_only_sampler_where_autograd_or_a_trace_needs_it(monkeypatch):
    """A sampler marked `inference_only` without `has_backward` (opaque to a trace, no backward) runs at inference;
    where a gradient is needed (trainable layer, grad enabled) or a `torch.compile` / `torch.export` trace runs,
    transformers' `multi_scale_deformable_attention` runs instead, so training and traced graphs stay correct."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention

    calls = []

    def inference_only(*arguments):
        calls.append("inference_only")
        return multi_scale_deformable_attention(*arguments)

    inference_only.inference_only = True
    # the choice for inference and for gradients alike: where gradients are needed it must still give way
    for choice in ("sampler", "training_sampler"):
        monkeypatch.setattr(PosSAMMultiscaleDeformableAttention, choice, staticmethod(lambda _: inference_only))
    torch.manual_seed(0)
    layer = PosSAMMultiscaleDeformableAttention(embed_dim=16, num_heads=2, n_levels=2, n_points=2)
    shapes = [(4, 4), (2, 2)]
    hidden = torch.randn(1, 20, 16)
    arguments = {
        "encoder_hidden_states": hidden,
        "position_embeddings": torch.zeros_like(hidden),
        "reference_points": torch.rand(1, 20, 2, 2),
        "spatial_shapes_list": shapes,
    }
    with torch.no_grad():
        inferred = layer(hidden, **arguments)[0]
    assert calls == ["inference_only"]
    trained = layer(hidden, **arguments)[0]  # the layer's parameters need gradients
    assert calls == ["inference_only"]
    trained.sum().backward()
    assert layer.sampling_offsets.weight.grad is not None and layer.value_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(trained.detach(), inferred)
    layer.requires_grad_(False)
    with torch.enable_grad():  # grad enabled, but nothing needs a gradient: the inference-only sampler runs
        layer(hidden, **arguments)
    assert calls == ["inference_only"] * 2
    for namespace, tracing in (
        (torch.compiler, "is_compiling"),
        (torch.compiler, "is_exporting"),
        (torch.jit, "is_tracing"),
    ):
        monkeypatch.setattr(namespace, tracing, lambda: True)
        with torch.no_grad():
            layer(hidden, **arguments)
        monkeypatch.undo()
        monkeypatch.setattr(PosSAMMultiscaleDeformableAttention, "sampler", staticmethod(lambda _: inference_only))
    assert calls == ["inference_only"] * 2
    # a real trace: dynamo's graph holds transformers' sampler (the marked one is never called while tracing or after)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, **arguments)[0], inferred)
    assert calls == ["inference_only"] * 2
    # a frozen layer whose reference points need a gradient (as an upstream trainable module would give them)
    points = arguments["reference_points"].clone().requires_grad_()
    layer(hidden, **{**arguments, "reference_points": points})[0].sum().backward()
    assert points.grad is not None and calls == ["inference_only"] * 2
    # float64 (the Triton kernel refuses it): transformers' sampler
    in_float64 = {name: value.double() if torch.is_tensor(value) else value for name, value in arguments.items()}
    with torch.no_grad():
        layer.double()(hidden.double(), **in_float64)
    assert calls == ["inference_only"] * 2


def test_an_inference_only_kernel_gives_way_where_its_op_or_its_missing_backward_cannot_serve(monkeypatch):
    """`gives_way_to_pytorch`, the one rule for the Triton kernels (deformable sampler, SAM attention): an unmarked
    function never gives way; a kernel marked `inference_only` gives way where a gradient is needed, for float64 and
    in portable traces (`torch.export`, `torch.jit.trace`); one that is also a registered op (`compiles_as_an_op`)
    stays in `torch.compile` traces and for fake tensors, where a plain one gives way; one that also `has_backward`
    (the deformable sampler's op with its backward kernel) stays where a gradient is needed, and still gives way
    for float64 and portable traces."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers_possam.triton_support import gives_way_to_pytorch

    def unmarked(*arguments):
        raise AssertionError("never called")

    def plain(*arguments):
        raise AssertionError("never called")

    def op(*arguments):
        raise AssertionError("never called")

    plain.inference_only = op.inference_only = op.compiles_as_an_op = True
    tensor, weight = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert not any(gives_way_to_pytorch(kernel, (tensor,)) for kernel in (unmarked, plain, op))
    assert not gives_way_to_pytorch(unmarked, (tensor.double(), weight))
    for kernel in (plain, op):
        assert gives_way_to_pytorch(kernel, (tensor, weight))  # a gradient
        with torch.no_grad():
            assert not gives_way_to_pytorch(kernel, (tensor, weight))
        assert gives_way_to_pytorch(kernel, (tensor.double(),))

    def differentiable(*arguments):
        raise AssertionError("never called")

    differentiable.inference_only = differentiable.compiles_as_an_op = differentiable.has_backward = True
    assert not gives_way_to_pytorch(differentiable, (tensor, weight))  # its own backward
    assert gives_way_to_pytorch(differentiable, (tensor.double(), weight))
    with FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(tensor)
        assert gives_way_to_pytorch(plain, (fake,)) and not gives_way_to_pytorch(op, (fake,))
    for namespace, tracing, op_stays in (
        (torch.compiler, "is_compiling", True),
        (torch.compiler, "is_exporting", False),
        (torch.jit, "is_tracing", False),
    ):
        monkeypatch.setattr(namespace, tracing, lambda: True)
        assert gives_way_to_pytorch(plain, (tensor,))
        assert gives_way_to_pytorch(op, (tensor,)) is not op_stays, tracing
        assert gives_way_to_pytorch(differentiable, (tensor, weight)) is not op_stays, tracing
        monkeypatch.undo()


def test_kernel_ops_register_per_copy_of_the_package_under_any_module_name():
    """`kernel_op`: each module name (the installed package, a checkpoint's remote-code copy, whose folder may hold
    any character) gets its own op, usable by `torch.library` even for a non-ASCII name; two names that read the same
    in ASCII stay apart; the same name again (a reload) gets the registered op back; the fake implementation gives
    shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from transformers_possam.triton_support import kernel_op

    def doubled(values: torch.Tensor) -> torch.Tensor:
        return values * 2

    def tripled(values: torch.Tensor) -> torch.Tensor:
        return values * 3

    def shapes_only(values: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(values)

    names = ("transformers_modules.modèle_possam.abc.modeling_x", "transformers_modules.mod_le_possam.abc.modeling_x")
    first = kernel_op(names[0], "probe", doubled, shapes_only)
    second = kernel_op(names[1], "probe", tripled, shapes_only)
    assert torch.equal(first(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(second(torch.ones(2)), torch.full((2,), 3.0))  # not the first copy's op
    again = kernel_op(names[0], "probe", tripled, shapes_only)
    assert torch.equal(again(torch.ones(2)), torch.full((2,), 2.0))  # the registered op, not a second registration
    with FakeTensorMode():
        assert first(torch.empty(3, 4)).shape == (3, 4)


def test_embedding_bag_sampler_in_float64_keeps_float64_precision():
    """float64 inputs: the corner arithmetic runs in float64 (the rows stay exact integers), so the result matches
    transformers' float64 grid_sample version to float64 rounding, with autograd and without (in steps)."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention_embedding_bag

    generator = torch.Generator().manual_seed(5)
    shapes = [(4, 6), (8, 12)]
    batch, heads, head_dim, points = 2, 2, 4, 3
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, 9, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64)
    attention = torch.rand(batch, 9, heads, len(shapes), points, generator=generator, dtype=torch.float64)
    locations = (locations * 1.4 - 0.2).requires_grad_()
    expected = multi_scale_deformable_attention(value, shapes, locations, attention)
    found = deformable_attention_embedding_bag(value, shapes, locations, attention)
    assert found.dtype == torch.float64
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), locations)
    (found_gradient,) = torch.autograd.grad(found.sum(), locations)
    torch.testing.assert_close(found_gradient, expected_gradient, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        stepped = deformable_attention_embedding_bag(value, shapes, locations, attention, bag_entries_per_step=500)
    torch.testing.assert_close(stepped, expected.detach(), rtol=1e-12, atol=1e-12)


def test_embedding_bag_sampler_gradient_at_pixel_centres_is_grid_samples():
    """Locations exactly on pixel centres, inside, on the map's last row / column and one pixel off each edge
    (pixel coordinates -1, 0, 1, 3, 4 on levels 8 x 4 and 4 x 2; Mask2Former's initialization puts every sample on a
    centre), where bilinear interpolation has a kink: the gradient w.r.t. the locations is grid_sample's (one-sided)
    one, in float64. An off-map corner's weight written as
    `max(0, fraction - distance)` lost the on-map corner's derivative there (+3.70 instead of -0.28 at x = 0)."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention_embedding_bag

    generator = torch.Generator().manual_seed(6)
    # power-of-two sizes: the normalized locations (p + 0.5) / size, and both formulas' pixel coordinates from them
    # (transformers' grid_sample unnormalizes ((2 * loc - 1) + 1) * size / 2 - 0.5), are exact, so both land exactly
    # on the kink; with other sizes the two roundings put a location on different sides of it
    shapes = [(4, 8), (2, 4)]
    batch, heads, head_dim = 2, 2, 3
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator, dtype=torch.float64)
    pixels = torch.tensor([-1.0, 0.0, 1.0, 3.0, 4.0], dtype=torch.float64)  # pixel coordinates, x and y
    grid_x, grid_y = torch.meshgrid(pixels, pixels, indexing="ij")
    num_queries = grid_x.numel()
    locations = torch.empty(batch, num_queries, heads, len(shapes), 1, 2, dtype=torch.float64)
    for level, (height, width) in enumerate(shapes):
        locations[..., level, 0, 0] = ((grid_x.flatten() + 0.5) / width)[None, :, None]
        locations[..., level, 0, 1] = ((grid_y.flatten() + 0.5) / height)[None, :, None]
    locations.requires_grad_()
    attention = torch.rand(batch, num_queries, heads, len(shapes), 1, generator=generator, dtype=torch.float64)
    weights = torch.randn(batch, num_queries, heads * head_dim, generator=generator, dtype=torch.float64)
    gradients = []
    for function in (multi_scale_deformable_attention, deformable_attention_embedding_bag):
        (gradient,) = torch.autograd.grad((function(value, shapes, locations, attention) * weights).sum(), locations)
        gradients.append(gradient)
    assert gradients[0].abs().max() > 0  # positive control
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-10, atol=1e-10)


def test_embedding_bag_sampler_gradient_of_the_value_alone_in_several_steps():
    """Only the value needs a gradient (a frozen layer's locations, LoRA on the value projection): the sampler must
    not reuse the buffers embedding_bag saved for the backward pass; gradient equal to grid_sample's."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling import deformable_attention_embedding_bag

    generator = torch.Generator().manual_seed(7)
    shapes = [(4, 6), (2, 3)]
    batch, heads, head_dim, points = 2, 2, 4, 2
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator).requires_grad_()
    locations = torch.rand(batch, 30, heads, len(shapes), points, 2, generator=generator) * 1.2 - 0.1
    attention = torch.rand(batch, 30, heads, len(shapes), points, generator=generator)
    gradients = []
    for function, options in ((multi_scale_deformable_attention, {}), (deformable_attention_embedding_bag, {})):
        if function is deformable_attention_embedding_bag:
            options = {"bag_entries_per_step": 100}  # a step of one query: 30 steps
        output = function(value, shapes, locations, attention, **options)
        (gradient,) = torch.autograd.grad(
            (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum(), value
        )
        gradients.append(gradient)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-5)


def test_sampling_locations_are_transformers_formula_bit_for_bit():
    """`reference + offsets / (w, h)` of Mask2Former's deformable attention, batch 2, three non-square levels, the
    same divisions in the same dtype: equal, not close."""
    from transformers_possam.modeling import PosSAMMultiscaleDeformableAttention

    generator = torch.Generator().manual_seed(0)
    shapes = [(12, 20), (6, 10), (3, 5)]
    reference_points = torch.rand(2, 9, 3, 2, generator=generator)
    offsets = torch.randn(2, 9, 4, 3, 5, 2, generator=generator) * 7
    normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    expected = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    found = PosSAMMultiscaleDeformableAttention.sampling_locations(reference_points, offsets, shapes)
    assert found.shape == expected.shape and torch.equal(found, expected)


def test_deformable_attention_module_equals_mask2former_module():
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    )

    from transformers_possam.modeling import PosSAMMultiscaleDeformableAttention

    torch.manual_seed(0)
    reference = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(
        embed_dim=32, num_heads=4, n_levels=3, n_points=4
    )
    ours = PosSAMMultiscaleDeformableAttention(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
    for parameter in reference.parameters():  # default init gives zero offsets: randomize to move the samples
        torch.nn.init.normal_(parameter, std=0.5)
    ours.load_state_dict(reference.state_dict())
    shapes = [(3, 5), (6, 10), (12, 20)]
    tokens = torch.randn(2, sum(h * w for h, w in shapes), 32)
    reference_points = torch.rand(2, tokens.shape[1], 3, 2)
    kwargs = {
        "encoder_hidden_states": tokens,
        "position_embeddings": torch.randn_like(tokens),
        "reference_points": reference_points,
        "spatial_shapes_list": shapes,
    }
    expected, expected_weights = reference(tokens, **kwargs)
    output, weights = ours(tokens, **kwargs)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights)


@pytest.mark.parametrize(
    "window_size, tokens", [(0, (2, 8, 8)), (4, (8, 4, 4))]
)  # global; windowed (images x windows)
def test_head_by_head_sam_attention_equals_transformers(window_size, tokens):
    from transformers import SamVisionConfig

    config = SamVisionConfig(hidden_size=48, num_attention_heads=3, image_size=128, patch_size=16)
    reference, ours = sam_attention_pair(config, window_size)
    hidden = torch.randn(*tokens, 48)
    torch.testing.assert_close(ours(hidden)[0], reference(hidden)[0], atol=1e-5, rtol=1e-5)


def transformers_relative_position_case(tokens: tuple[int, int, int], window_size: int):
    """
    transformers' `SamVisionSdpaAttention` (3 heads of 16, relative-position tables drawn large enough to matter),
    q, k, v from its own qkv projection of random tokens `(B, H, W)` (requiring gradients), the `get_rel_pos`
    tables and `(H, W)` our functions take, and transformers' own math on them: SDPA with `get_decomposed_rel_pos`'s
    bias for every head.
    """
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionSdpaAttention

    config = SamVisionConfig(hidden_size=48, num_attention_heads=3, image_size=160, patch_size=16)
    torch.manual_seed(0)
    reference = SamVisionSdpaAttention(config, window_size=window_size).eval()
    torch.nn.init.normal_(reference.rel_pos_h, std=0.5)
    torch.nn.init.normal_(reference.rel_pos_w, std=0.5)
    batch_size, height, width = tokens
    hidden = torch.randn(batch_size, height, width, 48)
    qkv = reference.qkv(hidden).reshape(batch_size, height * width, 3, 3, -1).permute(2, 0, 3, 1, 4)
    query, key, value = (part.detach().requires_grad_() for part in qkv.unbind(0))
    bias = reference.get_decomposed_rel_pos(
        query.reshape(batch_size * 3, height * width, -1),
        reference.rel_pos_h,
        reference.rel_pos_w,
        (height, width),
        (height, width),
    ).reshape(batch_size, 3, height * width, height * width)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    tables = (
        reference.get_rel_pos(height, height, reference.rel_pos_h),
        reference.get_rel_pos(width, width, reference.rel_pos_w),
        (height, width),
    )
    return reference, (query, key, value), tables, expected


def assert_same_values_and_gradients(found, expected, inputs, tolerance=1e-5):
    torch.testing.assert_close(found, expected, atol=tolerance, rtol=tolerance)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad, retain_graph=True)
    found_grads = torch.autograd.grad(found, inputs, grad, retain_graph=True)
    for ours, theirs in zip(found_grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("function_name", ["relative_position_attention", "relative_position_attention_blocked"])
@pytest.mark.parametrize(
    ("window_size", "tokens"), [(0, (2, 8, 8)), (4, (6, 4, 4)), (0, (1, 6, 10))]
)  # global; windowed; a non-square grid
def test_all_heads_relative_position_attention_equals_transformers_bias(window_size, tokens, function_name):
    """
    The all-heads paths (CUDA: extended q/k in SDPA; CPU: scores and in-place bias in blocks) against
    transformers' own math: SDPA with `get_decomposed_rel_pos`'s bias for every head, on the same q, k, v (from the
    reference layer's qkv projection); gradients too.
    """
    from transformers_possam.modeling import sam_attention

    relative_position_attention = getattr(sam_attention, function_name)
    reference, (query, key, value), tables, expected = transformers_relative_position_case(tokens, window_size)
    found = relative_position_attention(query, key, value, *tables)
    assert_same_values_and_gradients(found, expected, (query, key, value, reference.rel_pos_h))


@pytest.mark.parametrize(
    ("q_size", "k_size", "table_rows"),
    [(14, 14, 27), (64, 64, 127), (8, 8, 31), (6, 10, 19), (10, 6, 9)],
)  # SAM's windows and grid at 1024; a table longer than needed (resized down); q != k both ways, a short table
def test_relative_position_rows_equal_transformers_get_rel_pos(q_size, k_size, table_rows):
    """
    The rows GPU runs take (`relative_position_rows`, index grid made on the table's device and cached) against
    transformers' own `SamVisionAttention.get_rel_pos` on the same table: values and gradients, bitwise. The cached
    grid made under `inference_mode` must still serve a later training forward (an inference tensor cannot be
    saved for backward).
    """
    from transformers import SamVisionConfig
    from transformers.models.sam.modeling_sam import SamVisionAttention

    from transformers_possam.modeling.sam_attention import _relative_position_index, relative_position_rows

    reference = SamVisionAttention(SamVisionConfig(hidden_size=32, num_attention_heads=2), window_size=0)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(table_rows, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    _relative_position_index.cache_clear()
    with torch.inference_mode():
        relative_position_rows(q_size, k_size, table.detach())  # fills the cache inside inference mode
    found = relative_position_rows(q_size, k_size, table)
    expected = reference.get_rel_pos(q_size, k_size, table)
    assert torch.equal(found, expected)
    grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    (found_grad,) = torch.autograd.grad(found, table, grad)
    (expected_grad,) = torch.autograd.grad(expected, table, grad)
    assert torch.equal(found_grad, expected_grad)
    assert _relative_position_index.cache_info().hits >= 1


@pytest.mark.parametrize("function_name", ["relative_position_attention", "relative_position_attention_blocked"])
def test_key_grids_cached_at_inference_serve_a_later_training_forward(function_name):
    """
    The key grids are made once per size, dtype and device and reused: one made under `inference_mode` (a pipeline
    call) must still serve a training forward whose autograd saves it (an inference tensor cannot be saved for
    backward), with the same values and gradients as a grid made fresh.
    """
    from transformers_possam.modeling import sam_attention

    attention = getattr(sam_attention, function_name)
    sam_attention._cached_key_grid_one_hot.cache_clear()
    reference, (query, key, value), tables, expected = transformers_relative_position_case((2, 4, 4), 4)
    with torch.inference_mode():
        relative_height, relative_width, size = tables
        attention(
            query.detach(), key.detach(), value.detach(), relative_height.detach(), relative_width.detach(), size
        )
    assert sam_attention._cached_key_grid_one_hot.cache_info().currsize == 1
    found = attention(query, key, value, *tables)
    assert sam_attention._cached_key_grid_one_hot.cache_info().hits >= 1
    assert_same_values_and_gradients(found, expected, (query, key, value, reference.rel_pos_h))


@pytest.mark.parametrize(
    ("head_dim", "size"),
    [(64, (14, 14)), (64, (64, 64)), (80, (14, 14)), (80, (64, 64)), (16, (6, 10))],
)  # SAM-B/L (head size 64) and SAM-H (80): 14 x 14 windows and the 64 x 64 global grid at 1024; a small grid
def test_all_heads_attention_gives_sdpa_head_sizes_cuda_fused_kernels_accept(head_dim, size):
    """
    The all-heads form (what CUDA runs) hands SDPA q/k of d + H + W channels and v of d: PyTorch's memory-efficient
    CUDA kernel needs q/k and v head sizes that are multiples of 8 in bf16/fp16 (4 in float32), else SDPA silently
    falls back to its unfused math kernel (SAM-B's windows: 64 + 28 = 92). Zero channels round q/k up; the result
    equals the blocked CPU form (itself tested against transformers' bias above), in float64.
    """
    from transformers_possam.modeling import sam_attention

    generator = torch.Generator().manual_seed(0)
    tokens = size[0] * size[1]
    query, key, value = (torch.randn(1, 1, tokens, head_dim, generator=generator, dtype=torch.float64) for _ in "qkv")
    tables = [torch.randn(n, n, head_dim, generator=generator, dtype=torch.float64) * 0.1 for n in size]
    seen = []
    original = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return original(q, k, v, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sam_attention.F, "scaled_dot_product_attention", recording)
        found = sam_attention.relative_position_attention(query, key, value, *tables, size)
    ((query_size, key_size, value_size),) = seen
    assert query_size == key_size >= head_dim + sum(size) and value_size == head_dim
    assert query_size % 8 == 0 and value_size % 8 == 0
    assert query_size - (head_dim + sum(size)) < 8  # padded no more than needed
    expected = sam_attention.relative_position_attention_blocked(query, key, value, *tables, size)
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("tokens", "score_block_bytes"),
    [
        ((1, 6, 10), 60 * 4),  # a global layer one query row per block
        ((1, 6, 10), 7 * 60 * 4),  # 7 rows per block: the last block is short (60 = 8 x 7 + 4)
        ((4, 4, 4), 2 * 16 * 16 * 4),  # windowed: 2 of 4 x 3 window-heads per block
        ((5, 4, 4), 4 * 16 * 16 * 4),  # 15 window-heads by 4: the last block is short
        ((2, 8, 8), 2**30),  # everything in one block
    ],
)
def test_blocked_relative_position_attention_equals_transformers_bias_for_any_block_size(tokens, score_block_bytes):
    """
    `relative_position_attention_blocked` splits the scores by query rows (global layers) or by whole sequences
    (windowed ones): for block sizes that do and do not divide the work, it equals SDPA with transformers'
    `get_decomposed_rel_pos` bias, values and gradients; without autograd (one reused score buffer, outputs written
    in place) the same values.
    """
    from transformers_possam.modeling.sam_attention import relative_position_attention_blocked

    reference, (query, key, value), tables, expected = transformers_relative_position_case(tokens, window_size=0)
    found = relative_position_attention_blocked(query, key, value, *tables, score_block_bytes=score_block_bytes)
    with torch.no_grad():
        found_without_autograd = relative_position_attention_blocked(
            query, key, value, *tables, score_block_bytes=score_block_bytes
        )
    torch.testing.assert_close(found_without_autograd, expected, atol=1e-5, rtol=1e-5)
    assert_same_values_and_gradients(found, expected, (query, key, value, reference.rel_pos_h))


def possam_criterion(config):
    """The criterion `PosSAMForPanopticSegmentation` builds from a `PosSAMConfig`."""
    from transformers_possam.modeling.loss import PosSAMLoss

    return PosSAMLoss.from_possam_config(config)


def test_weighted_total_weights_each_loss_by_its_base_name_and_refuses_an_empty_dict():
    from transformers_possam import PosSAMConfig

    config = PosSAMConfig(class_weight=2.0, mask_weight=5.0, dice_weight=3.0, iou_weight=7.0)
    criterion = possam_criterion(config)
    losses = {"loss_mask": torch.tensor(1.0), "loss_dice_0": torch.tensor(10.0), "loss_iou_12": torch.tensor(100.0)}
    total = criterion.weighted_total(losses)
    assert isinstance(total, torch.Tensor)
    assert total.item() == 5.0 * 1.0 + 3.0 * 10.0 + 7.0 * 100.0
    # an empty dict used to come back as the float 0.0, silently not a loss
    with pytest.raises(ValueError, match="empty"):
        criterion.weighted_total({})


def test_criterion_equals_transformers_mask2former_loss_built_from_the_same_config():
    """
    `PosSAMLoss` is built from `PosSAMConfig.mask2former_config` (a real `Mask2FormerConfig`, issue 15 item 3). On
    the same predictions, float targets and random draws (the matcher's points, the importance sampling), its
    cross-entropy, mask BCE and dice of the final and every auxiliary layer equal transformers' `Mask2FormerLoss`
    built from that config with `num_labels` = the vocabulary size (ours takes K from the logits). Its matcher's
    costs and weights are the config's.
    """
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    from transformers_possam import tiny_config

    config = tiny_config(no_object_weight=0.2, class_weight=3.0, mask_weight=4.0, dice_weight=6.0, train_num_points=64)
    mask2former_config = config.mask2former_config
    criterion = possam_criterion(config)
    num_classes, num_queries, size = 5, 8, 16
    mask2former_config.num_labels = num_classes
    weight_dict = {"loss_cross_entropy": 3.0, "loss_mask": 4.0, "loss_dice": 6.0}
    reference = Mask2FormerLoss(mask2former_config, weight_dict)
    assert criterion.weight_dict == {**weight_dict, "loss_iou": config.iou_weight}
    assert (criterion.matcher.cost_class, criterion.matcher.cost_mask, criterion.matcher.cost_dice) == (3.0, 4.0, 6.0)
    assert (criterion.eos_coef, criterion.num_points) == (0.2, 64)

    generator = torch.Generator().manual_seed(0)

    def predictions():
        return {
            "masks_queries_logits": torch.randn(2, num_queries, size, size, generator=generator),
            "class_queries_logits": torch.randn(2, num_queries, num_classes + 1, generator=generator),
        }

    final, auxiliary = predictions(), [predictions(), predictions()]
    mask_labels = [torch.rand(count, 32, 32, generator=generator).gt(0.5).float() for count in (3, 11)]
    class_labels = [torch.randint(0, num_classes, (count,), generator=generator) for count in (3, 11)]
    found, expected = {}, {}
    for losses, module in ((found, criterion), (expected, reference)):
        torch.manual_seed(1)
        losses.update(
            module(**final, mask_labels=mask_labels, class_labels=class_labels, auxiliary_predictions=auxiliary)
        )
    assert set(found) == set(expected) == {f"{name}{suffix}" for name in weight_dict for suffix in ("", "_0", "_1")}
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # positive control: other random draws give other point-sampled mask losses
    torch.manual_seed(2)
    redrawn = criterion(**final, mask_labels=mask_labels, class_labels=class_labels)
    assert not torch.allclose(redrawn["loss_mask"], expected["loss_mask"])


def test_criterion_refuses_the_possam_config_in_place_of_mask2formers():
    """A careless caller passes the model's config (which has look-alike fields): TypeError saying what to pass."""
    from transformers_possam import tiny_config
    from transformers_possam.modeling.loss import PosSAMLoss

    with pytest.raises(TypeError, match="mask2former_config"):
        PosSAMLoss(tiny_config(), iou_weight=1.0)
