"""The benchmark suite's code paths on tiny inputs (figures themselves come from `benchmarks/run.py`)."""

import pytest
import torch

from .conftest import load_script


def test_gpu_suite_runs_on_cpu_with_the_tiny_config():
    gpu = load_script("benchmarks/gpu.py")

    threads = torch.get_num_threads()
    try:
        rows = gpu.run("cpu", ("tiny",), repeats=1, batches=(1, 2), dtypes=("float32",), compile_models=False)
    finally:
        torch.set_num_threads(threads)
    assert [(row["batch"], row["dtype"], row["compiled"]) for row in rows] == [
        (1, "float32", False),
        (2, "float32", False),
    ]
    assert all(row["images_per_second"] > 0 and row["target"] == 7 for row in rows)


@pytest.mark.slow  # inductor compiles the tiny model: 6.5 min on the shared 2-core machine (load 4)
def test_gpu_suite_compiled_rows_run_on_cpu_with_the_tiny_config():
    """The matrix's compiled rows (torch.compile of the whole model forward), their code path on CPU."""
    gpu = load_script("benchmarks/gpu.py")
    threads = torch.get_num_threads()
    try:
        rows = gpu.run("cpu", ("tiny",), repeats=1, batches=(1,), dtypes=("float32",))
    finally:
        torch.set_num_threads(threads)
    assert [(row["compiled"], row["figure"].rsplit(", ", 1)[1]) for row in rows] == [
        (False, "eager"),
        (True, "torch.compile"),
    ]
    assert all("error" not in row and row["images_per_second"] > 0 for row in rows), [r.get("error") for r in rows]


def test_gpu_suite_goals_are_the_issues():
    """Issue 15's H100 goals: B bf16 batch 1 >= 25 eager, >= 60 compiled; H bf16 batch 8 >= 40 either way."""
    gpu = load_script("benchmarks/gpu.py")
    assert gpu.goal("vit-b", "bfloat16", 1, False) == 25 and gpu.goal("vit-b", "bfloat16", 1, True) == 60
    assert gpu.goal("vit-h", "bfloat16", 8, False) == gpu.goal("vit-h", "bfloat16", 8, True) == 40
    assert gpu.goal("vit-b", "float32", 1, False) is None and gpu.goal("vit-l", "bfloat16", 8, True) is None


def test_stage_timer_counts_and_restores():
    StageTimer = load_script("benchmarks/common.py").StageTimer

    module = torch.nn.Linear(3, 3)
    timer = StageTimer()
    with timer.active():
        timer.wrap(module, "forward", "linear")
        module(torch.ones(1, 3))
        module(torch.ones(1, 3))
        assert timer.calls["linear"] == 2 and timer.spent["linear"] > 0
    assert "forward" not in vars(module)  # the class method is back


def test_post_processing_benchmark_logits_keep_the_requested_queries():
    model_like_outputs = load_script("benchmarks/postprocess.py").model_like_outputs

    from transformers_possam.postprocessing import class_scores

    for objects in (30, 250):
        scores, is_void = class_scores(model_like_outputs(2, objects))
        kept = (~is_void) & (scores.amax(-1) > 0)
        assert kept.sum(-1).tolist() == [objects, objects]


def test_scripts_load_by_path_without_leaking_their_folder():
    """Benchmark modules import their siblings as top-level modules (`from common import ...`): loading one must
    leave neither `benchmarks/` on sys.path nor `common` in sys.modules, which would shadow names for other tests."""
    import sys

    path_before = list(sys.path)
    gpu = load_script("benchmarks/gpu.py")
    assert sys.path == path_before
    assert "common" not in sys.modules and "gpu" not in sys.modules
    assert gpu.__name__ == "possam_benchmarks_gpu" and gpu.summary.__module__ == "common"  # its sibling, kept
    assert load_script("benchmarks/gpu.py") is gpu  # loaded once


