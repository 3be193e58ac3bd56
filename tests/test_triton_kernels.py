"""
The Triton kernels (CUDA's defaults, and the SAM attention candidate of benchmarks/gpu_candidates.py), run here by
Triton's CPU interpreter (`TRITON_INTERPRET=1`, the same kernel source executed on CPU tensors):
- `deformable_attention_triton`, the fused deformable sampler, against transformers' `multi_scale_deformable_attention`
  (grid_sample) in float64: the reference is transformers' code, not ours;
- `pixel_assignment_triton`, the per-pixel part of the sync-free panoptic inference, against the PyTorch path
  (`F.interpolate` step by step, `_pixel_assignment_by_chunks`), and the whole post-processing with it against
  without it;
- `relative_position_attention_triton`, SAM's attention with its decomposed relative-position bias, against the
  attention written out in float64 and, in the layer, against transformers' `SamVisionSdpaAttention`.
"""

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention


pytest.importorskip("triton")

# Triton's interpreter must be chosen before Triton is imported (its language library is made of jit functions,
# made once at import): the tests below run in a child process started with it, `test_under_triton_interpreter`
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="runs in test_under_triton_interpreter's child")


def test_under_triton_interpreter():
    """This file's kernel tests, in a child pytest with `TRITON_INTERPRET=1`; its report shown on failure."""
    if INTERPRETING:
        pytest.skip("this is the child")
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and "skipped" in child.stdout  # the kernel tests ran, this one skipped


@pytest.fixture
def interpreted():
    """The sampler's module, its kernel made under Triton's CPU interpreter."""
    from transformers_possam.modeling import deformable_sampling_triton

    return deformable_sampling_triton


def count_launches(kernel_module, monkeypatch, factory: str = "_kernel") -> list:
    """The grids of every launch of `kernel_module.<factory>()` (`_kernel`, or the sampler's `_backward_kernel`) from
    now on (the kernel itself still runs)."""
    launches: list = []
    kernel = getattr(kernel_module, factory)()

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(kernel_module, factory, lambda: CountingKernel())
    return launches


def _inputs(shapes, batch, heads, head_dim, points, queries, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(height * width for height, width in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator)
    # a margin beyond [0, 1] on every side: some corners, and some whole samples, fall off the map (zero padding)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    return value, locations, weights


@needs_interpreter
@pytest.mark.parametrize(
    "shapes, batch, heads, head_dim, points, queries",
    [
        ([(4, 4), (8, 8), (16, 16)], 2, 8, 32, 4, 336),  # PosSAM's layout (3 levels, 8 heads of 32, 4 points)
        ([(3, 5), (7, 2)], 1, 2, 24, 3, 70),  # a head size that is not a power of 2; 70 queries: a partial block
        ([(1, 1)], 3, 1, 1, 1, 5),  # degenerate: one pixel, one channel
    ],
)
def test_triton_sampler_equals_transformers_grid_sample_version(
    interpreted, shapes, batch, heads, head_dim, points, queries
):
    value, locations, weights = _inputs(shapes, batch, heads, head_dim, points, queries)
    expected = multi_scale_deformable_attention(value.double(), shapes, locations.double(), weights.double())
    with torch.inference_mode():
        found = interpreted.deformable_attention_triton(value, shapes, locations, weights)
    assert found.dtype == torch.float32 and found.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(found.double(), expected, rtol=0, atol=1e-5)


@needs_interpreter
def test_triton_sampler_on_pixel_centres_and_edges(interpreted):
    """Locations on pixel centres (one corner with weight 1), on the map's edges (0 and 1: half the weight off the
    map) and exactly between pixels: grid_sample's align_corners=False conventions."""
    shapes = [(4, 6), (2, 3)]
    value, _, weights = _inputs(shapes, 1, 2, 8, 2, 12)
    grid = torch.tensor([0.0, 1.0, 0.5, 1 / 12, 11 / 12, 1 / 6, 0.25, 0.75, 1 / 8, 7 / 8, 1.0, 0.0])
    locations = torch.stack([grid, grid.flip(0)], dim=-1)[None, :, None, None, None, :].expand(1, 12, 2, 2, 2, 2)
    expected = multi_scale_deformable_attention(value.double(), shapes, locations.double(), weights.double())
    with torch.inference_mode():
        found = interpreted.deformable_attention_triton(value, shapes, locations.contiguous(), weights)
    torch.testing.assert_close(found.double(), expected, rtol=0, atol=1e-5)


@needs_interpreter
def test_triton_sampler_reads_bf16_values_and_accumulates_in_float32(interpreted):
    """bf16 values (a bf16 model's, without the float32 copy): the same as float32 sampling of those same bf16
    values (each is exact in float32), and a float32 result."""
    shapes = [(4, 4), (8, 8)]
    value, locations, weights = _inputs(shapes, 2, 4, 16, 4, 40)
    value = value.bfloat16()
    expected = multi_scale_deformable_attention(value.double(), shapes, locations.double(), weights.double())
    with torch.inference_mode():
        found = interpreted.deformable_attention_triton(value, shapes, locations, weights)
    assert found.dtype == torch.float32
    torch.testing.assert_close(found.double(), expected, rtol=0, atol=1e-5)


@needs_interpreter
def test_triton_sampler_makes_its_level_table_once_per_sizes(interpreted):
    """The per-level sizes and starts the kernel reads are made once per sizes and device (`DeviceConstants`), not
    copied to the device in every layer and call."""
    interpreted._level_tables.cache_clear()
    shapes = [(4, 4), (2, 2)]
    value, locations, weights = _inputs(shapes, 1, 2, 8, 2, 6)
    with torch.inference_mode():
        for _ in range(3):
            interpreted.deformable_attention_triton(value, shapes, locations, weights)
    info = interpreted._level_tables.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    table = interpreted._level_tables(((4, 4), (2, 2)), value.device, like=value)
    assert table.tolist() == [[4, 4, 0], [2, 2, 16]] and table.dtype == torch.int32


@needs_interpreter
def test_triton_sampler_refuses_what_it_cannot_do(interpreted, monkeypatch):
    """Each refusal names what to do instead; nothing is computed wrongly in silence."""
    shapes = [(4, 4)]
    value, locations, weights = _inputs(shapes, 1, 2, 8, 2, 6)
    # float64 values would be rounded to float32 in silence
    with pytest.raises(ValueError, match="float32, bf16 or fp16 values, got torch.float64"):
        interpreted.deformable_attention_triton(value.double(), shapes, locations, weights)
    # spatial shapes that do not cover the values
    with pytest.raises(ValueError, match="do not add up"):
        interpreted.deformable_attention_triton(value, [(4, 3)], locations, weights)
    # CPU tensors without the interpreter: no kernel can run there
    monkeypatch.delenv("TRITON_INTERPRET")
    from transformers_possam.triton_support import triton_runs_on

    assert not triton_runs_on("cpu")
    with pytest.raises(RuntimeError, match="needs CUDA and Triton"):
        interpreted.deformable_attention_triton(value, shapes, locations, weights)


def _gradients(sampler, value, shapes, locations, weights, output_grad):
    """The gradients of `sampler(value, shapes, locations, weights) . output_grad` with respect to the value, the
    locations and the weights (each in its input's dtype), and the result."""
    inputs = [tensor.detach().clone().requires_grad_() for tensor in (value, locations, weights)]
    output = sampler(inputs[0], shapes, inputs[1], inputs[2])
    return (*torch.autograd.grad(output, inputs, output_grad.to(output.dtype)), output)


@needs_interpreter
@pytest.mark.parametrize(
    "shapes, batch, heads, head_dim, points, queries",
    [
        # PosSAM's layout (3 levels, 4 points, heads of 32), 2 of its 8 heads and 80 queries: the interpreter runs
        # each program's loops in Python (8 heads and 336 queries took a minute)
        ([(4, 4), (8, 8), (16, 16)], 2, 2, 32, 4, 80),
        ([(3, 5), (7, 2)], 1, 2, 24, 3, 70),  # a head size that is not a power of 2, a partial block of queries
        ([(1, 1)], 3, 1, 1, 1, 5),  # one pixel, one channel
    ],
)
def test_triton_sampler_gradients_equal_transformers_grid_sample_version(
    interpreted, shapes, batch, heads, head_dim, points, queries
):
    """The backward kernel's gradients of the values, the locations and the weights against autograd through
    transformers' `multi_scale_deformable_attention` (grid_sample's backward) in float64, with locations beyond the
    map on every side (corners and whole samples off the map, zero padding: no gradient from them)."""
    value, locations, weights = _inputs(shapes, batch, heads, head_dim, points, queries)
    output_grad = torch.randn(batch, queries, heads * head_dim, generator=torch.Generator().manual_seed(1))
    expected = _gradients(
        multi_scale_deformable_attention, value.double(), shapes, locations.double(), weights.double(), output_grad
    )
    found = _gradients(interpreted.deformable_attention_triton, value, shapes, locations, weights, output_grad)
    torch.testing.assert_close(found[3].double(), expected[3], rtol=0, atol=1e-5)
    for name, gradient, reference in zip(("value", "locations", "weights"), found[:3], expected[:3]):
        assert gradient.dtype == torch.float32, name
        # the locations' gradient scales with the level size (d pixel / d location): relative to its largest
        scale = reference.abs().max().clamp(min=1.0)
        torch.testing.assert_close(gradient.double() / scale, reference / scale, rtol=0, atol=2e-6, msg=name)


@needs_interpreter
def test_triton_sampler_gradients_on_pixel_centres_and_edges(interpreted):
    """Locations on pixel centres, on the map's edges and exactly between pixels, where a bilinear corner's weight
    is 0 or 1: the gradients follow grid_sample's backward (the same floor, the same one-sided derivative)."""
    shapes = [(4, 6), (2, 3)]
    value, _, weights = _inputs(shapes, 1, 2, 8, 2, 12)
    grid = torch.tensor([0.0, 1.0, 0.5, 1 / 12, 11 / 12, 1 / 6, 0.25, 0.75, 1 / 8, 7 / 8, 1.0, 0.0])
    locations = torch.stack([grid, grid.flip(0)], dim=-1)[None, :, None, None, None, :].expand(1, 12, 2, 2, 2, 2)
    output_grad = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(2))
    expected = _gradients(
        multi_scale_deformable_attention, value.double(), shapes, locations.double(), weights.double(), output_grad
    )
    found = _gradients(
        interpreted.deformable_attention_triton, value, shapes, locations.contiguous(), weights, output_grad
    )
    for gradient, reference in zip(found, expected):
        torch.testing.assert_close(gradient.double(), reference, rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_triton_sampler_gradients_of_bf16_values_come_back_in_bf16(interpreted):
    """bf16 values (autocast's value projection, read without a float32 copy): the values' gradient is summed in
    float32 and rounded to bf16 once, within bf16 rounding of float64 autograd through transformers' sampler; the
    float32 locations and weights get float32 gradients."""
    shapes = [(4, 4), (8, 8)]
    value, locations, weights = _inputs(shapes, 2, 4, 16, 4, 40)
    value = value.bfloat16()
    output_grad = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(3))
    expected = _gradients(
        multi_scale_deformable_attention, value.double(), shapes, locations.double(), weights.double(), output_grad
    )
    found = _gradients(interpreted.deformable_attention_triton, value, shapes, locations, weights, output_grad)
    assert [gradient.dtype for gradient in found[:3]] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(found[0].double(), expected[0], rtol=1e-2, atol=1e-2)
    for gradient, reference in zip(found[1:3], expected[1:3]):
        scale = reference.abs().max()
        torch.testing.assert_close(gradient.double() / scale, reference / scale, rtol=0, atol=2e-6)


