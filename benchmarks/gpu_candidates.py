"""
Candidate GPU paths timed side by side in one run (issue 15, target 7), for the choices `gpu_profile.py`'s tables
pointed at on an H200 (2026-11-26):

1. the pixel decoder's deformable sampling, per layer at PosSAM's shapes (1024x1024 input: levels 32x32, 64x64,
   128x128; 8 heads of 32; 4 points): transformers' `multi_scale_deformable_attention` (grid_sample per level, then
   a stack of all levels, a product and a sum: what CUDA runs today), this package's
   `deformable_attention_embedding_bag` in one step, in one step with bf16 values and weights, in accelerator-sized
   steps and in its CPU-sized steps, grid_sample per level summed level by level (no stack), and on CUDA the fused
   Triton kernel (`deformable_attention_triton`) with float32 and with bf16 values; each against the first (max abs
   and relative difference);
2. the panoptic post-processing's pixel counts per query: `scatter_add_` against `histc`;
3. its one device-to-host transfer: pageable against page-locked staging;
4. PosSAM-B bf16 forward with each deformable sampler (`PosSAMMultiscaleDeformableAttention.sampler` replaced),
   its time by box (`gpu.box_times`), on CUDA the forward with SAM's attention through the Triton flash kernel
   (`relative_position_attention_triton`), the forward with the ConvNeXt trunk and with the whole model in channels-last
   memory format, and the dense panoptic post-processing with the old pieces (pageable transfer, scatter counts,
   PyTorch assignment), the new, and the PyTorch assignment with chunks of 64 masks instead of 16; the new post-processing's segments against the
   CPU's cell-bound path; on CUDA, whose dense path runs its per-pixel part in one Triton kernel
   (`pixel_assignment_triton`), the dense path with that part in PyTorch; the dense path against the cell-bound one
   with 16, 64 and all queries kept;
5. SAM's attention at SAM-B's and SAM-H's windowed and global shapes: the bias as extra q/k channels (CUDA's
   path), the same with the value padded to q/k's head size (flash-eligible), the bias as an additive mask, and on
   CUDA the Triton flash kernel with the bias made inside it (`relative_position_attention_triton`; also in the
   whole forward, section 4).

`python benchmarks/gpu_candidates.py --device cuda --output OUT/candidates.json`; `--device cpu --variant tiny`
runs the same code on a CPU (the tests do; no figure is meaningful there).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
from common import VARIANTS, device_name, output_file, positive_int
from gpu import _config, _sam_attention_kernel_chosen, box_times, time_steps
from torch.nn import functional as F


# the embedding_bag sampler's steps sized for an accelerator, where a step costs about 40 kernel launches: 2**24 bag
# entries (about 0.8 GB of buffers) is one step per 1024x1024 image (8.3 million entries per layer), four at batch 8
ACCELERATOR_BAG_ENTRIES_PER_STEP = 2**24


def _time(step, device: torch.device, repeats: int) -> dict:
    """
    `gpu.time_steps`'s timing of `step` (its warm-up, then `repeats` timed calls), without the peak memory. A quarter
    second of warm-up on CUDA (not the suite's second): the candidates run back to back, the GPU already busy, and
    about 100 timings must fit the 180 s `device_session.sh` gives this script (SAM's attention, last, is cut first;
    the fourteenth session's run, about 85 timings, took about two minutes on an H200).
    """
    timing, _ = time_steps(step, device, repeats, warmup_s=0.25 if device.type == "cuda" else 0.0)
    return timing


def _measured(row: dict, name: str, measure, save) -> object:
    """`row[name] = measure()`, or the error it raised (the other entries stand); the results saved either way."""
    try:
        row[name] = measure()
    except Exception as error:
        row[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    save()
    return row[name]


def grid_sample_by_level(value, spatial_shapes, sampling_locations, attention_weights):
    """transformers' sampling with each level's weighted sum added up level by level (no stack of all levels)."""
    batch_size, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    levels = value.split([height * width for height, width in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    output = None
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = levels[level].flatten(2).transpose(1, 2).reshape(batch_size * num_heads, head_dim, height, width)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B * heads, Q, points, 2)
        sampled = F.grid_sample(level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch_size * num_heads, 1, num_queries, -1)
        part = (sampled * weights).sum(-1)  # (B * heads, head_dim, Q)
        output = part if output is None else output + part
    return output.view(batch_size, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def samplers(with_cpu_steps: bool, device: torch.device) -> dict:
    """
    The deformable samplers compared (same arguments and result as transformers' `multi_scale_deformable_attention`):
    transformers' own, the embedding_bag sampler in one step, in one step with bf16 values and weights (its result in
    bf16, within bf16 rounding of the others), in accelerator-sized steps and (`with_cpu_steps`) in its CPU-sized
    steps, grid_sample summed level by level, and where Triton runs (`device`), the fused Triton kernel with float32
    and with bf16 values.
    """
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling.deformable_attention import deformable_attention_embedding_bag
    from transformers_possam.modeling.deformable_sampling_triton import deformable_attention_triton
    from transformers_possam.triton_support import triton_runs_on

    def embedding_bag_in_steps(entries: int):
        return lambda *args: deformable_attention_embedding_bag(*args, bag_entries_per_step=entries)

    def embedding_bag_bf16_values(value, spatial_shapes, sampling_locations, attention_weights):
        # the values (a bf16 model's as they are: marked below) and the bag weights in bf16, the locations and
        # corner arithmetic in float32; one step. Halves the bytes gathered.
        return deformable_attention_embedding_bag(
            value.bfloat16(), spatial_shapes, sampling_locations, attention_weights, bag_entries_per_step=2**62
        )

    def triton_fused_float32_values(value, *arguments):
        return deformable_attention_triton(value.float(), *arguments)

    def triton_fused_bf16_values(value, *arguments):
        return deformable_attention_triton(value.bfloat16(), *arguments)

    # the layer passes a bf16 model's values without their float32 copy to these (a float32 model's are cast here)
    embedding_bag_bf16_values.reads_reduced_precision_values = True  # type: ignore[attr-defined]
    triton_fused_bf16_values.reads_reduced_precision_values = True  # type: ignore[attr-defined]

    candidates = {
        "transformers_stack": multi_scale_deformable_attention,
        "embedding_bag_one_step": embedding_bag_in_steps(2**62),
        "embedding_bag_bf16_values": embedding_bag_bf16_values,
        "embedding_bag_accelerator_steps": embedding_bag_in_steps(ACCELERATOR_BAG_ENTRIES_PER_STEP),
        "embedding_bag_cpu_steps": deformable_attention_embedding_bag,
        "grid_sample_by_level": grid_sample_by_level,
    }
    if triton_runs_on(device):  # CUDA with Triton: the fused kernel, with float32 and with bf16 values
        candidates["triton_fused"] = triton_fused_float32_values
        candidates["triton_fused_bf16_values"] = triton_fused_bf16_values
    if not with_cpu_steps:  # ten times slower than one step on a GPU: left out of the whole-forward timings
        del candidates["embedding_bag_cpu_steps"]
    return candidates


def deformable_candidates(device: torch.device, batch: int, repeats: int, shapes) -> dict:
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    generator = torch.Generator().manual_seed(0)
    num_values = sum(height * width for height, width in shapes)
    heads, head_dim, points = 8, 32, 4
    value = torch.randn(batch, num_values, heads, head_dim, generator=generator).to(device)
    locations = torch.rand(batch, num_values, heads, len(shapes), points, 2, generator=generator).to(device)
    locations = locations * 1.1 - 0.05  # a few off the map (zero padding)
    weights = torch.rand(batch, num_values, heads, len(shapes), points, generator=generator).to(device)
    weights = weights / weights.sum((-2, -1), keepdim=True)
    candidates = samplers(with_cpu_steps=True, device=device)
    results = {}
    with torch.inference_mode():
        reference = multi_scale_deformable_attention(value, shapes, locations, weights)
        for name, function in candidates.items():
            try:
                output = function(value, shapes, locations, weights)
                results[name] = {
                    **_time(lambda function=function: function(value, shapes, locations, weights), device, repeats),
                    "max_abs_difference": float((output - reference).abs().max()),
                    "relative_difference": float((output.float() - reference).norm() / reference.norm()),
                }
            except Exception as error:  # reported; the other candidates stand
                results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
    return results


def sam_attention_variants(device: torch.device) -> dict:
    """
    SAM's attention with its decomposed relative-position bias (same arguments and result as
    `relative_position_attention`), three ways on a GPU, four where Triton runs:
    - `extended_qk` (what CUDA runs): the bias as extra q/k channels, one SDPA call; the value's head size differs
      from q/k's, which leaves SDPA the memory-efficient kernel (not flash);
    - `extended_qk_value_padded`: the same with the value padded with zero channels to q/k's size, which flash
      attention accepts, the extra output channels (zeros) sliced off: more work in the second matmul;
    - `bias_as_mask`: plain q/k/v with the bias materialized as a `(B, heads, T, T)` additive mask (0.40 GB per
      image at a SAM-B global layer in bf16, 0.54 GB for SAM-H);
    - `triton_flash`: `relative_position_attention_triton`, flash attention's online softmax in one Triton kernel
      with the bias made inside it from the query and the two resized tables (no bias factors, no extended q/k, no
      mask), 8 warps per program (its default), `triton_flash_128_queries` (128 queries per program instead of 64),
      and `triton_flash_4_warps` (more register spills when compiled, more programs per SM).
    """
    from transformers_possam.modeling.sam_attention import (
        _decomposed_bias_factors,
        relative_position_attention,
        relative_position_query_and_key,
    )
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton
    from transformers_possam.triton_support import triton_runs_on

    def extended_qk_value_padded(query, key, value, relative_height, relative_width, size):
        extended_query, extended_key = relative_position_query_and_key(
            query, key, relative_height, relative_width, size
        )
        head_dim = value.shape[-1]
        padded_value = F.pad(value, (0, extended_query.shape[-1] - head_dim))
        output = F.scaled_dot_product_attention(extended_query, extended_key, padded_value, scale=1.0)
        return output[..., :head_dim]

    def bias_as_mask(query, key, value, relative_height, relative_width, size):
        rel_h, rel_w = _decomposed_bias_factors(query, relative_height, relative_width, size)
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)  # (B, heads, T, H * W)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)

    variants = {
        "extended_qk": relative_position_attention,
        "extended_qk_value_padded": extended_qk_value_padded,
        "bias_as_mask": bias_as_mask,
    }
    if triton_runs_on(device):
        variants["triton_flash"] = relative_position_attention_triton  # 8 warps per program
        variants["triton_flash_4_warps"] = functools.partial(relative_position_attention_triton, num_warps=4)
        variants["triton_flash_128_queries"] = functools.partial(relative_position_attention_triton, block_queries=128)
    return variants


def sam_attention_candidates(device: torch.device, batch: int, repeats: int, tiny: bool) -> dict:
    """
    `sam_attention_variants` timed at SAM-B's (12 heads of 64) and SAM-H's (16 heads of 80) shapes at 1024x1024 in
    bf16: a windowed layer (25 windows of 14 x 14 per image) and a global one (64 x 64), each against the first
    variant. `tiny`: small shapes for a CPU test.
    """
    from transformers_possam.modeling.sam_attention import relative_position_rows

    variants = sam_attention_variants(device)
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {"tiny": (8, 2)} if tiny else {"sam_b": (64, 12), "sam_h": (80, 16)}
    grids = {"windowed": (25, (4, 4) if tiny else (14, 14)), "global": (1, (6, 6) if tiny else (64, 64))}
    results: dict = {}
    for model_name, (head_dim, heads) in models.items():
        for layer_name, (windows, size) in grids.items():
            tokens = size[0] * size[1]
            query, key, value = (
                torch.randn(batch * windows, heads, tokens, head_dim, generator=generator).to(device, dtype)
                for _ in "qkv"
            )
            # the layer's rows, `get_rel_pos` of a table of 2 n - 1 rows (the Triton kernel reads the table back
            # from them)
            tables = [
                relative_position_rows(
                    n, n, torch.randn(2 * n - 1, head_dim, generator=generator).to(device, dtype) / 4
                )
                for n in size
            ]
            row: dict = {}
            with torch.inference_mode():
                reference = None
                for name, attend in variants.items():
                    try:
                        output = attend(query, key, value, *tables, size)
                        reference = output if reference is None else reference
                        row[name] = {
                            **_time(lambda attend=attend: attend(query, key, value, *tables, size), device, repeats),
                            "max_abs_difference": float((output.float() - reference.float()).abs().max()),
                        }
                    except Exception as error:  # reported; the other variants stand
                        row[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
            results[f"{model_name}_{layer_name}"] = row
    return results


def count_candidates(device: torch.device, pixels: int, num_queries: int, repeats: int) -> dict:
    from transformers_possam import postprocessing

    ids = torch.randint(0, num_queries + 1, (pixels,), device=device)
    expected = torch.bincount(ids, minlength=num_queries + 1)[:num_queries]
    results = {}
    for name in ("_count_by_scatter", "_count_by_histogram"):
        counter = getattr(postprocessing, name)
        results[name] = {
            **_time(lambda counter=counter: counter(ids, num_queries), device, repeats),
            "equal_to_bincount": bool(torch.equal(counter(ids, num_queries), expected)),
        }
    return results


def transfer_candidates(device: torch.device, elements: int, repeats: int) -> dict:
    from transformers_possam import postprocessing

    values = torch.randint(0, 100, (elements,), device=device, dtype=torch.int32)
    return {
        "pageable": _time(lambda: values.cpu().numpy(), device, repeats),
        "page_locked_staging": _time(lambda: postprocessing._fetch_to_host(values), device, repeats),
    }


# how many queries per image the post-processing keeps in `post_processing_by_kept_queries` (None: every non-void
# query, the default threshold of 0, which with random weights is almost all of them)
KEPT_QUERIES = (16, 64, None)


def post_processing_by_kept_queries(
    processor, outputs, targets: list, kept: int | None, device: torch.device, repeats: int
) -> dict:
    """
    The panoptic post-processing's two paths on the same outputs with about `kept` queries per image kept: the dense
    path (every query's mask resized, non-kept ones masked out: fixed shapes, one host synchronization per batch)
    and the cell-bound path (`dense_assignment=False`: only the kept queries' masks, shapes that depend on the data,
    so several synchronizations per image). The threshold is set between the `kept`-th and the next best query
    score (the median over the batch's images); random weights keep almost every query at the default threshold of
    0, a trained model far fewer, which is what decides between the two on a GPU. Also the kept queries per image
    (mean) and the pixels where the two paths' first segmentations differ.
    """
    _, scores, is_void, _, _ = processor._prepare(outputs, targets, None, None, True, None, None)
    best = torch.where(is_void, -1.0, scores.max(-1).values.float()).sort(dim=1, descending=True).values  # (B, Q)
    if kept is None or kept >= best.shape[1]:
        threshold = 0.0
    else:
        # at least 0: where the next best is a void query (-1), the midpoint would be a negative threshold
        threshold = max(0.0, float(((best[:, kept - 1] + best[:, kept]) / 2).median()))
    kept_per_image = float((best > threshold).sum(1).float().mean())

    def post(dense: bool):
        return processor.post_process_panoptic_segmentation(
            outputs, target_sizes=targets, threshold=threshold, dense_assignment=dense
        )

    dense, cell_bound = post(True)[0], post(False)[0]
    return {
        "threshold": threshold,
        "kept_per_image": kept_per_image,
        "dense": _time(lambda: post(True), device, repeats),
        "cell_bound": _time(lambda: post(False), device, repeats),
        "segments": len(dense["segments_info"]),
        "pixels_differing": int((dense["segmentation"] != cell_bound["segmentation"]).sum()),
    }


def triton_sam_attention_forward(forward, reference: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """The forward timed with SAM's attention through `relative_position_attention_triton` (chosen in
    `PosSAMVisionAttention.attention_function` by `gpu._sam_attention_kernel_chosen`, put back afterwards), and its
    largest mask-logit difference from `reference`, the default's."""
    with _sam_attention_kernel_chosen(True):
        timing = _time(forward, device, repeats)
        masks = forward().masks_queries_logits
    timing["max_abs_difference_of_mask_logits"] = float((masks.float() - reference.float()).abs().max())
    return timing


def channels_last_forward(
    model, scope: str, pixel_values, class_embeddings, reference: torch.Tensor, device: torch.device, repeats: int
) -> dict:
    """
    The forward timed with `scope` in channels-last memory format: `"convnext_trunk"` (the CLIP image tower) or
    `"whole_model"`: its convolutions' weights converted and its input made channels-last (a pre-hook on the ConvNeXt
    stem; for the whole model the pixels too), so that cuDNN's NHWC convolutions (the profile's `conv2d_c1_k1_nhwc`, the
    depthwise 7x7) need no layout transposes around them and timm's ConvNeXt blocks' permute before each LayerNorm
    becomes a view instead of a copy. The model is put back in the default layout afterwards. Also the largest
    mask-logit difference from `reference`, the default layout's.
    """
    module = model.clip.vision_model if scope == "convnext_trunk" else model
    inputs = pixel_values if scope == "convnext_trunk" else pixel_values.contiguous(memory_format=torch.channels_last)
    # the convolutions' weights only: `module.to(memory_format=...)` would also re-stride other 4-d parameters
    # (SAM's (1, 64, 64, 768) position embedding, which is not a channels-first map); the originals are kept and
    # put back as they were, whatever fails on the way
    convolution_types = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    originals = {layer: layer.weight.data for layer in module.modules() if isinstance(layer, convolution_types)}
    hook = None
    try:
        for layer in originals:
            layer.weight.data = originals[layer].contiguous(memory_format=torch.channels_last)
        hook = model.clip.vision_model.stem.register_forward_pre_hook(
            lambda _, arguments: (arguments[0].contiguous(memory_format=torch.channels_last), *arguments[1:])
        )

        def forward():
            return model(inputs, class_embeddings=class_embeddings)

        timing = _time(forward, device, repeats)
        masks = forward().masks_queries_logits
    finally:
        if hook is not None:
            hook.remove()
        for layer, weight in originals.items():
            layer.weight.data = weight
    timing["max_abs_difference_of_mask_logits"] = float((masks.float() - reference.float()).abs().max())
    return timing


def model_candidates(
    device: torch.device, variant: str, batches: list[int], repeats: int, results: dict, save
) -> None:
    """Section 4, into `results` (`batch_<n>` rows), `save()` called after every entry: a command stopped at its time
    limit keeps what was measured."""
    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, postprocessing
    from transformers_possam.modeling import deformable_attention
    from transformers_possam.triton_support import triton_runs_on

    torch.manual_seed(0)
    with torch.device(device):
        model = PosSAMForPanopticSegmentation(_config(variant)).eval().to(torch.bfloat16)
    size = model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(150, 1, model.config.clip_embed_dim, device=device), dim=-1
    ).to(torch.bfloat16)
    candidates = samplers(with_cpu_steps=False, device=device)
    if triton_runs_on(device):
        # CUDA's default: the kernel's form from the projections (softmax and sampling locations inside it, output
        # in bf16), beside `triton_fused_bf16_values`, the same kernel after those steps in PyTorch
        from transformers_possam.modeling.deformable_sampling_triton import deformable_attention_triton

        candidates["triton_from_projections"] = deformable_attention_triton
    attention = deformable_attention.PosSAMMultiscaleDeformableAttention
    original_sampler = attention.__dict__["sampler"]
    new_fetch, new_count = postprocessing._fetch_to_host, postprocessing._pixels_per_query
    chunking = postprocessing.RESIZE_CHUNK, postprocessing.RESIZE_ELEMENTS
    mixin = postprocessing.PosSAMPostProcessingMixin
    original_assignment_choice = mixin.__dict__["assigns_pixels_with_triton"]

    def restore():
        attention.sampler = original_sampler
        postprocessing._fetch_to_host, postprocessing._pixels_per_query = new_fetch, new_count
        postprocessing.RESIZE_CHUNK, postprocessing.RESIZE_ELEMENTS = chunking
        mixin.assigns_pixels_with_triton = original_assignment_choice

    def pytorch_assignment():  # the dense path's per-pixel part in PyTorch (chunks of masks), not Triton's kernel
        mixin.assigns_pixels_with_triton = staticmethod(lambda mask_logits: False)

    try:
        for batch in batches:
            pixel_values = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
            row: dict = results.setdefault(f"batch_{batch}", {})
            with torch.inference_mode():
                for name, sampler in candidates.items():
                    # every layer's choice of sampler, whatever the device and mode
                    attention.sampler = staticmethod(lambda *arguments, sampler=sampler: sampler)
                    _measured(
                        row,
                        f"forward_{name}",
                        lambda: _time(lambda: model(pixel_values, class_embeddings=class_embeddings), device, repeats),
                        save,
                    )
                restore()

                def forward():
                    return model(pixel_values, class_embeddings=class_embeddings)

                _measured(row, "boxes_of_the_forward", lambda: box_times(model, forward, device), save)
                outputs = forward()
                if triton_runs_on(device):
                    _measured(
                        row,
                        "forward_triton_sam_attention",
                        lambda: triton_sam_attention_forward(forward, outputs.masks_queries_logits, device, repeats),
                        save,
                    )
                for scope in ("convnext_trunk", "whole_model"):
                    _measured(
                        row,
                        f"forward_channels_last_{scope}",
                        lambda scope=scope: channels_last_forward(
                            model, scope, pixel_values, class_embeddings, outputs.masks_queries_logits, device, repeats
                        ),
                        save,
                    )
                targets = [(size, size)] * batch

                def post():  # the dense path, the default off the CPU (asked for, so that the CPU test runs it too)
                    return processor.post_process_panoptic_segmentation(
                        outputs, target_sizes=targets, dense_assignment=True
                    )

                def with_old_pieces():  # the twelfth session's post-processing: all of it PyTorch's
                    postprocessing._fetch_to_host = lambda values: values.cpu().numpy()
                    postprocessing._pixels_per_query = postprocessing._count_by_scatter
                    pytorch_assignment()
                    try:
                        return _time(post, device, repeats)
                    finally:
                        restore()

                def chunks_of_64():
                    # the dense path's query chunks: 16 masks (128 MiB temporaries) by default, 64 (512 MiB) here: a
                    # quarter of the running-argmax merges; the same segments (ties aside)
                    # (both in PyTorch: the Triton assignment has no chunks)
                    pytorch_assignment()
                    try:
                        reference = post()[0]["segmentation"]
                        postprocessing.RESIZE_CHUNK, postprocessing.RESIZE_ELEMENTS = 64, 2**27
                        timing = _time(post, device, repeats)
                        segmentation = post()[0]["segmentation"]
                    finally:
                        restore()
                    timing["pixels_differing"] = int((segmentation != reference).sum())
                    return timing

                def against_the_cpu():
                    new = post()[0]
                    first = type(outputs)(**{key: value[:1].float().cpu() for key, value in outputs.items()})
                    (cell_bound,) = processor.post_process_panoptic_segmentation(
                        first, target_sizes=targets[:1], dense_assignment=False
                    )
                    return {
                        "segments": len(new["segments_info"]),
                        "equal": bool(
                            new["segments_info"] == cell_bound["segments_info"]
                            and torch.equal(new["segmentation"], cell_bound["segmentation"])
                        ),
                        "pixels_differing": int((new["segmentation"] != cell_bound["segmentation"]).sum()),
                    }

                _measured(row, "post_processing_old_pieces", with_old_pieces, save)
                _measured(row, "post_processing_new", lambda: _time(post, device, repeats), save)

                def with_pytorch_assignment():
                    # the per-pixel part in PyTorch (16 masks at a time), which CUDA ran before the Triton kernel
                    # (`pixel_assignment_triton`) became its default; the pixels whose segment differs
                    reference = post()
                    pytorch_assignment()
                    try:
                        timing = _time(post, device, repeats)
                        found = post()
                    finally:
                        restore()
                    timing["pixels_differing"] = sum(
                        int((got["segmentation"] != want["segmentation"]).sum()) for got, want in zip(found, reference)
                    )
                    timing["segments_equal"] = all(
                        got["segments_info"] == want["segments_info"] for got, want in zip(found, reference)
                    )
                    return timing

                if triton_runs_on(device):
                    _measured(row, "post_processing_pytorch_assignment", with_pytorch_assignment, save)
                _measured(row, "post_processing_chunks_of_64", chunks_of_64, save)
                _measured(row, "first_image_against_cpu_cell_bound", against_the_cpu, save)
                for kept in KEPT_QUERIES:
                    _measured(
                        row,
                        f"post_processing_{kept or 'all'}_kept",
                        lambda kept=kept: post_processing_by_kept_queries(
                            processor, outputs, targets, kept, device, repeats
                        ),
                        save,
                    )
            print(json.dumps({f"batch_{batch}": row}), flush=True)
    finally:
        restore()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", type=device_name)
    parser.add_argument("--variant", default="vit-b", choices=VARIANTS)
    parser.add_argument("--batches", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--output", default="candidates.json", type=output_file)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = args.variant == "tiny"
    shapes = [(4, 4), (8, 8), (16, 16)] if tiny else [(32, 32), (64, 64), (128, 128)]
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    results["torch"] = torch.__version__
    try:  # the Triton sampler candidates run only where Triton does: say which, or why not
        import triton

        results["triton"] = triton.__version__
    except ImportError as error:
        results["triton"] = f"unavailable: {error}"

    def save():  # written aside, then renamed: a command killed mid-write keeps the last whole file
        from transformers_possam.triton_support import kernels_not_built

        # Triton kernels that could not be built ran their PyTorch paths: rows named after them timed those instead
        results["triton_kernels_not_built"] = kernels_not_built()
        partial = f"{args.output}.partial"
        with open(partial, "w", encoding="utf-8") as file:
            json.dump(results, file, indent=1)
        os.replace(partial, args.output)

    for batch in args.batches:
        results[f"deformable_batch_{batch}"] = deformable_candidates(device, batch, args.repeats, shapes)
        print(json.dumps({f"deformable_batch_{batch}": results[f"deformable_batch_{batch}"]}), flush=True)
    save()
    pixels = 64 * 64 if tiny else 1024 * 1024
    results["pixel_counts"] = count_candidates(device, pixels, 250, args.repeats)
    results["transfer_8_maps"] = transfer_candidates(device, 8 * pixels, args.repeats)
    print(json.dumps({key: results[key] for key in ("pixel_counts", "transfer_8_maps")}), flush=True)
    save()
    results["model"] = {}
    model_candidates(device, args.variant, args.batches, max(args.repeats // 2, 1), results["model"], save)
    for batch in args.batches:  # last: the model's rows decide more; a time limit cuts these first
        results[f"sam_attention_batch_{batch}"] = sam_attention_candidates(device, batch, args.repeats, tiny)
        print(json.dumps({f"sam_attention_batch_{batch}": results[f"sam_attention_batch_{batch}"]}), flush=True)
        save()
    return results


if __name__ == "__main__":
    main()
