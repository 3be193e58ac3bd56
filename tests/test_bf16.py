"""
bf16 training (issue 14, item 6): under autocast the pixel decoder's multi-scale deformable attention samples in
float32, as FC-CLIP forces it (`MSDeformAttnFunction` is `custom_fwd(cast_inputs=torch.float32)`), and a whole
training step runs; the benchmark's bf16 training step (GPU suite) runs on CPU with the tiny config.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
from transformers_possam.modeling import PosSAMMultiscaleDeformableAttention
from transformers_possam.modeling import deformable_attention as deformable_module

from .conftest import load_script, sam_attention_pair


SHAPES = [(6, 10), (12, 20), (24, 40)]


def deformable_inputs(seed=0):
    """A randomized 3-level module (offsets of several pixels) and its inputs."""
    torch.manual_seed(seed)
    module = PosSAMMultiscaleDeformableAttention(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
    for parameter in module.parameters():  # the default init gives a fixed offset grid: move the samples around
        torch.nn.init.normal_(parameter, std=0.5)
    tokens = torch.randn(2, sum(h * w for h, w in SHAPES), 32)
    kwargs = {
        "encoder_hidden_states": tokens,
        "position_embeddings": torch.randn_like(tokens),
        "reference_points": torch.rand(2, tokens.shape[1], 3, 2),
        "spatial_shapes_list": SHAPES,
    }
    return module, tokens, kwargs


def test_deformable_attention_samples_in_float32_under_bf16_autocast():
    module, tokens, kwargs = deformable_inputs()
    calls = []
    sampler = deformable_module.deformable_attention_embedding_bag

    def spy(value, spatial_shapes, sampling_locations, attention_weights):
        output = sampler(value, spatial_shapes, sampling_locations, attention_weights)
        calls.append(
            {
                "autocast": torch.is_autocast_enabled("cpu"),
                "inputs": (value.detach(), sampling_locations.detach(), attention_weights.detach()),
                "output": output.detach(),
            }
        )
        return output

    offsets = []
    handle = module.sampling_offsets.register_forward_hook(lambda _, __, output: offsets.append(output.detach()))
    with mock.patch.object(deformable_module, "deformable_attention_embedding_bag", spy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(tokens, **kwargs)
    handle.remove()
    (call,) = calls
    value, locations, weights = call["inputs"]
    assert offsets[0].dtype == torch.bfloat16  # the projections do run in bf16 (autocast is on) ...
    # ... but the sampler gets float32 inputs and runs with autocast off
    assert (value.dtype, locations.dtype, weights.dtype) == (torch.float32,) * 3
    assert not call["autocast"]
    # locations computed in float32 from the bf16 offsets (Deformable DETR: reference + offset / (w, h) per level)
    normalizer = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    expected_locations = (
        kwargs["reference_points"][:, :, None, :, None, :]
        + offsets[0].float().view(locations.shape) / normalizer[None, None, None, :, None, :]
    )
    torch.testing.assert_close(locations, expected_locations, rtol=1e-6, atol=1e-7)
    # the sampled values are transformers' float32 grid_sample version's on those inputs
    reference = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    assert call["output"].dtype == torch.float32
    torch.testing.assert_close(call["output"], reference, rtol=1e-5, atol=1e-5)


def test_deformable_attention_without_autocast_keeps_the_model_dtype():
    """A model cast to bf16 outside autocast (inference) is not cast: custom_fwd only acts under autocast."""
    module, tokens, kwargs = deformable_inputs()
    module = module.to(torch.bfloat16)
    kwargs = {key: value.bfloat16() if torch.is_tensor(value) else value for key, value in kwargs.items()}
    output, _ = module(tokens.bfloat16(), **kwargs)
    assert output.dtype == torch.bfloat16


def test_a_bf16_model_samples_at_float32_locations():
    """
    A model cast to bf16 (no autocast, `from_pretrained(..., dtype=torch.bfloat16)`): the sampler gets float32 locations
    computed from the bf16 offsets in float32 (bf16 locations in [0, 1] would be off by up to a pixel at 256 px), float32
    values and weights, and its float32 result is transformers' grid_sample version's on those inputs.
    """
    module, tokens, kwargs = deformable_inputs()
    module = module.to(torch.bfloat16)
    kwargs = {key: value.bfloat16() if torch.is_tensor(value) else value for key, value in kwargs.items()}
    calls = []
    sampler = deformable_module.deformable_attention_embedding_bag

    def spy(value, spatial_shapes, sampling_locations, attention_weights):
        output = sampler(value, spatial_shapes, sampling_locations, attention_weights)
        calls.append(((value, sampling_locations, attention_weights), output))
        return output

    offsets = []
    handle = module.sampling_offsets.register_forward_hook(lambda _, __, output: offsets.append(output.detach()))
    with torch.inference_mode(), mock.patch.object(deformable_module, "deformable_attention_embedding_bag", spy):
        output, _ = module(tokens.bfloat16(), **kwargs)
    handle.remove()
    ((inputs, sampled),) = calls
    value, locations, weights = inputs
    assert (value.dtype, locations.dtype, weights.dtype) == (torch.float32,) * 3
    normalizer = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    expected_locations = (
        kwargs["reference_points"].float()[:, :, None, :, None, :]
        + offsets[0].float().view(locations.shape) / normalizer[None, None, None, :, None, :]
    )
    torch.testing.assert_close(locations, expected_locations, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        sampled, multi_scale_deformable_attention(value, SHAPES, locations, weights), rtol=1e-5, atol=1e-5
    )
    assert output.dtype == torch.bfloat16


@pytest.mark.parametrize(("window_size", "batch_size", "grid"), [(0, 1, 16), (4, 1, 12)])  # global; windowed
def test_bf16_sam_attention_on_cpu_is_as_close_to_float32_as_transformers_bf16(window_size, batch_size, grid):
    """
    SAM attention with bf16 weights on CPU (the blocked path) against transformers' `SamVisionSdpaAttention` in
    float32 with the same weights: its relative error is at most 1.5x that of transformers' own layer in bf16 (and
    below 3%), and the blocked path is the one that ran.
    """
    from transformers import SamVisionConfig

    from transformers_possam.modeling import sam_attention

    config = SamVisionConfig(hidden_size=96, num_attention_heads=4, image_size=grid * 16, patch_size=16)
    config._attn_implementation = "sdpa"
    reference, ours = sam_attention_pair(config, window_size)
    size = window_size or grid
    hidden = torch.randn(batch_size, size, size, 96)
    with torch.inference_mode():
        expected = reference(hidden)[0]
        theirs_bf16 = reference.to(torch.bfloat16)(hidden.bfloat16())[0].float()
        with mock.patch.object(
            sam_attention,
            "relative_position_attention_blocked",
            wraps=sam_attention.relative_position_attention_blocked,
        ) as spy:
            found = ours.to(torch.bfloat16)(hidden.bfloat16())[0]
    assert spy.called and found.dtype == torch.bfloat16

    def relative_error(tensor):
        return ((tensor.float() - expected).norm() / expected.norm()).item()

    assert relative_error(found) <= max(1.5 * relative_error(theirs_bf16), 1e-3) and relative_error(found) < 0.03


def test_a_bf16_autocast_training_step_has_float32_losses_and_gradients():
    """A tiny model's training step under CPU bf16 autocast (as accelerate's --mixed_precision bf16): the loss parts
    are float32 (matcher and losses run with autocast off) and finite, and every trainable parameter gets a gradient."""
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).train()
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(2, 4, 128, 128, generator=generator) > 0.5).to(torch.uint8)
    class_embeddings = torch.nn.functional.normalize(torch.randn(5, 1, 32, generator=generator), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(
            torch.randn(2, 3, 128, 128, generator=generator),
            class_embeddings=class_embeddings,
            mask_labels=list(masks),
            class_labels=[torch.tensor([0, 1, 2, 3]), torch.tensor([4, 0, 1, 2])],
        )
    assert outputs.class_queries_logits.dtype == torch.bfloat16  # autocast was in effect
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in outputs.loss_dict.values())
    outputs.loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]


@pytest.mark.parametrize("variant", ["tiny"])
def test_gpu_suite_bf16_training_figure_runs_on_cpu(variant):
    """The GPU suite's B/L/H bf16 training figure, its code path on CPU with the tiny config (no GPU here)."""
    gpu = load_script("benchmarks/gpu.py")
    rows = gpu.run("cpu", (variant,), repeats=2, batches=(), compile_models=False, training_batch=2)
    (row,) = rows
    assert "error" not in row, row.get("error")
    assert row["target"] == 7 and row["batch"] == 2 and row["dtype"] == "bfloat16" and row["training"]
    assert row["images_per_second"] > 0
    # the paper's schedule: 250K iterations x 16 images, at this rate on one device
    assert row["gpu_days_paper_schedule"] == pytest.approx(250_000 * 16 / row["images_per_second"] / 86_400)


