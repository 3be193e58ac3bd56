"""The benchmark suite's code paths on tiny inputs (figures themselves come from `benchmarks/run.py`)."""

import torch

from .conftest import load_script


def test_gpu_suite_runs_on_cpu_with_the_tiny_config():
    gpu = load_script("benchmarks/gpu.py")

    threads = torch.get_num_threads()
    try:
        rows = gpu.run("cpu", ("tiny",), repeats=1, batches=(1, 2), dtypes=("float32",), compile_b=False)
    finally:
        torch.set_num_threads(threads)
    assert [(row["batch"], row["dtype"], row["compiled"]) for row in rows] == [
        (1, "float32", False),
        (2, "float32", False),
    ]
    assert all(row["images_per_second"] > 0 and row["target"] == 7 for row in rows)


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
