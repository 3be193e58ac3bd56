"""
Where a GPU row's time goes (issue 15, target 7): for each `--cases` entry (variant:dtype:batch), the median time
of the forward alone, of MASE panoptic post-processing alone (on one stored forward output) and of both, the
forward's time by box (`gpu.box_times`: SAM encoder, FPN, pixel decoder, ConvNeXt trunk, ...), then
`torch.profiler` tables of the whole step (the ops with the most device time, with the most host time, and with the
most device time split by input shapes) and of the post-processing alone, so a session with minutes of device time
learns what to speed up next.
Random weights, as `gpu.py`.

`python benchmarks/gpu_profile.py --device cuda --output-dir OUT` (device_session.sh's follow-up, at most a few
minutes); `--device cpu --cases tiny:float32:1` runs the same code on a CPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import FLOAT_DTYPES, VARIANTS, device_name, positive_int
from gpu import _config, _synchronize, box_times, time_steps


def _median_seconds(step, device: torch.device, repeats: int) -> dict:
    """`gpu.time_steps`'s timing of `step` (its warm-up, then `repeats` timed calls), without the peak memory."""
    timing, _ = time_steps(step, device, repeats)
    return timing


def device_busy_us(averages) -> float:
    """
    Microseconds of device time in a profile's `key_averages()`: the device's own events (kernels, copies), as the
    tables' "Self CUDA time total" counts them. Summing every event's self device time counts each kernel twice, once
    as itself and once in the operator that launched it (the H200 profile of 2026-11-26 reported 80 ms per batch-1
    step where its table said 40).
    """
    from torch.autograd import DeviceType

    return sum(
        event.self_device_time_total
        for event in averages
        if event.device_type == DeviceType.CUDA and not event.is_user_annotation
    )


def profile_case(variant: str, dtype_name: str, batch: int, device: torch.device, repeats: int, rows: int) -> dict:
    """The timings of one case and its profiler tables (text), as a dict."""
    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = PosSAMForPanopticSegmentation(_config(variant)).eval().to(dtype)
    size = model.config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(150, 1, model.config.clip_embed_dim, device=device), dim=-1
    ).to(dtype)
    pixel_values = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    target_sizes = [(size, size)] * batch

    def forward():
        return model(pixel_values, class_embeddings=class_embeddings)

    with torch.inference_mode():
        outputs = forward()
        result: dict[str, object] = {
            "case": f"{variant}:{dtype_name}:{batch}",
            "forward": _median_seconds(forward, device, repeats),
            "post_processing": _median_seconds(
                lambda: processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes),
                device,
                repeats,
            ),
            "both": _median_seconds(
                lambda: processor.post_process_panoptic_segmentation(forward(), target_sizes=target_sizes),
                device,
                repeats,
            ),
        }
        result["boxes_s"] = box_times(model, forward, device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            for _ in range(3):
                processor.post_process_panoptic_segmentation(forward(), target_sizes=target_sizes)
            _synchronize(device)
        # the post-processing alone (the forward's output stored): what its milliseconds per image are made of
        with torch.profiler.profile(activities=activities, record_shapes=True) as post_profiler:
            for _ in range(3):
                processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes)
            _synchronize(device)
    averages = profiler.key_averages()
    device_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    result["table_device"] = averages.table(sort_by=device_key, row_limit=rows, max_name_column_width=60)
    result["table_host"] = averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)
    # the same ops split by input shapes: which copy, cat or sum is the expensive one
    result["table_shapes"] = profiler.key_averages(group_by_input_shape=True).table(
        sort_by=device_key, row_limit=rows, max_name_column_width=40, max_shapes_column_width=100
    )
    result["table_post_processing"] = post_profiler.key_averages().table(
        sort_by=device_key, row_limit=rows, max_name_column_width=60
    )
    if device.type == "cuda":
        result["device_busy_s_per_step"] = device_busy_us(averages) / 3 / 1e6
    return result  # the model and its outputs go with this frame


def profile_case_name(text: str) -> str:
    """`--cases`' `variant:dtype:batch`, each part checked (a usage error naming the part, before any case runs)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not variant:dtype:batch (e.g. vit-b:bfloat16:1)")
    variant, dtype_name, batch = parts
    if variant not in VARIANTS:
        raise argparse.ArgumentTypeError(f"{text}: variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if dtype_name not in FLOAT_DTYPES:
        raise argparse.ArgumentTypeError(f"{text}: dtype {dtype_name!r} is not one of {', '.join(FLOAT_DTYPES)}")
    positive_int(batch)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", type=device_name)
    parser.add_argument("--cases", nargs="+", type=profile_case_name, default=["vit-b:bfloat16:1", "vit-h:bfloat16:8"])
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--rows", type=positive_int, default=40, help="rows of each profiler table")
    parser.add_argument("--output-dir", default=".")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file; give a folder")
    device = torch.device(args.device)
    output.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases:
        variant, dtype_name, batch = case.split(":")
        try:
            result = profile_case(variant, dtype_name, int(batch), device, args.repeats, args.rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the case's model is gone: its cached blocks back before the next
        except Exception as error:  # reported; the other cases stand
            result = {"case": case, "error": f"{type(error).__name__}: {error}"[:1000]}
        results.append(result)
        print(json.dumps({key: value for key, value in result.items() if not key.startswith("table")}), flush=True)
        # one text file per case (a lent machine gives back at most 8 files): its tables one after the other
        tables = [f"== {key[6:]} ==\n{value}" for key, value in result.items() if key.startswith("table_")]
        if tables:
            (output / f"profile-{case.replace(':', '-')}.txt").write_text("\n\n".join(tables))
        (output / "profile.json").write_text(json.dumps(results, indent=1))
    return 0 if any("error" not in result for result in results) else 1  # every case failed: a failed run


if __name__ == "__main__":
    raise SystemExit(main())