@needs_interpreter
def test_triton_sampler_backward_under_deterministic_algorithms(interpreted):
    """Its values' gradient is a sum in an order the GPU picks (atomics), as grid_sample's CUDA backward: with
    `torch.use_deterministic_algorithms(True)` the backward raises, with `warn_only=True` it warns and runs."""
    shapes = [(4, 4)]
    value, locations, weights = _inputs(shapes, 1, 2, 8, 2, 6)
    output_grad = torch.randn(1, 6, 16)
    was_enabled, was_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation.*warn_only=True"):
            _gradients(interpreted.deformable_attention_triton, value, shapes, locations, weights, output_grad)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            found = _gradients(interpreted.deformable_attention_triton, value, shapes, locations, weights, output_grad)
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
    expected = _gradients(multi_scale_deformable_attention, value, shapes, locations, weights, output_grad)
    for gradient, reference in zip(found, expected):
        torch.testing.assert_close(gradient, reference, rtol=1e-4, atol=1e-4)


@needs_interpreter
def test_triton_sampler_is_differentiable_once(interpreted):
    """Gradients with `create_graph=True` work (first derivatives); a second derivative through them (a gradient
    penalty) is refused with what to use instead, where transformers' grid_sample sampler gives one."""
    shapes = [(4, 4)]
    value, locations, weights = _inputs(shapes, 1, 2, 8, 2, 6)
    value.requires_grad_()
    output = interpreted.deformable_attention_triton(value, shapes, locations, weights)
    (value_grad,) = torch.autograd.grad(output.square().sum(), value, create_graph=True)
    expected = torch.autograd.grad(
        multi_scale_deformable_attention(value, shapes, locations, weights).square().sum(), value
    )[0]
    torch.testing.assert_close(value_grad, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiable once.*multi_scale_deformable_attention"):
        value_grad.sum().backward()


@needs_interpreter
@pytest.mark.parametrize("autocast", [False, True])
def test_deformable_layer_trains_through_the_triton_sampler(interpreted, monkeypatch, autocast):
    """The pixel decoder's deformable layer in training with the Triton sampler chosen for gradients (as a GPU
    session would, in `training_sampler`): the plain kernel forward and backward, one launch each per call (the form
    from the projections has no backward and is not used), and the layer's output and every parameter's gradient
    equal to the same layer on transformers' sampler (float32; and under bf16 autocast, where the kernel reads the
    bf16 values, within bf16 rounding)."""
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention

    torch.manual_seed(0)
    layer = PosSAMMultiscaleDeformableAttention(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
    layer.train()
    shapes = [(4, 4), (2, 2), (1, 1)]  # (small: the interpreter runs each program's loops in Python)
    num_values = sum(height * width for height, width in shapes)
    hidden = torch.randn(2, num_values, 32)
    position = torch.randn(2, num_values, 32)
    reference_points = torch.rand(2, num_values, 3, 2)
    arguments = {
        "encoder_hidden_states": hidden,
        "position_embeddings": position,
        "reference_points": reference_points,
        "spatial_shapes_list": shapes,
    }
    results = {}
    for name, sampler in (("transformers", multi_scale_deformable_attention), ("triton", None)):
        if sampler is None:
            monkeypatch.setattr(
                PosSAMMultiscaleDeformableAttention,
                "training_sampler",
                staticmethod(lambda _: interpreted.deformable_attention_triton),
            )
            forward_launches = count_launches(interpreted, monkeypatch)
            backward_launches = count_launches(interpreted, monkeypatch, "_backward_kernel")
        else:
            monkeypatch.setattr(
                PosSAMMultiscaleDeformableAttention, "training_sampler", staticmethod(lambda _: sampler)
            )
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output, _ = layer(hidden.clone(), **arguments)
        output.float().square().sum().backward()
        results[name] = (output.float(), {key: parameter.grad.clone() for key, parameter in layer.named_parameters()})
    assert len(forward_launches) == 1 and len(backward_launches) == 1
    tolerance = 1e-4 if not autocast else 3e-2
    torch.testing.assert_close(results["triton"][0], results["transformers"][0], rtol=tolerance, atol=tolerance)
    for key, gradient in results["transformers"][1].items():
        found = results["triton"][1][key]
        scale = gradient.abs().max().clamp(min=1e-6)
        torch.testing.assert_close(found / scale, gradient / scale, rtol=0, atol=tolerance, msg=key)


@needs_interpreter
def test_compiled_training_step_calls_the_sampler_and_its_backward_as_ops(interpreted, monkeypatch):
    """`torch.compile(fullgraph=True)` of a deformable layer's forward in training with the Triton sampler chosen for
    gradients: AOTAutograd traces the backward through the op's registered formula, so the compiled step launches the
    forward kernel and the backward kernel once each, and its output and gradients equal the eager step's."""
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention

    torch.manual_seed(0)
    layer = PosSAMMultiscaleDeformableAttention(embed_dim=32, num_heads=4, n_levels=2, n_points=2).train()
    shapes = [(4, 4), (2, 2)]
    num_values = sum(height * width for height, width in shapes)
    hidden, position = torch.randn(2, num_values, 32), torch.randn(2, num_values, 32)
    reference_points = torch.rand(2, num_values, 2, 2)
    monkeypatch.setattr(
        PosSAMMultiscaleDeformableAttention,
        "training_sampler",
        staticmethod(lambda _: interpreted.deformable_attention_triton),
    )

    def forward(hidden):
        output, _ = layer(
            hidden,
            encoder_hidden_states=hidden,
            position_embeddings=position,
            reference_points=reference_points,
            spatial_shapes_list=shapes,
        )
        return output

    results = []
    forward_launches = count_launches(interpreted, monkeypatch)
    backward_launches = count_launches(interpreted, monkeypatch, "_backward_kernel")
    torch._dynamo.reset()
    for runner in (forward, torch.compile(forward, fullgraph=True, backend="aot_eager")):
        layer.zero_grad(set_to_none=True)
        output = runner(hidden)
        output.square().sum().backward()  # the compiled forward's backward graph
        results.append((output.detach(), {name: parameter.grad for name, parameter in layer.named_parameters()}))
    assert len(forward_launches) == 2 and len(backward_launches) == 2  # eager once, compiled once
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], gradient, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def _projection_inputs(shapes, batch, heads, head_dim, points, queries, shared_reference, dtype, seed=0):
    """Value, reference points, offsets in pixels and attention logits as the deformable layer makes them."""
    generator = torch.Generator().manual_seed(seed)
    num_values = sum(height * width for height, width in shapes)
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator).to(dtype)
    reference = torch.rand(1 if shared_reference else batch, queries, len(shapes), 2, generator=generator)
    # offsets of a few pixels either way: some samples fall off the map (zero padding)
    offsets = (torch.randn(batch, queries, heads, len(shapes), points, 2, generator=generator) * 3).to(dtype)
    logits = (torch.randn(batch, queries, heads, len(shapes) * points, generator=generator) * 2).to(dtype)
    return value, reference, offsets, logits


def _transformers_from_projections(value, shapes, reference, offsets, logits):
    """transformers' deformable attention after its projections, in float64: softmax over levels x points, its
    `reference + offsets / (w, h)` locations, its grid_sample sampler."""
    batch, queries, heads, levels, points, _ = offsets.shape
    weights = logits.double().softmax(-1).view(batch, queries, heads, levels, points)
    normalizer = torch.tensor([[width, height] for height, width in shapes], dtype=torch.float64)
    locations = (
        reference.double()[:, :, None, :, None, :] + offsets.double() / normalizer[None, None, None, :, None, :]
    )
    return multi_scale_deformable_attention(value.double(), shapes, locations, weights)


