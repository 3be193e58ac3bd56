"""
Target 7 (needs an accelerator): PosSAM-B/L/H at 1024x1024, bf16 and fp32, batch 1 and 8, eager and compiled
(`torch.compile` of the whole model forward; post-processing eager) -> images per second (forward + MASE panoptic
post-processing) and peak accelerator memory. Goals on an H100 (issue 15): B bf16 batch 1 >= 25 FPS eager and >= 60 FPS
compiled; H bf16 batch 8 >= 40 images/s (eager or compiled: each row is judged). Random weights (timings do not depend
on them).
Training (`run_training`): B/L/H bf16 training steps at batch 2 per GPU (autocast as `--mixed_precision bf16`, AdamW,
clipping) -> images/s and peak memory per GPU, and the GPU-days the paper's schedule (250K iterations x 16 images)
would take at that rate.

`python benchmarks/run.py --suite gpu` (writes results-gpu.json). `--device cpu --variants tiny` exercises the same
code on a CPU with the tiny config (used by the tests; no figures are meaningful there).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from common import summary

from training import make_training_step


CARDS = Path(__file__).resolve().parents[1] / "model_cards"
PAPER_FPS = {"vit-b": 1.72, "vit-l": 1.48, "vit-h": 1.30}
# issue 15's goals on an H100, images/s: (variant, dtype, batch, compiled) -> minimum; `None` for compiled: both
GOALS_H100: dict[tuple[str, str, int, bool | None], float] = {
    ("vit-b", "bfloat16", 1, False): 25.0,
    ("vit-b", "bfloat16", 1, True): 60.0,
    ("vit-h", "bfloat16", 8, None): 40.0,
}


def goal(variant: str, dtype_name: str, batch: int, compiled: bool) -> float | None:
    """Issue 15's H100 goal in images/s for a row of the matrix, or None (reported only)."""
    return GOALS_H100.get((variant, dtype_name, batch, compiled), GOALS_H100.get((variant, dtype_name, batch, None)))


# the paper's training schedule (Appendix A): 250K iterations of 16 images (2 per GPU x 8 A100s)
PAPER_SCHEDULE_IMAGES = 250_000 * 16


def _name(variant: str) -> str:
    return "PosSAM (tiny config)" if variant == "tiny" else f"PosSAM-{variant[-1].upper()}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(variant: str):
    from transformers_possam import PosSAMConfig, tiny_config

    if variant == "tiny":
        return tiny_config()
    config = PosSAMConfig.from_pretrained(CARDS / f"possam-{variant}")
    config.vision_config._attn_implementation = "sdpa"
    return config


def _measure(model, processor, pixel_values, class_embeddings, device, repeats: int) -> dict:
    batch = pixel_values.shape[0]
    size = tuple(pixel_values.shape[-2:])

    def step():
        outputs = model(pixel_values, class_embeddings=class_embeddings)
        processor.post_process_panoptic_segmentation(outputs, target_sizes=[size] * batch)

    with torch.inference_mode():
        timing, peak = time_steps(step, device, repeats)
    return {"seconds": timing, "images_per_second": batch / timing["median_s"], "peak_memory_bytes": peak}


def time_steps(step, device: torch.device, repeats: int) -> tuple[dict, int | None]:
    """`step()` twice to warm up, then `repeats` timed calls: (`summary` of the times, peak CUDA memory or None)."""
    for _ in range(2):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return summary(times), (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def run(
    device_name: str = "cuda",
    variants: tuple[str, ...] = ("vit-b", "vit-l", "vit-h"),
    repeats: int = 10,
    batches: tuple[int, ...] = (1, 8),
    dtypes: tuple[str, ...] = ("bfloat16", "float32"),
    compile_models: bool = True,
) -> list[dict]:
    """
    The matrix variants x dtypes x batches x (eager, compiled): one row each (`compile_models=False`: eager only). A
    compilation or measurement that fails (e.g. out of memory for H at batch 8 in fp32) is reported in its row, and
    the other rows stand.
    """
    from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor

    device = torch.device(device_name)
    rows = []
    for variant in variants:
        config = _config(variant)
        size = config.vision_config.image_size
        processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
        torch.manual_seed(0)
        with torch.device(device):
            model = PosSAMForPanopticSegmentation(config).eval()
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            model.to(dtype)
            class_embeddings = torch.nn.functional.normalize(
                torch.randn(150, 1, config.clip_embed_dim, device=device), dim=-1
            ).to(dtype)
            for compiled in (False, True) if compile_models else (False,):
                runner = torch.compile(model) if compiled else model
                for batch in batches:
                    row = {
                        "target": 7,
                        "figure": f"{_name(variant)} {dtype_name} batch {batch} at {size}x{size}, "
                        + ("torch.compile" if compiled else "eager"),
                        "variant": variant,
                        "dtype": dtype_name,
                        "batch": batch,
                        "compiled": compiled,
                        "paper_fps_a100": PAPER_FPS.get(variant),
                        "goal": "reported",
                        "pass": None,
                    }
                    try:
                        pixel_values = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
                        start = time.perf_counter()
                        row.update(_measure(runner, processor, pixel_values, class_embeddings, device, repeats))
                        row["warm_up_and_measure_seconds"] = time.perf_counter() - start
                        minimum = goal(variant, dtype_name, batch, compiled)
                        if minimum is not None:
                            row.update(
                                goal=f">= {minimum:g} images/s (H100)",
                                **{"pass": row["images_per_second"] >= minimum},
                            )
                    except Exception as error:  # reported, never hidden: the other rows stand
                        row["error"] = f"{type(error).__name__}: {error}"[:500]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    rows.append(row)
                del runner
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def gpu_days(images_per_second: float, images: int = PAPER_SCHEDULE_IMAGES) -> float:
    """Device-days to train on `images` images at `images_per_second` per device (the paper's schedule by default)."""
    return images / images_per_second / 86_400


def run_training(
    device_name: str = "cuda",
    variants: tuple[str, ...] = ("vit-b", "vit-l", "vit-h"),
    batch_size: int = 2,
    repeats: int = 5,
) -> list[dict]:
    """
    Per variant: training steps at `batch_size` per device under bf16 autocast (`training.make_training_step`: the
    paper's recipe, frozen encoders), after 2 warm-up steps -> images/s, peak memory, GPU-days of the paper's
    schedule on one such device (divide by the number of devices for data parallelism).
    """
    from transformers_possam import PosSAMForPanopticSegmentation

    device = torch.device(device_name)
    rows = []
    for variant in variants:
        config = _config(variant)
        size = config.vision_config.image_size
        row = {
            "target": 7,
            "figure": f"{_name(variant)} bfloat16 training, batch {batch_size} at {size}x{size} (autocast, AdamW)",
            "variant": variant,
            "dtype": "bfloat16",
            "batch": batch_size,
            "compiled": False,
            "training": True,
            "goal": "reported",
            "pass": None,
        }
        try:
            torch.manual_seed(0)
            with torch.device(device):
                model = PosSAMForPanopticSegmentation(config)
            step = make_training_step(model, batch_size, device, autocast_dtype=torch.bfloat16)
            timing, peak = time_steps(step, device, repeats)
            images_per_second = batch_size / timing["median_s"]
            row.update(
                seconds=timing,
                images_per_second=images_per_second,
                peak_memory_bytes=peak,
                gpu_days_paper_schedule=gpu_days(images_per_second),
            )
            del model, step
        except Exception as error:  # reported (e.g. out of memory for H), never hidden: the other rows stand
            row["error"] = f"{type(error).__name__}: {error}"[:500]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows
