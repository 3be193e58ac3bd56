"""
Candidate GPU paths timed side by side in one run (issue 15, target 7), for the choices `gpu_profile.py`'s tables
pointed at on an H200 (2026-11-26):

1. the pixel decoder's deformable sampling, per layer at PosSAM's shapes (1024x1024 input: levels 32x32, 64x64,
   128x128; 8 heads of 32; 4 points): transformers' `multi_scale_deformable_attention` (grid_sample per level, then
   a stack of all levels, a product and a sum: what CUDA runs today), this package's
   `deformable_attention_embedding_bag` in one step, in accelerator-sized steps and in its CPU-sized steps, and
   grid_sample per level summed level by level (no stack); each against the first (max abs difference);
2. the panoptic post-processing's pixel counts per query: `scatter_add_` against `histc`;
3. its one device-to-host transfer: pageable against page-locked staging;
4. PosSAM-B bf16 forward with each deformable sampler (`PosSAMMultiscaleDeformableAttention.sampler` replaced),
   and the dense panoptic post-processing with the old pieces (pageable transfer, scatter counts), the new, and the
   new with chunks of 64 masks instead of 16; the new post-processing's segments against the CPU's cell-bound
   path.

`python benchmarks/gpu_candidates.py --device cuda --output OUT/candidates.json`; `--device cpu --variant tiny`
runs the same code on a CPU (the tests do; no figure is meaningful there).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from gpu import _config, time_steps
from torch.nn import functional as F


# the embedding_bag sampler's steps sized for an accelerator, where a step costs about 40 kernel launches: 2**24 bag
# entries (about 0.8 GB of buffers) is one step per 1024x1024 image (8.3 million entries per layer), four at batch 8
ACCELERATOR_BAG_ENTRIES_PER_STEP = 2**24


def _time(step, device: torch.device, repeats: int) -> dict:
    """
    `gpu.time_steps`'s timing of `step` (its warm-up, then `repeats` timed calls), without the peak memory. A quarter
    second of warm-up on CUDA (not the suite's second): the candidates run back to back, the GPU already busy, and
    about 30 timings must fit the 120 s `device_session.sh` gives this script.
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


def samplers(with_cpu_steps: bool) -> dict:
    """The deformable samplers compared (same arguments and result as transformers' `multi_scale_deformable_attention`):
    transformers' own, the embedding_bag sampler in one step, in accelerator-sized steps and (`with_cpu_steps`) in
    its CPU-sized steps, and grid_sample summed level by level."""
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling.deformable_attention import deformable_attention_embedding_bag

    def embedding_bag_in_steps(entries: int):
        return lambda *args: deformable_attention_embedding_bag(*args, bag_entries_per_step=entries)

    candidates = {
        "transformers_stack": multi_scale_deformable_attention,
        "embedding_bag_one_step": embedding_bag_in_steps(2**62),
        "embedding_bag_accelerator_steps": embedding_bag_in_steps(ACCELERATOR_BAG_ENTRIES_PER_STEP),
        "embedding_bag_cpu_steps": deformable_attention_embedding_bag,
        "grid_sample_by_level": grid_sample_by_level,
    }
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
    candidates = samplers(with_cpu_steps=True)
    results = {}
    with torch.inference_mode():
        reference = multi_scale_deformable_attention(value, shapes, locations, weights)
        for name, function in candidates.items():
            try:
                output = function(value, shapes, locations, weights)
                results[name] = {
                    **_time(lambda function=function: function(value, shapes, locations, weights), device, repeats),
                    "max_abs_difference": float((output - reference).abs().max()),
                }
            except Exception as error:  # reported; the other candidates stand
                results[name] = {"error": f"{type(error).__name__}: {error}"[:500]}
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


def model_candidates(
    device: torch.device, variant: str, batches: list[int], repeats: int, results: dict, save
) -> None:
    """Section 4, into `results` (`batch_<n>` rows), `save()` called after every entry: a command stopped at its time
    limit keeps what was measured."""
    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, postprocessing
    from transformers_possam.modeling import deformable_attention

    torch.manual_seed(0)
    with torch.device(device):
        model = PosSAMForPanopticSegmentation(_config(variant)).eval().to(torch.bfloat16)
    size = model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(150, 1, model.config.clip_embed_dim, device=device), dim=-1
    ).to(torch.bfloat16)
    candidates = samplers(with_cpu_steps=False)
    attention = deformable_attention.PosSAMMultiscaleDeformableAttention
    original_sampler = attention.__dict__["sampler"]
    new_fetch, new_count = postprocessing._fetch_to_host, postprocessing._pixels_per_query
    chunking = postprocessing.RESIZE_CHUNK, postprocessing.RESIZE_ELEMENTS

    def restore():
        attention.sampler = original_sampler
        postprocessing._fetch_to_host, postprocessing._pixels_per_query = new_fetch, new_count
        postprocessing.RESIZE_CHUNK, postprocessing.RESIZE_ELEMENTS = chunking

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
                outputs = model(pixel_values, class_embeddings=class_embeddings)
                targets = [(size, size)] * batch

                def post():  # the dense path, the default off the CPU (asked for, so that the CPU test runs it too)
                    return processor.post_process_panoptic_segmentation(
                        outputs, target_sizes=targets, dense_assignment=True
                    )

                def with_old_pieces():
                    postprocessing._fetch_to_host = lambda values: values.cpu().numpy()
                    postprocessing._pixels_per_query = postprocessing._count_by_scatter
                    try:
                        return _time(post, device, repeats)
                    finally:
                        restore()

                def chunks_of_64():
                    # the dense path's query chunks: 16 masks (128 MiB temporaries) by default, 64 (512 MiB) here: a
                    # quarter of the running-argmax merges; the same segments (ties aside)
                    postprocessing.RESIZE_CHUNK, postprocessing.RESIZE_ELEMENTS = 64, 2**27
                    try:
                        timing = _time(post, device, repeats)
                        segmentation = post()[0]["segmentation"]
                    finally:
                        restore()
                    timing["pixels_differing"] = int((segmentation != post()[0]["segmentation"]).sum())
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
                _measured(row, "post_processing_chunks_of_64", chunks_of_64, save)
                _measured(row, "first_image_against_cpu_cell_bound", against_the_cpu, save)
            print(json.dumps({f"batch_{batch}": row}), flush=True)
    finally:
        restore()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variant", default="vit-b")
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default="candidates.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = args.variant == "tiny"
    shapes = [(4, 4), (8, 8), (16, 16)] if tiny else [(32, 32), (64, 64), (128, 128)]
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type}
    results["torch"] = torch.__version__

    def save():  # written aside, then renamed: a command killed mid-write keeps the last whole file
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
    return results


if __name__ == "__main__":
    main()