@needs_interpreter
@pytest.mark.parametrize("shared_reference", [True, False])
@pytest.mark.parametrize(
    "shapes, batch, heads, head_dim, points, queries",
    [
        ([(4, 4), (8, 8), (16, 16)], 2, 8, 32, 4, 336),  # PosSAM's layout (3 levels, 8 heads of 32, 4 points)
        ([(3, 5), (7, 2)], 1, 2, 24, 3, 70),  # a head size that is not a power of 2; 70 queries: a partial block
    ],
)
def test_triton_sampler_from_projections_equals_transformers(
    interpreted, shapes, batch, heads, head_dim, points, queries, shared_reference
):
    """The fused form (softmax, locations and sampling in one kernel) against transformers' steps in float64, with
    reference points per image or one set shared by the batch (the pixel decoder's); float32 in, float32 out."""
    inputs = _projection_inputs(shapes, batch, heads, head_dim, points, queries, shared_reference, torch.float32)
    expected = _transformers_from_projections(*inputs[:1], shapes, *inputs[1:])
    value, reference, offsets, logits = inputs
    with torch.inference_mode():
        found = interpreted.deformable_attention_triton_from_projections(value, shapes, reference, offsets, logits)
    assert found.dtype == torch.float32 and found.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(found.double(), expected, rtol=0, atol=1e-5)


@needs_interpreter
def test_triton_sampler_from_projections_in_bf16_computes_in_float32(interpreted):
    """A bf16 model's values, offsets and logits: everything computed in float32 from those bf16 numbers (each exact
    in float32), the output rounded once to bf16, the values' dtype: within bf16's half-spacing of the float64
    result of the same numbers, and 5-d logits (levels, points) read as the same numbers."""
    shapes = [(4, 4), (8, 8)]
    value, reference, offsets, logits = _projection_inputs(shapes, 2, 4, 16, 4, 40, True, torch.bfloat16)
    expected = _transformers_from_projections(value, shapes, reference, offsets, logits)
    with torch.inference_mode():
        found = interpreted.deformable_attention_triton_from_projections(value, shapes, reference, offsets, logits)
        five_d = interpreted.deformable_attention_triton_from_projections(
            value, shapes, reference, offsets, logits.view(2, 40, 4, 2, 4)
        )
    assert found.dtype == torch.bfloat16 and torch.equal(found, five_d)
    # bf16 keeps 8 significant bits: rounding once to nearest is within 2**-8 relative, toward zero within 2**-7,
    # and Triton 3.8's interpreter converts float32 to bf16 toward zero whatever `fp_downcast_rounding` says (a GPU
    # rounds to nearest, Triton's default); plus float32's order of sums
    torch.testing.assert_close(found.double(), expected, rtol=2**-7, atol=1e-5)


@needs_interpreter
def test_triton_sampler_from_projections_refuses_what_it_cannot_do(interpreted):
    """Each refusal names the input and the shape or dtype it must have."""
    shapes = [(4, 4)]
    value, reference, offsets, logits = _projection_inputs(shapes, 2, 2, 8, 2, 6, False, torch.float32)
    fused = interpreted.deformable_attention_triton_from_projections
    with pytest.raises(RuntimeError, match="inference only"):
        fused(value, shapes, reference, offsets.clone().requires_grad_(), logits)
    with pytest.raises(ValueError, match="float32, bf16 or fp16 tensors, got torch.float32 values, torch.float64"):
        fused(value, shapes, reference.double(), offsets, logits)
    with pytest.raises(ValueError, match="do not add up"):
        fused(value, [(4, 3)], reference, offsets, logits)
    with pytest.raises(ValueError, match=r"offsets \(2, 6, 2, 1, 2\) must be \(B, Q, heads, levels, points, 2\)"):
        fused(value, shapes, reference, offsets[..., 0], logits)
    with pytest.raises(ValueError, match=r"attention_logits \(2, 6, 2, 1\) must be"):
        fused(value, shapes, reference, offsets, logits[..., :1])
    with pytest.raises(ValueError, match=r"reference_points \(3, 6, 1, 2\) must be \(B or 1, Q, levels, 2\)"):
        fused(value, shapes, torch.cat([reference, reference[:1]]), offsets, logits)
    # (x, y) and nothing else: 3 numbers per offset would be read as the next sample's in silence, 1 past the end
    with pytest.raises(ValueError, match=r"offsets \(2, 6, 2, 1, 2, 3\) must be"):
        fused(value, shapes, reference, torch.cat([offsets, offsets[..., :1]], -1), logits)
    # as many logits in another layout (heads merged into levels x points): refused, not read as if they were not
    with pytest.raises(ValueError, match=r"attention_logits \(2, 6, 1, 4\) must be"):
        fused(value, shapes, reference, offsets, logits.reshape(2, 6, 1, 4))
    with pytest.raises(ValueError, match="move them to one device"):
        fused(value, shapes, reference.to("meta"), offsets, logits)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_with_the_fused_triton_sampler_equals_the_default(dtype, monkeypatch):
    """The whole tiny model with CUDA's sampler chosen (`deformable_attention_triton`, whose fused form each layer
    then calls: one kernel from the projections): the outputs of the default sampler, to float32 rounding in float32
    and to the model's own rounding in bf16; with `output_attentions` the layers take the unfused form and return
    their attention weights (softmax over levels x points: they sum to 1)."""
    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMModel, tiny_config
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention
    from transformers_possam.modeling.deformable_sampling_triton import (
        deformable_attention_triton,
        deformable_attention_triton_from_projections,
    )

    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval().to(dtype)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size).to(dtype)
    class_embeddings = torch.nn.functional.normalize(torch.randn(4, 1, model.config.clip_embed_dim), dim=-1).to(dtype)
    fused_calls, plain_calls = [], []

    def fused(value, *arguments):
        fused_calls.append(value.dtype)
        # the kernel on the float32 copy of the values (each exact: the same sums), its output rounded to their
        # dtype by PyTorch, to nearest as a GPU's Triton rounds: the interpreter rounds toward zero, which moves this
        # bf16 model's class logits by up to 0.125 of 6.3 (to nearest: 0.031)
        return deformable_attention_triton_from_projections(value.float(), *arguments).to(value.dtype)

    def plain(*arguments):
        plain_calls.append(arguments[0].dtype)
        return deformable_attention_triton(*arguments)

    plain.reads_reduced_precision_values = True
    plain.inference_only = True
    plain.from_projections = fused
    with torch.inference_mode():
        expected = model(pixels, class_embeddings=class_embeddings)
        monkeypatch.setattr(PosSAMMultiscaleDeformableAttention, "sampler", staticmethod(lambda _: plain))
        found = model(pixels, class_embeddings=class_embeddings)
        assert fused_calls == [dtype] * model.config.encoder_layers and not plain_calls
        base = PosSAMModel(model.config).eval().to(dtype)
        with_attentions = base.pixel_decoder(
            base.fpn(base.vision_encoder(pixels).last_hidden_state), output_attentions=True, return_dict=True
        )
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for name in ("masks_queries_logits", "class_queries_logits"):
        torch.testing.assert_close(found[name].float(), expected[name].float(), rtol=tolerance, atol=tolerance)
    assert len(plain_calls) == model.config.encoder_layers and len(fused_calls) == model.config.encoder_layers
    weights = with_attentions.attentions
    assert len(weights) == model.config.encoder_layers and all(layer.dtype == dtype for layer in weights)
    for layer in weights:
        torch.testing.assert_close(layer.float().flatten(-2).sum(-1), torch.ones(layer.shape[:-2]), rtol=0, atol=2e-2)


@needs_interpreter
def test_gpu_candidates_offer_the_triton_sampler_where_triton_runs(interpreted):
    """benchmarks/gpu_candidates.py's sampler list: the fused kernel, with float32 and with bf16 values, where
    Triton runs (here its interpreter), each within its rounding of transformers' sampler."""
    from .conftest import load_script

    candidates = load_script("benchmarks/gpu_candidates.py").samplers(with_cpu_steps=False, device=torch.device("cpu"))
    shapes = [(4, 4), (8, 8)]
    value, locations, weights = _inputs(shapes, 1, 2, 8, 2, 20)
    expected = multi_scale_deformable_attention(value.double(), shapes, locations.double(), weights.double())
    with torch.inference_mode():
        for name, tolerance in (("triton_fused", 1e-5), ("triton_fused_bf16_values", 3e-2)):
            found = candidates[name](value, shapes, locations, weights)
            torch.testing.assert_close(found.double(), expected, rtol=0, atol=tolerance)


def _assignment_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, 12, 16, generator=generator) * 4
    scores = torch.rand(7, generator=generator)
    keep = torch.tensor([True, True, False, True, True, False, True])
    return logits, torch.where(keep, scores, 0.0), torch.where(keep, 0.0, -1.0)


