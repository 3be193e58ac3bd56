"""The benchmark suite's code paths on tiny inputs (figures themselves come from `benchmarks/run.py`)."""

import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_gpu_suite_runs_on_cpu_with_the_tiny_config():
    import gpu

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
    from common import StageTimer

    module = torch.nn.Linear(3, 3)
    timer = StageTimer()
    with timer.active():
        timer.wrap(module, "forward", "linear")
        module(torch.ones(1, 3))
        module(torch.ones(1, 3))
        assert timer.calls["linear"] == 2 and timer.spent["linear"] > 0
    assert "forward" not in vars(module)  # the class method is back


def test_post_processing_benchmark_logits_keep_the_requested_queries():
    from postprocess import model_like_outputs

    from transformers_possam.postprocessing import class_scores

    for objects in (30, 250):
        scores, is_void = class_scores(model_like_outputs(2, objects))
        kept = (~is_void) & (scores.amax(-1) > 0)
        assert kept.sum(-1).tolist() == [objects, objects]