def test_full_size_training_step_benchmark_runs_on_the_tiny_config():
    """benchmarks/training.py's full-size step figure, its code path (subprocess, JSON, row) on the tiny config."""
    training = load_script("benchmarks/training.py")
    row = training.full_size_step_row(batch_size=2, steps=2, variant="tiny")
    assert row["target"] == 6 and row["seconds_per_step"] > 0 and row["peak_rss_bytes"] > 0
    assert row["measured"]["batch"] == 2 and len(row["measured"]["losses"]) == 2
    assert all(loss == loss and loss > 0 for loss in row["measured"]["losses"])  # finite and positive


def test_the_cpu_sampler_exports_with_a_dynamic_batch_at_full_size_token_counts():
    """
    torch.export of the CPU sampler with a dynamic batch when batch * N * heads can reach float32's exact-integer
    range within the batch bound (PosSAM-B at 1024x1024: N = 21504 values, 8 heads, so batch < 97.5): the index dtype
    must not put a guard on the batch size (it did: the B export failed with "batch < 2048/21"). Outputs equal
    transformers' grid_sample version.
    """
    shapes = [(128, 128), (64, 64), (32, 32)]  # N = 21504, as PosSAM-B's pixel decoder at 1024x1024
    num_values, heads, head_dim = sum(h * w for h, w in shapes), 8, 4

    class Sampler(torch.nn.Module):
        def forward(self, value, sampling_locations, attention_weights):
            return deformable_module.deformable_attention_embedding_bag(
                value, shapes, sampling_locations, attention_weights
            )

    generator = torch.Generator().manual_seed(0)
    value = torch.randn(2, num_values, heads, head_dim, generator=generator)
    locations = torch.rand(2, 5, heads, 3, 2, 2, generator=generator)
    weights = torch.rand(2, 5, heads, 3, 2, generator=generator)
    batch = torch.export.Dim("batch", max=1024)
    program = torch.export.export(
        Sampler(), (value, locations, weights), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}), strict=False
    )
    inputs = (value[:1], locations[:1], weights[:1])
    torch.testing.assert_close(
        program.module()(*inputs),
        multi_scale_deformable_attention(*inputs[:1], shapes, *inputs[1:]),
        rtol=1e-5,
        atol=1e-5,
    )