@needs_interpreter
@pytest.mark.parametrize(
    "steps",
    [
        [((48, 64), (40, 50)), ((33, 47), None)],  # FC-CLIP's chain: to the padded input, crop, to the image size
        [((48, 64), None)],  # one resize
        [],  # none: the masks' own size
    ],
)
def test_triton_pixel_assignment_equals_the_pytorch_path(steps):
    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.dense_assignment_triton import pixel_assignment_triton

    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 48, "width": 64})
    processor._resize_steps = lambda reshaped, target: steps  # the chain under test, whatever the sizes
    logits, kept_score, kept_offset = _assignment_inputs()
    with torch.inference_mode():
        expected = processor._pixel_assignment_by_chunks(logits, kept_score, kept_offset, 0.5, None, None)
        found = pixel_assignment_triton(logits, kept_score, kept_offset, steps, 0.5)
    assert torch.equal(found[0], expected[0])  # the winning query of every pixel
    # its probability, to float32 rounding: the chain applied as one composed map, not step by step
    torch.testing.assert_close(found[1], expected[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(found[2], expected[2])  # every query's own area


@needs_interpreter
def test_triton_pixel_assignment_across_chunks_and_on_exact_ties():
    """40 queries (the PyTorch path's chunks of 16 and its merge between them), each of the first 20 repeated
    exactly as query i + 20 with the same score: every pixel is an exact tie, which both give to the first query
    (argmax's rule); a downsampling chain too."""
    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.dense_assignment_triton import pixel_assignment_triton

    generator = torch.Generator().manual_seed(3)
    half = torch.randn(20, 12, 16, generator=generator) * 4
    logits = torch.cat([half, half])
    kept_score = torch.rand(20, generator=generator).repeat(2)
    kept_offset = torch.zeros(40)
    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 48, "width": 64})
    for steps in ([((48, 64), (40, 50)), ((33, 47), None)], [((7, 9), None)]):
        processor._resize_steps = lambda reshaped, target, steps=steps: steps
        with torch.inference_mode():
            expected = processor._pixel_assignment_by_chunks(logits, kept_score, kept_offset, 0.5, None, None)
            found = pixel_assignment_triton(logits, kept_score, kept_offset, steps, 0.5)
        assert torch.equal(found[0], expected[0]) and bool((found[0] < 20).all())
        assert torch.equal(found[2], expected[2])


@needs_interpreter
def test_triton_pixel_assignment_reads_no_padding_tap():
    """An infinite logit in one corner of one query's map: pixels whose interpolation does not read that corner keep
    their winner and probability. Before padding taps (weight 0) were masked, every pixel with one read the corner,
    0 * inf made that query's value NaN there, and it silently lost those pixels (and part of its own area)."""
    from transformers_possam.dense_assignment_triton import pixel_assignment_triton

    logits, kept_score, kept_offset = _assignment_inputs()
    steps = [((48, 64), (40, 50)), ((33, 47), None)]
    with torch.inference_mode():
        finite_query, finite_probability, _ = pixel_assignment_triton(logits, kept_score, kept_offset, steps, 0.5)
        logits[1, 0, 0] = float("inf")
        best_query, probability, _ = pixel_assignment_triton(logits, kept_score, kept_offset, steps, 0.5)
    far = (slice(8, None), slice(8, None))  # beyond the corner's reach through two bilinear resizes
    assert bool((finite_query[far] == 1).any())  # query 1 wins pixels away from the corner, which it must keep
    assert torch.equal(best_query[far], finite_query[far]) and torch.equal(probability[far], finite_probability[far])


@needs_interpreter
def test_triton_pixel_assignment_with_nothing_kept_gives_query_0_everywhere():
    """No query kept: every weighted value is -1, the first query wins every pixel (argmax's rule), as in PyTorch."""
    from transformers_possam import PosSAMImageProcessor
    from transformers_possam.dense_assignment_triton import pixel_assignment_triton

    processor = PosSAMImageProcessor(size={"longest_edge": 64}, pad_size={"height": 48, "width": 64})
    processor._resize_steps = lambda reshaped, target: [((24, 32), None)]
    logits, _, _ = _assignment_inputs(1)
    with torch.inference_mode():
        found = pixel_assignment_triton(logits, torch.zeros(7), -torch.ones(7), [((24, 32), None)], 0.5)
        expected = processor._pixel_assignment_by_chunks(logits, torch.zeros(7), -torch.ones(7), 0.5, None, None)
    assert torch.equal(found[0], torch.zeros(24, 32, dtype=torch.long)) and torch.equal(found[0], expected[0])
    assert torch.equal(found[2], expected[2])


@needs_interpreter
def test_post_processing_with_the_triton_assignment_equals_without(monkeypatch):
    """The whole panoptic post-processing (dense path, MASE, FC-CLIP's resize chain with a crop) of a tiny model's
    outputs, with `assigns_pixels_with_triton` answering yes as it does on CUDA (here Triton's interpreter runs the
    kernel): the same segmentation and segments as the PyTorch path, and the kernel did run."""
    from transformers_possam import dense_assignment_triton
    from transformers_possam.postprocessing import PosSAMPostProcessingMixin

    from .conftest import tiny_model_outputs

    processor, outputs, size = tiny_model_outputs(batch=2)

    def post():
        return processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[(size - 5, size - 9), (size, size)], dense_assignment=True
        )

    expected = post()
    launches = count_launches(dense_assignment_triton, monkeypatch)
    monkeypatch.setattr(PosSAMPostProcessingMixin, "assigns_pixels_with_triton", staticmethod(lambda logits: True))
    found = post()
    assert len(launches) == 2  # one launch per image
    assert any(result["segments_info"] for result in expected)
    for got, want in zip(found, expected):
        assert got["segments_info"] == want["segments_info"]
        assert torch.equal(got["segmentation"], want["segmentation"])


def test_the_triton_pixel_assignment_is_the_cuda_default(monkeypatch):
    """Where the dense post-processing runs `pixel_assignment_triton`: on CUDA logits outside autograd where Triton
    runs (installed here), never on CPU ones (not even under Triton's interpreter, which is for tests)."""
    from transformers_possam import postprocessing
    from transformers_possam.postprocessing import PosSAMPostProcessingMixin

    chooses = PosSAMPostProcessingMixin.assigns_pixels_with_triton
    with FakeTensorMode():  # CUDA-placed logits without a GPU (shapes and devices only)
        cuda_logits = torch.empty(2, 4, 4, device="cuda")
        cuda_logits_with_gradient = torch.empty(2, 4, 4, device="cuda", requires_grad=True)
    monkeypatch.setattr(postprocessing, "triton_runs_on", lambda device: device.type == "cuda")  # a CUDA machine
    assert not chooses(cuda_logits)  # fake tensors have no memory for a kernel to read
    monkeypatch.setattr(postprocessing, "is_fake", lambda tensor: False)  # as real CUDA logits
    assert chooses(cuda_logits)
    assert not chooses(cuda_logits_with_gradient)  # the kernel has no backward
    with torch.no_grad():
        assert chooses(cuda_logits_with_gradient)
    assert not chooses(torch.zeros(2, 4, 4))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not chooses(torch.zeros(2, 4, 4))  # the interpreter is for tests, not a CPU default
    monkeypatch.setattr(postprocessing, "triton_runs_on", lambda device: False)  # CUDA without Triton
    assert not chooses(cuda_logits)


@needs_interpreter
def test_triton_pixel_assignment_refuses_what_it_cannot_do(monkeypatch):
    from transformers_possam.dense_assignment_triton import pixel_assignment_triton

    logits, kept_score, kept_offset = _assignment_inputs()
    with pytest.raises(RuntimeError, match="inference only"):
        pixel_assignment_triton(logits.requires_grad_(), kept_score, kept_offset, [], 0.5)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA and Triton"):
        pixel_assignment_triton(logits.detach(), kept_score, kept_offset, [], 0.5)