def test_bf16_and_efficiency_targets_run_on_the_tiny_config():
    """Targets 9 and 10 (benchmarks/precision.py): their code path on the tiny config, a small matmul."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

    precision = load_script("benchmarks/precision.py")
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    rows = precision.run(2, model=model, matmul_size=256, name="tiny")
    assert [(row["target"], row.get("dtype")) for row in rows] == [(9, None), (10, "float32"), (10, "bfloat16")]
    speed, *efficiency = rows
    assert speed["ours"]["repeats"] == speed["reference"]["repeats"] == 2
    assert speed["ratio"] == speed["reference"]["median_s"] / speed["ours"]["median_s"]
    assert 0 < speed["mask_logit_relative_error"] < 0.5  # bf16 differs from fp32, but not wildly
    assert next(model.parameters()).dtype == torch.float32  # the fp32 model was not cast in place
    for row in efficiency:
        # FLOPs counted by FlopCounterMode: at least the SAM encoder's patch embedding conv (2 * C * k^2 * out * tokens)
        patch = model.model.vision_encoder.patch_embed.projection
        tokens = (model.config.vision_config.image_size // patch.kernel_size[0]) ** 2
        assert row["flops"] >= 2 * patch.in_channels * patch.kernel_size[0] ** 2 * patch.out_channels * tokens
        assert row["achieved_flops_per_second"] == row["flops"] / row["seconds"]["median_s"]
        assert row["ratio"] == row["achieved_flops_per_second"] / row["matmul_flops_per_second"]
        assert row["matmul_flops_per_second"] == 2 * 256**3 / row["matmul_seconds"]["median_s"]


def test_flop_counter_counts_a_matmul():
    precision = load_script("benchmarks/precision.py")
    left, right = torch.randn(8, 16), torch.randn(16, 4)
    assert precision.count_flops(lambda: left @ right) == 2 * 8 * 16 * 4
    # SDPA on CPU (the flash kernel torch's table lacks): q k^T and p v, 2 * 2 * B * heads * L * L * d
    query = torch.randn(2, 3, 10, 8)
    flops = precision.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query))
    assert flops == 4 * 2 * 3 * 10 * 10 * 8
    # in-place baddbmm_ (SAM's global attention accumulates q k^T onto its bias) counts as a batched matmul
    scores, keys = torch.zeros(3, 10, 6), torch.randn(3, 8, 6)
    assert precision.count_flops(lambda: scores.baddbmm_(query[0], keys)) == 2 * 3 * 10 * 8 * 6


def test_onnxruntime_target_runs_on_the_tiny_config():
    """Target 11 (benchmarks/onnx_cpu.py): export, onnxruntime and PyTorch timings, in its subprocess."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx_cpu = load_script("benchmarks/onnx_cpu.py")
    (row,) = onnx_cpu.run("tiny", repeats=1, threads=1, timeout=600)
    assert "error" not in row, row.get("error")
    assert row["target"] == 11 and row["measured"]["size"] == 128
    assert row["ratio"] == row["reference"]["median_s"] / row["ours"]["median_s"]
    assert row["measured"]["max_relative_difference"] <= 1e-4  # issue 15's bound for the ONNX outputs


def test_run_table_rows_of_the_new_targets():
    run = load_script("benchmarks/run.py")
    timing = {"median_s": 2.0, "min_s": 2.0, "max_s": 2.0, "repeats": 1}
    speed = {"target": 9, "figure": "f", "ours": timing, "reference": timing, "ratio": 3.1}
    speed.update(mask_logit_relative_error=0.05, goal="g", **{"pass": True})
    assert run.table_row(speed).startswith("| 9 | f | bf16 2.00 s | fp32 2.00 s | 3.10x faster |")
    efficiency = {"target": 10, "figure": "f", "achieved_flops_per_second": 1e12, "flops": 2e12, "seconds": timing}
    efficiency.update(matmul_flops_per_second=2e12, ratio=0.5, goal="g", **{"pass": False})
    assert run.table_row(efficiency).endswith("| 0.50x | g | FAIL |")
    failed = {"target": 11, "figure": "f", "error": "MemoryError", "goal": "reported", "pass": None}
    assert "failed: MemoryError" in run.table_row(failed)
