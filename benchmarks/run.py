#!/usr/bin/env python
"""PosSAM benchmark suite: `python benchmarks/run.py --suite cpu` prints a markdown table and writes JSON.

Every target of the performance issue is a ratio measured in one run of this script (the machines are shared and
noisy), PASS/FAIL printed per target:

1. model overhead: full PosSAM-B forward + MASE post-processing <= 1.25x SAM ViT-B (sdpa) + ConvNeXt-L trunk alone;
2. two-stage alternative: PosSAM end to end >= 5x faster than SAM automatic mask generation + CLIP per mask;
3. panoptic post-processing >= 10x faster than transformers' OneFormer post-processor on the same logits (250
   queries x 150 classes, all surviving the filters; the sparse 30-object case is reported alongside);
4. vocabulary cache: a repeated pipeline call spends <= 1% in the text tower; a new vocabulary is one text pass;
5. memory: B inference peak RSS <= 2x fp32 weights; training-step memory flat from 10 to 100 segments;
6. training throughput (tiny config) and the data path alone (reported).
   One PosSAM-B training step at 1024x1024, batch 2 (CPU, fp32): seconds per step and peak RSS (reported).
7. `--suite gpu` (an accelerator): B/L/H, bf16/fp32, batch 1/8, eager and torch.compile: images/s, peak memory and
   forward FLOPs per second beside the same run's 8192^3 matmul; B/L/H bf16 training at batch 2: images/s, peak memory per
   GPU and GPU-days of the paper's 250K x 16 schedule. Rows with a goal first; `--time-budget-s` bounds the run and
   each finished row is written at once (benchmarks/device_session.sh runs it on a lent GPU machine).
8. input pipeline: the data path at COCO-like size in the training process and by 1, 2, N DataLoader workers; resume
   at row 45,000 of a 50,000-row parquet from the stream's state vs re-reading the consumed rows.
9. CPU bf16: PosSAM-B forward + MASE post-processing with bf16 weights >= 3.0x faster than fp32 (stretch 3.5x),
   interleaved repeats; the mask-logit relative error of bf16 against fp32 is reported.
10. efficiency: PosSAM-B's achieved FLOP/s (FlopCounterMode's count over the median time) >= 0.75x (fp32) and
   >= 0.70x (bf16) the FLOP/s of a 4096^3 matmul of the same dtype, measured between the same repeats.
11. ONNX: the exported PosSAM-B (`export_onnx`) in onnxruntime on CPU beside PyTorch eager, same inputs (reported).
All models have random weights (no Hub access); timings do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import VARIANTS, device_name, output_file, positive_int, positive_seconds

from transformers_possam.triton_support import kernels_not_built


TARGETS = (1, 2, 3, 4, 5, 6, 8, 9, 10, 11)


def machine() -> dict:
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def table_row(row: dict) -> str:
    result = "PASS" if row["pass"] else ("reported" if row["pass"] is None else "FAIL")
    target = row["target"]
    if target == 3 and row["pass"] is None:
        return (
            f"| 3 | {row['figure']} | {_seconds(row['ours']['median_s'])} | {_seconds(row['reference']['median_s'])} | "
            f"{row['ratio']:.1f}x faster | {row['goal']} | |"
        )
    if target == 7:
        memory = f"{row['peak_memory_bytes'] / 2**30:.1f} GiB peak" if row.get("peak_memory_bytes") else "n/a"
        if "error" in row:
            return f"| 7 | {row['figure']} | failed: {row['error'][:80]} | | | {row['goal']} | |"
        if "skipped" in row:
            return f"| 7 | {row['figure']} | not measured: {row['skipped']} | | | {row['goal']} | |"
        paper = f"paper (A100): {row['paper_fps_a100']} FPS" if row.get("paper_fps_a100") else ""
        if row.get("training"):
            paper = f"paper schedule (250K x 16 images): {row['gpu_days_paper_schedule']:.1f} GPU-days on one device"
        extra = f", first call {_seconds(row['seconds']['first_call_s'])}"
        if "end_to_end_tflops" in row:
            extra += f", forward FLOPs at {row['end_to_end_tflops']:.3g} TFLOP/s end to end"
        if "fullgraph_error" in row:
            extra += f"; fullgraph failed: {row['fullgraph_error'][:80]}"
        return (
            f"| 7 | {row['figure']} | {row['images_per_second']:.2f} images/s ({memory}{extra}) | {paper} | | "
            f"{row['goal']} | {result if row['pass'] is not None else ''} |"
        )
    if target == 10:
        return (
            f"| 10 | {row['figure']} | {row['achieved_flops_per_second'] / 1e12:.3f} TFLOP/s "
            f"({row['flops'] / 1e12:.2f} TFLOP in {_seconds(row['seconds']['median_s'])}) | matmul "
            f"{row['matmul_flops_per_second'] / 1e12:.3f} TFLOP/s | {row['ratio']:.2f}x | {row['goal']} | {result} |"
        )
    if target == 11:
        if "error" in row:
            return f"| 11 | {row['figure']} | failed: {row['error'][:120]} | | | {row['goal']} | |"
        measured = row["measured"]
        return (
            f"| 11 | {row['figure']} | onnxruntime {_seconds(row['ours']['median_s'])} | PyTorch "
            f"{_seconds(row['reference']['median_s'])} | {row['ratio']:.2f}x PyTorch's speed | {row['goal']} "
            f"(export {_seconds(measured['export_seconds'])}, peak RSS {measured['peak_rss_bytes'] / 2**30:.1f} GiB, "
            f"outputs within {measured['max_relative_difference']:.1e} relative) | |"
        )
    if target == 9:
        return (
            f"| 9 | {row['figure']} | bf16 {_seconds(row['ours']['median_s'])} | fp32 "
            f"{_seconds(row['reference']['median_s'])} | {row['ratio']:.2f}x faster | {row['goal']} (mask-logit "
            f"error {100 * row['mask_logit_relative_error']:.1f}%) | {result} |"
        )
    if target in (1, 2, 3):
        ours, reference = _seconds(row["ours"]["median_s"]), _seconds(row["reference"]["median_s"])
        ratio = f"{row['ratio']:.2f}x" if target == 1 else f"{row['ratio']:.1f}x faster"
        return f"| {target} | {row['figure']} | {ours} | {reference} | {ratio} | {row['goal']} | {result} |"
    if target == 4:
        first, later = row["first_call"], row["repeated_calls"][-1]
        return (
            f"| 4 | {row['figure']} | repeated call {_seconds(later['total_s'])} (text {later['text_s'] * 1e3:.2f} ms) | "
            f"first call {_seconds(first['total_s'])} (text {_seconds(first['text_s'])}, {first['text_calls']} pass, "
            f"{first['prompts']} prompts) | {100 * row['share']:.2f}% | {row['goal']} | {result} |"
        )
    if target == 5:
        if "step_bytes" in row:
            small, large = (b / 2**20 for b in row["step_bytes"])
            return f"| 5 | {row['figure']} | {large:.0f} MiB per step (100) | {small:.0f} MiB per step (10) | {row['ratio']:.2f}x | {row['goal']} | {result} |"
        measured = row["measured"]
        return (
            f"| 5 | {row['figure']} | peak {measured['peak_rss_bytes'] / 2**30:.2f} GiB | weights {measured['weight_bytes'] / 2**30:.2f} GiB | "
            f"{row['ratio']:.2f}x | {row['goal']} | {result} |"
        )
    if target == 8:
        if "from_state_s" in row:
            return (
                f"| 8 | {row['figure']} | {_seconds(row['from_state_s'])} | re-reading {_seconds(row['rereading_s'])} | "
                f"{row['ratio']:.0f}x faster | {row['goal']} | {result} |"
            )
        return (
            f"| 8 | {row['figure']} | {row['images_per_second']:.1f} images/s | CPU per image: training process "
            f"{1e3 * row['training_process_cpu_seconds_per_image']:.0f} ms, workers "
            f"{1e3 * row['workers_cpu_seconds_per_image']:.0f} ms; load {row['load_average'][0]:.1f} | | {row['goal']} | "
            f"{result} |"
        )
    if "seconds_per_step" in row:
        return (
            f"| 6 | {row['figure']} | {row['seconds_per_step']:.1f} s/step | peak RSS "
            f"{row['peak_rss_bytes'] / 2**30:.1f} GiB | | {row['goal']} | {result} |"
        )
    if "steps_per_second" in row:
        return (
            f"| 6 | {row['figure']} | {row['steps_per_second']:.2f} steps/s ({row['images_per_second']:.1f} images/s) | "
            f"data path {row['data_path_images_per_second_toy_128']:.0f} images/s | | {row['goal']} | {result} |"
        )
    return f"| 6 | {row['figure']} | {row['images_per_second']:.1f} images/s | | | {row['goal']} | {result} |"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suite", default="cpu", choices=["cpu", "gpu"], help="gpu: target 7 (B/L/H, bf16/fp32, batch 1/8)"
    )
    # flags of one suite default to None: given with the other suite they are refused, not ignored
    parser.add_argument("--device", default=None, type=device_name, help="--suite gpu: the accelerator (cuda)")
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=VARIANTS, help="--suite gpu: model variants (vit-b vit-l vit-h)"
    )
    parser.add_argument(
        "--compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="--suite gpu: torch.compile's mode for the compiled rows (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument("--batches", type=positive_int, nargs="+", default=None, help="--suite gpu: batch sizes (1 8)")
    parser.add_argument(
        "--time-budget-s",
        type=positive_seconds,
        default=None,
        help="--suite gpu: rows not started after this many seconds are reported as skipped (each finished row is "
        "written to --output at once, so a stopped run keeps them)",
    )
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (CPU suite 3, GPU suite 5)")
    parser.add_argument(
        "--targets",
        type=int,
        nargs="+",
        default=None,
        choices=TARGETS,
        help="--suite cpu: a subset of the targets to run (target 7 is --suite gpu)",
    )
    parser.add_argument(
        "--amg-points",
        type=positive_int,
        default=None,
        help="--suite cpu: points per side of the SAM mask-generation grid (pipeline default 32)",
    )
    parser.add_argument(
        "--onnx-variant",
        default=None,
        choices=["vit-b", "tiny"],
        help="--suite cpu, target 11: the model exported to ONNX (vit-b, default: several GB and minutes; or tiny)",
    )
    parser.add_argument("--output", default=None, type=output_file, help="default: benchmarks/results-<suite>.json")
    parser.add_argument(
        "--check-flags",
        action="store_true",
        help="check the other flags, then exit without running (device_session.sh does, before any step)",
    )
    args = parser.parse_args(argv)
    other_suite = (
        ("device", "variants", "compile_mode", "batches", "time_budget_s")
        if args.suite == "cpu"
        else ("targets", "amg_points", "onnx_variant")
    )
    given = [f"--{name.replace('_', '-')}" for name in other_suite if getattr(args, name) is not None]
    if given:
        other = "gpu" if args.suite == "cpu" else "cpu"
        parser.error(f"{' '.join(given)}: for --suite {other}, not --suite {args.suite}")
    args.output = args.output or str(Path(__file__).resolve().parent / f"results-{args.suite}.json")
    started = time.perf_counter()
    rows: list[dict] = []
    if args.suite == "gpu" and args.device is None:
        try:
            args.device = device_name("cuda")
        except argparse.ArgumentTypeError as error:
            parser.error(f"--device: {error}")
    if args.check_flags:
        return {}
    if args.suite == "gpu":
        import gpu

        args.variants = args.variants or ["vit-b", "vit-l", "vit-h"]
        args.batches = args.batches or [1, 8]
        args.repeats = args.repeats or 5
        args.targets = []
        machine_info = machine()
        if torch.device(args.device).type == "cuda":
            machine_info["gpu"] = torch.cuda.get_device_name()
            machine_info["matmul_tflops_8192"] = {
                name: gpu.matmul_tflops(torch.device(args.device), getattr(torch, name))
                for name in ("bfloat16", "float32")
            }
            machine_info["allow_tf32"] = {
                "matmul": torch.backends.cuda.matmul.allow_tf32,
                "cudnn": torch.backends.cudnn.allow_tf32,
            }

        def write_partial(row: dict) -> None:
            rows.append(row)
            partial = {
                "machine": machine_info,
                "suite": "gpu",
                "partial": True,
                "figures": rows,
                # Triton kernels that could not be built ran their PyTorch paths in the rows since
                "triton_kernels_not_built": kernels_not_built(),
            }
            # a new file renamed over the old one: a command killed while writing keeps the previous rows
            temporary = Path(args.output + ".tmp")
            temporary.write_text(json.dumps(partial, indent=1, default=str), encoding="utf-8")
            os.replace(temporary, args.output)
            print(table_row(row), flush=True)

        gpu.run(
            args.device,
            tuple(args.variants),
            repeats=args.repeats,
            batches=tuple(args.batches),
            training_batch=2,
            budget_s=args.time_budget_s,
            on_row=write_partial,
            compile_mode=args.compile_mode,
        )
    else:
        torch.set_num_threads(2)
        args.targets = args.targets or list(TARGETS)
        args.repeats = args.repeats or 3
        args.amg_points = args.amg_points or 32
        args.onnx_variant = args.onnx_variant or "vit-b"

    if 5 in args.targets:  # subprocesses first, while this process is still small
        import memory

        rows += memory.run()
    if 1 in args.targets or 2 in args.targets:
        import overhead
        from common import full_size_model

        from transformers_possam import PosSAMImageProcessor

        model, processor = full_size_model(), PosSAMImageProcessor()
        overhead_rows, context = overhead.run_overhead(model, processor, args.repeats)
        if 1 in args.targets:
            rows += overhead_rows
        if 2 in args.targets:
            possam_seconds = overhead.possam_end_to_end(model, processor, context, args.repeats)
            rows += overhead.run_two_stage(model, processor, possam_seconds, context, points_per_side=args.amg_points)
        del model
    if 11 in args.targets:  # a subprocess, while this process is still small
        import onnx_cpu

        rows += onnx_cpu.run(args.onnx_variant, repeats=args.repeats, threads=torch.get_num_threads())
    if 9 in args.targets or 10 in args.targets:
        import precision

        rows += [row for row in precision.run(args.repeats) if row["target"] in args.targets]
    if 3 in args.targets:
        import postprocess

        rows += postprocess.run(args.repeats)
    if 4 in args.targets:
        import vocabulary

        rows += vocabulary.run(args.repeats)
    if 6 in args.targets:
        import training

        rows += training.run(args.repeats)
    if 8 in args.targets:
        import data_pipeline

        rows += data_pipeline.run()

    rows.sort(key=lambda row: row["target"])
    results = {
        "machine": machine_info if args.suite == "gpu" else machine(),
        "suite": args.suite,
        "seconds": time.perf_counter() - started,
        "figures": rows,
        "triton_kernels_not_built": kernels_not_built(),
    }
    temporary = Path(args.output + ".tmp")  # renamed over the file: a kill never leaves half of it
    temporary.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    os.replace(temporary, args.output)
    print(
        f"\nMachine: {results['machine'].get('gpu', results['machine']['cpu'])}, {results['machine']['threads']} threads, torch {results['machine']['torch']}, "
        f"transformers {results['machine']['transformers']}; suite took {results['seconds'] / 60:.1f} min\n"
    )
    print("| target | figure | ours | reference | ratio | goal | result |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(table_row(row))
    print()
    for target in sorted({row["target"] for row in rows}):
        judged = [row for row in rows if row["target"] == target and row["pass"] is not None]
        if judged:
            verdict = "PASS" if all(row["pass"] for row in judged) else "FAIL"
            measured = [row for row in judged if "ratio" in row]
            if measured:  # the ratio furthest from its goal: smallest "x faster", largest "x the reference"
                worst = min(measured, key=lambda row: row["ratio"] if target in (2, 3, 9, 10) else -row["ratio"])
                print(
                    f"Target {target}: {verdict} ({len(judged)} figure(s); worst ratio {worst['ratio']:.2f}x: {worst['figure']})"
                )
            else:
                print(f"Target {target}: {verdict} ({len(judged)} figure(s))")
    for row in rows:
        if row["target"] == 1:
            print("\nPer-stage breakdown of the full forward (median run):")
            for stage, seconds in row["stages_s"].items():
                print(f"- {stage}: {seconds:.2f} s")
            print(
                f"- reference: HF SAM encoder alone {row['sam_alone']['median_s']:.2f} s, ConvNeXt-L trunk alone "
                f"{row['convnext_trunk_alone']['median_s']:.2f} s; everything but the encoders over the encoders as PosSAM "
                f"runs them: {row['ratio_vs_possam_own_encoders']:.2f}x"
            )
    print(f"\nwrote {args.output}")
    return results


if __name__ == "__main__":
    main()