def test_resize_taps_rebuild_the_resize_matrix():
    """`resize_taps` holds every nonzero entry of the chain's matrix (`resize_matrix`: F.interpolate applied to the
    identity) and nothing else: the matrix rebuilt from the taps is the matrix, for an upsampling chain with a crop, a
    downsampling one and the identity."""
    from transformers_possam.dense_assignment_triton import resize_taps
    from transformers_possam.mask_resampling import resize_matrix

    for in_size, steps in ((12, ((48, 40), (33, None))), (40, ((17, None),)), (9, ())):
        indices, weights = resize_taps(in_size, steps)
        matrix = resize_matrix(in_size, steps, "cpu")
        rebuilt = torch.zeros_like(matrix).scatter_add_(1, indices.long(), weights)
        assert torch.equal(rebuilt, matrix), (in_size, steps)
        assert indices.dtype == torch.int32 and weights.shape == indices.shape


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_model_with_the_triton_sampler_equals_the_default(dtype, monkeypatch):
    """The whole tiny model with the Triton sampler chosen (as a GPU session would, in `sampler`): the same outputs as
    with the default sampler, to float32 rounding in float32 and to the model's own rounding in bf16 (where the
    sampler reads the bf16 values without a float32 copy)."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention
    from transformers_possam.modeling.deformable_sampling_triton import deformable_attention_triton

    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval().to(dtype)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size).to(dtype)
    class_embeddings = torch.nn.functional.normalize(torch.randn(4, 1, model.config.clip_embed_dim), dim=-1).to(dtype)
    with torch.inference_mode():
        expected = model(pixels, class_embeddings=class_embeddings)
        received = []

        def recording(value, *arguments):
            received.append(value.dtype)
            return deformable_attention_triton(value, *arguments)

        recording.reads_reduced_precision_values = True
        monkeypatch.setattr(PosSAMMultiscaleDeformableAttention, "sampler", staticmethod(lambda _: recording))
        found = model(pixels, class_embeddings=class_embeddings)
    assert received and set(received) == {dtype}  # bf16 values reach the kernel as they are
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    for name in ("masks_queries_logits", "class_queries_logits"):
        torch.testing.assert_close(found[name].float(), expected[name].float(), rtol=tolerance, atol=tolerance)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sampler_ops_pass_torch_librarys_opcheck(interpreted, dtype):
    """`torch.library.opcheck`, PyTorch's own checker of custom ops, on the sampler ops and the backward op: schema
    (no input mutated or aliased), the fake implementation against the real one (shapes, strides, dtypes), autograd
    registration, and AOTAutograd's tracing with static and dynamic shapes (with inputs that need gradients, of the
    backward too); with contiguous and strided values."""
    shapes = [(4, 4), (3, 5)]
    value, locations, weights = _inputs(shapes, 2, 2, 8, 2, 6)
    projections = _projection_inputs(shapes, 2, 2, 8, 2, 6, True, dtype)
    sizes = interpreted._sizes_key(shapes)
    levels = interpreted._level_tables(sizes, value.device, like=value)
    strided = torch.randn(*value.shape[:-1], 16).to(dtype)[..., ::2]
    for values in (value.to(dtype), strided):
        torch.library.opcheck(
            interpreted._sample_op, (values, interpreted._flat_sizes(sizes), levels, locations, weights)
        )
    torch.library.opcheck(
        interpreted._from_projections_op, (projections[0], interpreted._flat_sizes(sizes), levels, *projections[1:])
    )
    # with gradients: the autograd registration, and AOTAutograd's trace of the backward through its own op
    trainable = [
        value.to(dtype).clone().requires_grad_(),
        locations.clone().requires_grad_(),
        weights.clone().requires_grad_(),
    ]
    torch.library.opcheck(
        interpreted._sample_op, (trainable[0], interpreted._flat_sizes(sizes), levels, trainable[1], trainable[2])
    )
    output_grad = torch.randn(2, 6, 16)
    torch.library.opcheck(
        interpreted._sample_backward_op,
        (value.to(dtype), interpreted._flat_sizes(sizes), levels, locations, weights, output_grad),
    )


@needs_interpreter
@pytest.mark.parametrize("output_attentions", [False, True])
def test_compiled_tiny_model_calls_the_triton_sampler_as_an_op(output_attentions, monkeypatch):
    """`torch.compile(model, fullgraph=True)` with CUDA's sampler chosen (here on CPU tensors, run by Triton's
    interpreter): the kernel is a custom op with a fake implementation, so the compiled graph calls it (one launch per
    deformable layer: the form from the projections, or with `output_attentions` the plain form after the layer's
    softmax) instead of transformers' grid_sample version, and the outputs are the eager default's to float32
    rounding. The op's level table comes from the graph, so nothing made by the compiled call outlives it."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
    from transformers_possam.modeling import deformable_sampling_triton
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention

    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    class_embeddings = torch.nn.functional.normalize(torch.randn(4, 1, model.config.clip_embed_dim), dim=-1)
    arguments = {"class_embeddings": class_embeddings, "output_attentions": output_attentions}
    with torch.no_grad():
        expected = model(pixels, **arguments)
    monkeypatch.setattr(
        PosSAMMultiscaleDeformableAttention,
        "sampler",
        staticmethod(lambda _: deformable_sampling_triton.deformable_attention_triton),
    )
    launches = count_launches(deformable_sampling_triton, monkeypatch)
    deformable_sampling_triton._level_tables.cache_clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        found = compiled(pixels, **arguments)
    assert len(launches) == model.config.encoder_layers
    # the level table is the graph's (made in the trace), not the eager cache's: a compiled call, even the first of
    # the process, leaves no tensor of its own alive (under CUDA graphs one would sit in the graph's memory pool)
    assert deformable_sampling_triton._level_tables.cache_info().currsize == 0
    for name in ("masks_queries_logits", "class_queries_logits"):
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def _attention_inputs(batch, heads, size, head_dim, dtype=torch.float32, seed=0, table_rows=None):
    """q, k, v as the layer has them, views of one qkv projection `(B, tokens, 3, heads, d)` (strided, d contiguous),
    and the two relative-position row tables as the layer makes them, transformers' `get_rel_pos` (`(n, n, d)`) of
    tables of `2 n - 1` rows (or of `table_rows` rows, resized by it), drawn large enough for the bias to matter."""
    from transformers.models.sam.modeling_sam import SamVisionAttention

    generator = torch.Generator().manual_seed(seed)
    tokens = size[0] * size[1]
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, generator=generator).to(dtype).permute(2, 0, 3, 1, 4)
    tables = [
        torch.randn(table_rows or 2 * n - 1, head_dim, generator=generator, dtype=torch.float64) * 0.3 for n in size
    ]
    rows = [SamVisionAttention.get_rel_pos(None, n, n, table).to(dtype) for n, table in zip(size, tables)]
    return (*qkv.unbind(0), *rows)


@needs_interpreter
@pytest.mark.parametrize(
    "batch, heads, size, head_dim, table_rows",
    [
        (3, 12, (14, 14), 64, None),  # SAM-B's windows
        (1, 2, (14, 14), 80, None),  # SAM-H's head size (not a power of 2)
        (2, 3, (5, 7), 24, None),  # a rectangular grid, rows narrower than a step
        (1, 1, (3, 70), 16, None),  # rows wider than a step (padded to 128 lanes)
        (1, 2, (1, 1), 8, None),  # one token
        (1, 2, (2, 9), 24, None),  # fewer grid rows than a step's key rows (4 rows of 16 lanes)
        (1, 1, (1, 5), 16, None),  # one grid row
        (1, 2, (8, 8), 16, 27),  # SAM-B's window tables resized to another grid (interpolated rows)
    ],
)
def test_triton_sam_attention_equals_the_softmax_attention_in_float64(batch, heads, size, head_dim, table_rows):
    """`relative_position_attention_triton` against SAM's attention written out (scores, decomposed bias with
    transformers' einsums, softmax, values) in float64 on the same strided views: float32 to its rounding."""
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    query, key, value, relative_height, relative_width = _attention_inputs(
        batch, heads, size, head_dim, table_rows=table_rows
    )
    height, width = size
    # the reference: transformers' SamVisionAttention.add_decomposed_rel_pos, spelled out on (B * heads) sequences
    q64, k64, v64, rh64, rw64 = (tensor.double() for tensor in (query, key, value, relative_height, relative_width))
    grid_query = q64.reshape(batch * heads, height, width, head_dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", grid_query, rh64)
    rel_w = torch.einsum("bhwc,wkc->bhwk", grid_query, rw64)
    scores = (q64 * head_dim**-0.5) @ k64.transpose(-1, -2)
    scores = scores.reshape(batch * heads, height, width, height, width)
    scores = scores + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    probabilities = scores.reshape(batch, heads, height * width, height * width).softmax(-1)
    expected = probabilities @ v64
    with torch.inference_mode():
        found = relative_position_attention_triton(query, key, value, relative_height, relative_width, size)
        # the candidate setting, 128 queries per program (SAM-B's windows: 196 queries, two programs)
        found_128 = relative_position_attention_triton(
            query, key, value, relative_height, relative_width, size, block_queries=128
        )
    assert found.shape == expected.shape and found.dtype == torch.float32
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found_128.double(), expected, rtol=1e-5, atol=1e-5)
    # its output is a view of the (B, tokens, heads, d) layout the output projection reads: moving the heads back
    # next to the channels copies nothing
    assert found.transpose(1, 2).is_contiguous()


def test_sam_attention_function_by_device_and_the_triton_kernel_not_yet_chosen():
    """`PosSAMVisionAttention.attention_function`: the blocked form on CPU, SDPA with the bias as extra channels
    everywhere else. The Triton kernel is a candidate until a GPU has timed it: it must not become CUDA's choice by
    accident."""
    from transformers_possam.modeling.sam_attention import (
        PosSAMVisionAttention,
        relative_position_attention,
        relative_position_attention_blocked,
    )

    choose = PosSAMVisionAttention.attention_function
    assert choose("cpu") is relative_position_attention_blocked
    assert choose("cuda") is choose("mps") is choose("xpu") is relative_position_attention


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_sam_attention_in_half_precision_is_as_close_as_the_default_path(dtype):
    """bf16 and fp16 inputs: the kernel (scores and softmax in float32, probabilities rounded to the inputs' dtype for
    the second matmul) is within twice the rounding error of the default path in that dtype
    (`relative_position_attention`, SDPA with the bias as extra channels) of the float64 result on the same values,
    and returns that dtype."""
    from transformers_possam.modeling.sam_attention import relative_position_attention
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    inputs = _attention_inputs(2, 4, (14, 14), 64, dtype=dtype)
    size = (14, 14)
    with torch.inference_mode():
        exact = relative_position_attention(*(tensor.double() for tensor in inputs), size)
        default = relative_position_attention(*inputs, size)
        found = relative_position_attention_triton(*inputs, size)
    assert found.dtype == dtype and bool(found.isfinite().all())
    default_error = float((default.double() - exact).abs().max())
    found_error = float((found.double() - exact).abs().max())
    assert 0 < found_error <= 2 * default_error, (found_error, default_error)


@needs_interpreter
@pytest.mark.parametrize("window_size", [4, 0])  # windowed, and global over the whole grid
def test_sam_attention_layer_with_the_triton_kernel_equals_transformers(window_size, monkeypatch):
    """The whole attention layer with `attention_function` choosing the Triton kernel (as a GPU session would):
    the same output as transformers' own `SamVisionSdpaAttention` with the same weights; in training (gradients
    needed) the layer takes the SDPA form instead, and its gradients flow."""
    from transformers import SamVisionConfig

    from transformers_possam.modeling import sam_attention_triton
    from transformers_possam.modeling.sam_attention import PosSAMVisionAttention

    from .conftest import sam_attention_pair

    config = SamVisionConfig(hidden_size=48, num_attention_heads=3, image_size=128, patch_size=16)
    reference, ours = sam_attention_pair(config, window_size)
    launches = count_launches(sam_attention_triton, monkeypatch)
    monkeypatch.setattr(
        PosSAMVisionAttention,
        "attention_function",
        staticmethod(lambda device_type: sam_attention_triton.relative_position_attention_triton),
    )
    grid = window_size or 8
    hidden_states = torch.randn(2, grid, grid, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(hidden_states)[0]
        found = ours(hidden_states)[0]
    assert len(launches) == 1
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    ours.train()
    trained = ours(hidden_states)[0]  # gradients needed: the SDPA form, no launch
    assert len(launches) == 1
    torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
    trained.sum().backward()
    assert ours.rel_pos_h.grad is not None and ours.qkv.weight.grad is not None


@needs_interpreter
def test_sam_attention_layer_with_the_triton_kernel_gives_way_where_it_cannot_run(monkeypatch):
    """With the kernel chosen, a float64 layer and a shape-only (fake-tensor) run take the SDPA form, without a
    launch: float64 against transformers' layer, the fake run's output shape and dtype as the real one's."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    from transformers import SamVisionConfig

    from transformers_possam.modeling import sam_attention_triton
    from transformers_possam.modeling.sam_attention import PosSAMVisionAttention

    from .conftest import sam_attention_pair

    launches = []
    monkeypatch.setattr(sam_attention_triton, "_kernel", lambda: launches.append(1))  # a launch would fail loudly
    monkeypatch.setattr(
        PosSAMVisionAttention,
        "attention_function",
        staticmethod(lambda device_type: sam_attention_triton.relative_position_attention_triton),
    )
    config = SamVisionConfig(hidden_size=48, num_attention_heads=3, image_size=128, patch_size=16)
    reference, ours = sam_attention_pair(config, 4)
    reference, ours = reference.double(), ours.double()
    hidden_states = torch.randn(2, 4, 4, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(ours(hidden_states)[0], reference(hidden_states)[0])
        ours.float()
        with FakeTensorMode(allow_non_fake_inputs=True):
            fake = ours(torch.empty(2, 4, 4, 48))[0]
    assert is_fake(fake) and fake.shape == (2, 4, 4, 48) and fake.dtype == torch.float32
    assert not launches


@needs_interpreter
def test_triton_sam_attention_rounds_float32_rows_to_the_querys_dtype():
    """Under autocast the qkv projection is bf16 while the layer's relative-position tables stay float32 (the default
    path's einsums run in bf16): the kernel takes float32 rows beside a bf16 query and rounds them to bf16 as it
    reads them, giving what the same rows rounded to bf16 beforehand give, up to the rounding itself (Triton's
    interpreter converts float32 to bf16 by truncation, torch to the nearest), and a bf16 result."""
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    query, key, value, relative_height, relative_width = _attention_inputs(2, 2, (4, 6), 16)
    query, key, value = (tensor.to(torch.bfloat16) for tensor in (query, key, value))
    with torch.inference_mode():
        from_float32 = relative_position_attention_triton(query, key, value, relative_height, relative_width, (4, 6))
        rounded = relative_position_attention_triton(
            query, key, value, relative_height.bfloat16(), relative_width.bfloat16(), (4, 6)
        )
    assert from_float32.dtype == torch.bfloat16
    torch.testing.assert_close(from_float32, rounded, rtol=2e-2, atol=2e-2)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sam_attention_op_passes_torch_librarys_opcheck(dtype):
    """`torch.library.opcheck` on the SAM attention op: schema (no input mutated or aliased), the fake
    implementation against the real one (shapes, strides: a view of a `(B, N, heads, d)` tensor, dtypes), autograd
    registration, AOTAutograd's tracing with static and dynamic shapes; on the qkv projection's strided views, at a
    head size of two channel blocks."""
    from transformers_possam.modeling import sam_attention_triton

    inputs = _attention_inputs(2, 2, (3, 4), 24, dtype=dtype)
    torch.library.opcheck(sam_attention_triton._attend_op, (*inputs, [3, 4], 8, 64))


@needs_interpreter
def test_compiled_tiny_model_calls_the_triton_sam_attention_as_an_op(monkeypatch):
    """`torch.compile(model, fullgraph=True)` with the SAM kernel chosen (here on CPU tensors, run by Triton's
    interpreter): the kernel is a custom op, so the compiled graph calls it, once per SAM layer (windowed and global),
    instead of giving way to the SDPA form, and the outputs are the eager default's to float32 rounding."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
    from transformers_possam.modeling import sam_attention_triton
    from transformers_possam.modeling.sam_attention import PosSAMVisionAttention

    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    for layer in model.modules():  # tables drawn large enough for the bias to matter
        if isinstance(layer, PosSAMVisionAttention):
            torch.nn.init.normal_(layer.rel_pos_h, std=0.5)
            torch.nn.init.normal_(layer.rel_pos_w, std=0.5)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size)
    class_embeddings = torch.nn.functional.normalize(torch.randn(4, 1, model.config.clip_embed_dim), dim=-1)
    with torch.no_grad():
        expected = model(pixels, class_embeddings=class_embeddings)
    monkeypatch.setattr(
        PosSAMVisionAttention,
        "attention_function",
        staticmethod(lambda device_type: sam_attention_triton.relative_position_attention_triton),
    )
    launches = count_launches(sam_attention_triton, monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        found = compiled(pixels, class_embeddings=class_embeddings)
    assert len(launches) == model.config.vision_config.num_hidden_layers
    for name in ("masks_queries_logits", "class_queries_logits"):
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@needs_interpreter
def test_triton_sam_attention_refuses_what_it_cannot_do(monkeypatch):
    from transformers_possam.modeling import sam_attention_triton
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    query, key, value, relative_height, relative_width = _attention_inputs(1, 2, (4, 4), 8)
    with pytest.raises(RuntimeError, match="inference only"):
        relative_position_attention_triton(query.requires_grad_(), key, value, relative_height, relative_width, (4, 4))
    query = query.detach()
    with pytest.raises(ValueError, match="float64"):
        relative_position_attention_triton(
            query.double(), key.double(), value.double(), relative_height.double(), relative_width.double(), (4, 4)
        )
    with pytest.raises(ValueError, match=r"H \* W = 4 \* 5"):
        relative_position_attention_triton(query, key, value, relative_height, relative_width, (4, 5))
    for block_queries in (8, 48):  # below tl.dot's 16, not a power of 2
        with pytest.raises(ValueError, match="block_queries must be a power of 2 >= 16"):
            relative_position_attention_triton(
                query, key, value, relative_height, relative_width, (4, 4), block_queries=block_queries
            )
        with pytest.raises(ValueError, match="block_queries must be a power of 2 >= 16"):  # the op itself checks
            sam_attention_triton._attend_op(
                query, key, value, relative_height, relative_width, [4, 4], 8, block_queries
            )
    with pytest.raises(ValueError, match=r"must be \(H, H, d\) = \(4, 4, 8\)"):  # tables of another layer
        relative_position_attention_triton(query, key, value, relative_height[:3], relative_width, (4, 4))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="needs CUDA and Triton"):
        relative_position_attention_triton(query, key, value, relative_height, relative_width, (4, 4))


@needs_interpreter
def test_gpu_candidates_offer_the_triton_sam_attention_where_triton_runs():
    """benchmarks/gpu_candidates.py's SAM attention section (tiny shapes): the Triton kernel among the variants where
    Triton runs (here its interpreter), within float32 rounding of CUDA's path."""
    from .conftest import load_script

    candidates = load_script("benchmarks/gpu_candidates.py")
    assert "triton_flash" in candidates.sam_attention_variants(torch.device("cpu"))
    rows = candidates.sam_attention_candidates(torch.device("cpu"), batch=1, repeats=1, tiny=True)
    for row in rows.values():
        assert row["triton_flash"]["max_abs_difference"] < 1e-4, row
        assert row["triton_flash_4_warps"]["max_abs_difference"] < 1e-4, row
        assert row["triton_flash_128_queries"]["max_abs_difference"] < 1e-4, row


@needs_interpreter
def test_device_check_of_the_triton_sam_attention_runs_where_triton_runs():
    """benchmarks/device_check.py's `sam_attention_triton` (small shapes under Triton's interpreter): it runs the
    kernel against the float32 result and reports its error beside the default path's, times both, and runs the op
    in a compiled function (here AOTAutograd's eager backend), exactly the eager kernel's output."""
    from .conftest import load_script

    device_check = load_script("benchmarks/device_check.py")
    details = device_check.check_sam_attention_triton(device_check.Context(torch.device("cpu")))
    compiled = details.pop("compiled")
    assert compiled["max_abs_difference"] == 0 and not compiled["cuda_graphs"]
    assert set(details) == {"sam_b_windowed", "sam_b_global", "sam_h_windowed", "sam_h_global"}
    for row in details.values():
        assert 0 < row["max_abs_error"] <= 2 * row["default_max_abs_error"] + 1e-3, row
        assert row["triton_ms"] > 0 and row["triton_128_queries_ms"] > 0 and row["default_ms"] > 0


@needs_interpreter
def test_device_check_of_the_triton_sam_attention_keeps_its_figures_when_its_compiled_step_fails(monkeypatch):
    """A failure of the check's compiled step (a Dynamo, inductor or CUDA graph problem on the device's torch) makes
    the check not ok, with the error, but every shape's figures measured before it are kept."""
    from .conftest import load_script

    device_check = load_script("benchmarks/device_check.py")

    def fails(*arguments):
        raise RuntimeError("inductor: no lowering")

    monkeypatch.setattr(device_check, "_sam_attention_kernel_compiled", fails)
    details = device_check.check_sam_attention_triton(device_check.Context(torch.device("cpu")))
    assert details["ok"] is False and details["compiled"] == {"error": "RuntimeError: inductor: no lowering"}
    assert {"sam_b_windowed", "sam_b_global", "sam_h_windowed", "sam_h_global"} <= set(details)
    assert all("triton_ms" in details[name] for name in ("sam_b_windowed", "sam_h_global"))


@needs_interpreter
def test_device_check_of_the_sampler_backward_compares_and_times_it(monkeypatch):
    """benchmarks/device_check.py's `deformable_backward_triton` (small shapes under Triton's interpreter): the
    kernel's gradients within its limits of transformers' (the value's in bf16) at its batch and at odd shapes, both
    forward + backward timed; and a sampler whose gradients are off (here: locations moved by 1%) makes it not ok,
    figures kept (a check that cannot fail would prove nothing)."""
    from transformers_possam.modeling import deformable_sampling_triton

    from .conftest import load_script

    device_check = load_script("benchmarks/device_check.py")
    context = device_check.Context(torch.device("cpu"))
    details = device_check.check_deformable_backward_triton(context)
    assert set(details) == {"batch_1", "odd_shapes"}, details  # (batches 2 and 8 on a GPU)
    for name, row in details.items():
        assert row["value_grad_dtype"] == "torch.bfloat16"
        assert row["relative_errors"]["value"] <= 1e-2 and row["relative_errors"]["locations"] <= 1e-3, row
        assert row["elements_off"] == {"value": 0, "locations": 0, "weights": 0}, row
        if name != "odd_shapes":  # (timed at PosSAM's shapes only)
            assert row["triton_forward_backward_ms"] > 0 and row["transformers_forward_backward_ms"] > 0
    kernel = deformable_sampling_triton.deformable_attention_triton

    def off_by_a_percent(value, shapes, locations, weights):
        return kernel(value, shapes, locations * 1.01, weights)

    monkeypatch.setattr(deformable_sampling_triton, "deformable_attention_triton", off_by_a_percent)
    details = device_check.check_deformable_backward_triton(context)
    assert details["ok"] is False and "locations" in details["batch_1"]["failed"]
    assert "locations" in details["odd_shapes"]["failed"] and details["batch_1"]["elements_off"]["locations"] > 0
    assert details["batch_1"]["triton_forward_backward_ms"] > 0


@needs_interpreter
def test_gpu_candidates_time_the_forward_with_the_triton_sam_attention(monkeypatch):
    """benchmarks/gpu_candidates.py's whole-forward row for the SAM kernel (tiny model, under Triton's interpreter):
    the kernel runs in every SAM layer of the timed forwards, the row is timed, its mask logits within float32
    rounding of the default's, and the layer's choice is put back after."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
    from transformers_possam.modeling import sam_attention_triton
    from transformers_possam.modeling.sam_attention import PosSAMVisionAttention

    from .conftest import load_script

    candidates = load_script("benchmarks/gpu_candidates.py")
    choice = PosSAMVisionAttention.__dict__["attention_function"]
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size)
    class_embeddings = torch.nn.functional.normalize(torch.randn(4, 1, model.config.clip_embed_dim), dim=-1)
    with torch.inference_mode():

        def forward():
            return model(pixels, class_embeddings=class_embeddings)

        reference = forward().masks_queries_logits
        launches = count_launches(sam_attention_triton, monkeypatch)
        row = candidates.triton_sam_attention_forward(forward, reference, torch.device("cpu"), 1)
    layers = model.config.vision_config.num_hidden_layers
    assert launches and len(launches) % layers == 0  # every forward of the row, every SAM layer
    assert row["median_s"] > 0 and row["max_abs_difference_of_mask_logits"] < 1e-4
    assert PosSAMVisionAttention.__dict__["attention_function"] is choice


@pytest.fixture
def fresh_launch_probe(monkeypatch):
    """`_triton_launches_on_cuda` asked afresh (it caches its answer per process), and put back after."""
    from transformers_possam import triton_support

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_support._triton_launches_on_cuda.cache_clear()
    yield triton_support
    triton_support._triton_launches_on_cuda.cache_clear()


def test_triton_runs_on_cuda_only_where_it_can_launch(fresh_launch_probe, monkeypatch):
    """Triton installed is not enough: its first launch compiles a C module with the system's compiler. Without
    CUDA: no (silently). With CUDA and a driver module that builds: yes on CUDA, no on CPU. With CUDA and no C
    compiler (a slim container): no, with one warning that says why and what to install, and the question is asked
    once per process."""
    import warnings

    triton_support = fresh_launch_probe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not triton_support.triton_runs_on("cuda")
    triton_support._triton_launches_on_cuda.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    builds = []
    monkeypatch.setattr(triton_support, "_build_cuda_driver", lambda: builds.append(1))
    assert triton_support.triton_runs_on("cuda") and triton_support.triton_runs_on(torch.device("cuda", 1))
    assert not triton_support.triton_runs_on("cpu") and not triton_support.triton_runs_on("mps")
    assert builds == [1]  # asked once
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inside a trace: the same answers
    assert triton_support.triton_runs_on("cuda") and not triton_support.triton_runs_on("cpu")
    monkeypatch.undo()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    triton_support._triton_launches_on_cuda.cache_clear()

    def no_compiler():
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(triton_support, "_build_cuda_driver", no_compiler)
    with pytest.warns(RuntimeWarning, match=r"cannot launch kernels here \(RuntimeError: Failed to find C compiler"):
        assert not triton_support.triton_runs_on("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the answer is kept: no second warning
        assert not triton_support.triton_runs_on("cuda")


@pytest.mark.parametrize("launches", [True, False])
def test_a_compiled_graph_takes_the_launch_probes_answer_as_a_constant(fresh_launch_probe, monkeypatch, launches):
    """`torch.compile` (fullgraph: no graph break) asks the probe once, for real (it is not traced: its call into
    Triton's driver cannot be), and compiles the branch its answer chooses; the compiled function does not ask again."""
    triton_support = fresh_launch_probe
    asked = []
    monkeypatch.setattr(
        triton_support, "_triton_launches_on_cuda", functools.cache(lambda: asked.append(1) or launches)
    )
    torch._dynamo.reset()
    choose = torch.compile(
        lambda x: x + 1 if triton_support.triton_runs_on("cuda") else x - 1, fullgraph=True, backend="eager"
    )
    for _ in range(2):
        assert torch.equal(choose(torch.zeros(2)), torch.full((2,), 1.0 if launches else -1.0))
    assert asked == [1]


def test_without_a_launchable_triton_cuda_gets_the_pytorch_paths(fresh_launch_probe, monkeypatch):
    """Where Triton cannot launch (no C compiler), CUDA's choices are the PyTorch ones: transformers' deformable
    sampler and the chunked pixel assignment."""
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention
    from transformers_possam.postprocessing import PosSAMPostProcessingMixin

    triton_support = fresh_launch_probe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_compiler():
        raise RuntimeError("Failed to find C compiler.")

    monkeypatch.setattr(triton_support, "_build_cuda_driver", no_compiler)
    with pytest.warns(RuntimeWarning, match="cannot launch kernels here"):
        assert PosSAMMultiscaleDeformableAttention.sampler("cuda") is multi_scale_deformable_attention
    with FakeTensorMode():
        cuda_logits = torch.empty(2, 4, 4, device="cuda")
    monkeypatch.setattr("transformers_possam.postprocessing.is_fake", lambda tensor: False)
    assert not PosSAMPostProcessingMixin.assigns_pixels_with_triton(cuda_logits)


def test_sam_attention_kernel_channel_blocks_cover_the_head_with_least_padding():
    """The kernel's two power-of-2 channel blocks: together at least the head size, each at least 16 (`tl.dot`'s
    least), SAM-H's 80 as 64 + 16 (not 128)."""
    from transformers_possam.modeling.sam_attention_triton import _channel_blocks

    expected = {8: (16, 0), 16: (16, 0), 24: (16, 16), 64: (64, 0), 80: (64, 16), 96: (64, 32), 100: (64, 64)}
    for head_dim, blocks in expected.items():
        assert _channel_blocks(head_dim) == blocks, head_dim
    for head_dim in range(1, 300):
        first, rest = _channel_blocks(head_dim)
        assert first + rest >= head_dim and first >= 16 and (rest == 0 or rest >= 16)
        assert first & (first - 1) == 0 and rest & (rest - 1) == 0


@pytest.fixture
def unbuildable_kernels(monkeypatch):
    """Triton kernels made to fail as they do where they cannot be built (ptxas, shared memory, a read-only cache),
    outside the interpreter (which lets every error through) and with Triton said to run on the CPU: returns the
    list of attempted launches, the failure set emptied before and after."""
    from triton.runtime.errors import PTXASError

    from transformers_possam import dense_assignment_triton, postprocessing, triton_support
    from transformers_possam.modeling import deformable_sampling_triton, sam_attention_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(triton_support, "_unbuildable", set())
    attempts: list = []

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*arguments, **keywords):
                attempts.append(grid)
                raise PTXASError("ptxas fatal: Value 'sm_00' is not defined for option 'gpu-name'")

            return launch

    for module in (deformable_sampling_triton, dense_assignment_triton, sam_attention_triton):
        monkeypatch.setattr(module, "_kernel", lambda: Unbuildable())
        monkeypatch.setattr(module, "triton_runs_on", lambda device: True)
    monkeypatch.setattr(deformable_sampling_triton, "_backward_kernel", lambda: Unbuildable())
    monkeypatch.setattr(
        postprocessing.PosSAMPostProcessingMixin, "assigns_pixels_with_triton", staticmethod(lambda logits: True)
    )
    return attempts


def test_a_sampler_kernel_that_cannot_be_built_gives_way_to_pytorch(unbuildable_kernels, monkeypatch):
    """Where the deformable kernel cannot be built (here: ptxas refuses), both of its forms give transformers'
    result instead, with one TritonKernelFallbackWarning per form, and later calls no longer try to build it."""
    from transformers_possam.modeling.deformable_sampling_triton import (
        deformable_attention_triton,
        deformable_attention_triton_from_projections,
    )
    from transformers_possam.triton_support import TritonKernelFallbackWarning

    shapes = [(4, 4), (3, 5)]
    value, locations, weights = _inputs(shapes, 2, 2, 8, 2, 10)
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    projections = _projection_inputs(shapes, 2, 2, 8, 2, 10, True, torch.float32)
    expected_from_projections = _transformers_from_projections(projections[0], shapes, *projections[1:])
    with torch.inference_mode():
        with pytest.warns(TritonKernelFallbackWarning, match="deformable_attention_triton.*ptxas fatal"):
            found = deformable_attention_triton(value, shapes, locations, weights)
        with pytest.warns(TritonKernelFallbackWarning, match="from_projections"):
            fused = deformable_attention_triton_from_projections(projections[0], shapes, *projections[1:])
        assert len(unbuildable_kernels) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            again = deformable_attention_triton(value, shapes, locations, weights)
        assert len(unbuildable_kernels) == 2  # not tried again
    assert torch.equal(found, expected) and torch.equal(again, expected)
    torch.testing.assert_close(fused.double(), expected_from_projections, rtol=0, atol=1e-5)


def test_a_sampler_backward_kernel_that_cannot_be_built_gives_way_to_pytorch(unbuildable_kernels):
    """Where the sampler's kernels cannot be built, training through it still works: the forward's and the
    backward's fallbacks give transformers' result and autograd's gradients through it, one warning each."""
    from transformers_possam.modeling.deformable_sampling_triton import deformable_attention_triton
    from transformers_possam.triton_support import TritonKernelFallbackWarning

    shapes = [(4, 4), (3, 5)]
    value, locations, weights = _inputs(shapes, 2, 2, 8, 2, 10)
    output_grad = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(4))
    expected = _gradients(multi_scale_deformable_attention, value, shapes, locations, weights, output_grad)
    with pytest.warns(TritonKernelFallbackWarning) as caught:
        found = _gradients(deformable_attention_triton, value, shapes, locations, weights, output_grad)
    assert sorted(str(warning.message).split(" could not")[0] for warning in caught) == [
        "PosSAM's Triton kernel ('deformable_attention_triton', 'cpu', torch.float32, 8, 2, 2)",
        "PosSAM's Triton kernel ('deformable_attention_triton_backward', 'cpu', torch.float32, 8, 2, 2)",
    ]
    assert len(unbuildable_kernels) == 2
    for gradient, reference in zip(found, expected):
        torch.testing.assert_close(gradient, reference, rtol=1e-6, atol=1e-6)


def test_a_sam_attention_kernel_that_cannot_be_built_gives_way_to_the_sdpa_form(unbuildable_kernels):
    """Where the SAM attention kernel cannot be built, it gives the SDPA form's result (`relative_position_attention`)
    in its own output layout, with one warning; later calls with the same settings do not try again."""
    from transformers_possam.modeling.sam_attention import relative_position_attention
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton
    from transformers_possam.triton_support import TritonKernelFallbackWarning

    inputs = _attention_inputs(2, 2, (4, 4), 16)
    expected = relative_position_attention(*inputs, (4, 4))
    with torch.inference_mode():
        with pytest.warns(TritonKernelFallbackWarning, match="relative_position_attention_triton.*ptxas fatal"):
            found = relative_position_attention_triton(*inputs, (4, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            again = relative_position_attention_triton(*inputs, (4, 4))
    assert len(unbuildable_kernels) == 1
    assert torch.equal(found, expected) and torch.equal(again, expected)
    assert found.transpose(1, 2).is_contiguous()  # the kernel's layout, which its fake implementation promises


def test_a_sam_attention_kernel_that_cannot_be_built_rounds_float32_rows_for_the_sdpa_form(unbuildable_kernels):
    """Float32 relative-position rows beside a bf16 query (autocast keeps the tables float32; inside the op, and in
    compiled graphs, autocast casts nothing): where the kernel cannot be built, the SDPA form gets the rows rounded to
    bf16, as the kernel reads them, instead of failing on mixed dtypes."""
    from transformers_possam.modeling.sam_attention import relative_position_attention
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton
    from transformers_possam.triton_support import TritonKernelFallbackWarning

    query, key, value, relative_height, relative_width = _attention_inputs(2, 2, (4, 4), 16)
    query, key, value = (tensor.bfloat16() for tensor in (query, key, value))
    with torch.inference_mode(), pytest.warns(TritonKernelFallbackWarning):
        found = relative_position_attention_triton(query, key, value, relative_height, relative_width, (4, 4))
    expected = relative_position_attention(
        query, key, value, relative_height.bfloat16(), relative_width.bfloat16(), (4, 4)
    )
    assert found.dtype == torch.bfloat16 and torch.equal(found, expected)


def test_a_triton_without_gather_gives_the_sam_attention_sdpa_form(unbuildable_kernels, monkeypatch):
    """The SAM attention kernel picks bias entries with `tl.gather` (Triton 3.3 and later). Under an older Triton it
    cannot be built: the SDPA form's result, one warning that names what is missing, and no launch attempted."""
    import triton.language

    from transformers_possam.modeling.sam_attention import relative_position_attention
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton
    from transformers_possam.triton_support import TritonKernelFallbackWarning

    monkeypatch.delattr(triton.language, "gather")
    inputs = _attention_inputs(1, 2, (4, 4), 16)
    with torch.inference_mode(), pytest.warns(TritonKernelFallbackWarning, match=r"no triton\.language\.gather"):
        found = relative_position_attention_triton(*inputs, (4, 4))
    assert not unbuildable_kernels  # refused before any launch
    assert torch.equal(found, relative_position_attention(*inputs, (4, 4)))


def test_a_kernel_error_that_is_not_a_build_failure_is_raised(unbuildable_kernels, monkeypatch):
    """A CUDA fault or any other error of a launch is not a build failure: it reaches the caller; so does every error
    under Triton's interpreter, where the tests must see the kernels' own failures."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import PTXASError

    from transformers_possam.triton_support import TritonKernelFallbackWarning, launch_or_fall_back

    def fault():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        launch_or_fall_back("a kernel", fault, lambda: "fallback")

    # an error in a kernel's own source is a bug to see, not a machine's limit
    def source_error():
        raise CompilationError("def kernel(x): ...", None, "undefined name 'y'")

    with pytest.raises(CompilationError):
        launch_or_fall_back("a kernel with a bug", source_error, lambda: "fallback")

    # a lowering pass that fails on this machine's target is a build failure (MLIR's plain RuntimeError)
    def pass_failure():
        raise RuntimeError("PassManager::run failed")

    with pytest.warns(TritonKernelFallbackWarning, match="PassManager"):
        assert launch_or_fall_back("a kernel its target cannot lower", pass_failure, lambda: "fallback") == "fallback"

    def unbuildable():
        raise PTXASError("ptxas fatal")

    with pytest.warns(TritonKernelFallbackWarning, match="another kernel"):
        assert launch_or_fall_back("another kernel", unbuildable, lambda: "fallback") == "fallback"
    for spelling in ("1", "true"):  # under the interpreter, in any spelling Triton accepts
        monkeypatch.setenv("TRITON_INTERPRET", spelling)
        with pytest.raises(PTXASError):
            launch_or_fall_back("a third kernel", unbuildable, lambda: "fallback")


def test_a_pixel_assignment_kernel_that_cannot_be_built_gives_way_to_pytorch(unbuildable_kernels, monkeypatch):
    """The panoptic post-processing where the pixel-assignment kernel cannot be built: the PyTorch path's segments,
    one warning."""
    from transformers_possam.postprocessing import PosSAMPostProcessingMixin
    from transformers_possam.triton_support import TritonKernelFallbackWarning

    from .conftest import tiny_model_outputs

    processor, outputs, size = tiny_model_outputs(batch=2)
    with pytest.warns(TritonKernelFallbackWarning, match="pixel_assignment_triton"):
        found = processor.post_process_panoptic_segmentation(outputs, dense_assignment=True)
    assert len(unbuildable_kernels) == 1  # the second image did not try again
    monkeypatch.setattr(PosSAMPostProcessingMixin, "assigns_pixels_with_triton", staticmethod(lambda logits: False))
    expected = processor.post_process_panoptic_segmentation(outputs, dense_assignment=True)
    for got, want in zip(found, expected, strict=True):
        assert got["segments_info"] == want["segments_info"] and torch.equal(got["segmentation"], want["segmentation"])
