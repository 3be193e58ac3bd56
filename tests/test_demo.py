"""`make demo` (training/demo.py): checkpoints while it trains, an interrupted demo resumes, a finished one is reused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPOSITORY


DEMO = [sys.executable, str(REPOSITORY / "training" / "demo.py")]
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(REPOSITORY / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
# a few steps, a checkpoint every 2, two evaluation images: the behaviour of the 1,000-step demo in seconds
SHORT = ["--max_steps", "8", "--checkpointing_steps", "2", "--eval_images", "2"]


@pytest.fixture
def demo(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY / "training"))
    import demo

    return demo


def weights(output_dir: Path) -> dict:
    return load_file(output_dir / "model" / "model.safetensors")


def test_an_interrupted_demo_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path, demo, monkeypatch):
    uninterrupted = tmp_path / "uninterrupted"
    subprocess.run([*DEMO, *SHORT, "--output_dir", str(uninterrupted)], check=True, env=ENV, timeout=600)
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    assert reference["steps_trained_in_this_run"] == 8 and reference["resumed_from_step"] is None

    # killed (SIGKILL: no chance to clean up) as soon as its first checkpoint is complete
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*DEMO, *SHORT, "--output_dir", str(interrupted)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while not (interrupted / "model" / "checkpoint-2").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-2 within 300 s"
        time.sleep(0.01)
    assert process.poll() is None, "the demo finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (interrupted / "metrics.json").exists()
    killed_at = max(int(path.name.split("-")[1]) for path in (interrupted / "model").glob("checkpoint-*"))
    assert killed_at < 8

    output = subprocess.run(
        [*DEMO, *SHORT, "--output_dir", str(interrupted)], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"resuming from checkpoint-{killed_at}" in output.stdout
    resumed = json.loads((interrupted / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == killed_at
    assert resumed["steps_trained_in_this_run"] == 8 - killed_at
    # train.py's resume is exact (model, optimizer, scheduler, random generators, stream position)
    expected, got = weights(uninterrupted), weights(interrupted)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert resumed["PQ"] == reference["PQ"]

    # a finished demo, rerun with the same settings, is evaluated again without training
    monkeypatch.setattr(demo.train, "main", lambda argv: pytest.fail(f"the finished demo was retrained: {argv}"))
    again = demo.main([*SHORT, "--output_dir", str(interrupted)])
    assert again["steps_trained_in_this_run"] == 0 and again["PQ"] == reference["PQ"]
    assert all(torch.equal(expected[key], tensor) for key, tensor in weights(interrupted).items())


def test_checkpoints_of_other_settings_are_refused_and_fresh_starts_over(tmp_path, demo):
    model_dir = tmp_path / "model"
    arguments = ["--max_steps", "8"]
    assert demo.prepare_training(model_dir, arguments, fresh=False) == ("train", 0)
    (model_dir / "checkpoint-4").mkdir()
    assert demo.prepare_training(model_dir, arguments, fresh=False) == ("resume", 4)
    # another recipe must not continue these checkpoints
    with pytest.raises(SystemExit, match="--fresh"):
        demo.prepare_training(model_dir, ["--max_steps", "9"], fresh=False)
    assert (model_dir / "checkpoint-4").is_dir()  # nothing deleted without --fresh
    assert demo.prepare_training(model_dir, ["--max_steps", "9"], fresh=True) == ("train", 0)
    assert not (model_dir / "checkpoint-4").exists()
    # checkpoints without a settings file (a demo from before them): unknown recipe, refused
    (model_dir / demo.SETTINGS_FILE).unlink()
    (model_dir / "checkpoint-2").mkdir()
    with pytest.raises(SystemExit, match="no demo_settings.json"):
        demo.prepare_training(model_dir, arguments, fresh=False)


def test_one_thread_unless_omp_num_threads_says_otherwise(demo, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert demo.default_threads() == 3
    makefile = (REPOSITORY / "Makefile").read_text()
    demo_recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}" in demo_recipe  # make demo: one thread unless the user sets it
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])


def test_load_benchmark_runs_each_thread_count_quiet_and_beside_one_busy_process(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))
    import demo_load

    started = []
    real_competitor = demo_load.competitor

    def competitor():
        started.append(real_competitor())
        return started[-1]

    calls = []

    def run_demo(threads, output_dir, demo_args, environment):
        busy = [process for process in started if process.poll() is None]
        calls.append((threads, len(busy), demo_args))
        wall = 30.0 + 10 * len(busy) + threads
        return {"wall_seconds": wall, "cpu_seconds": wall, "train_seconds": wall - 5, "PQ": 70.0} | {
            "load_before": [0.0] * 3,
            "load_after": [0.0] * 3,
        }

    monkeypatch.setattr(demo_load, "competitor", competitor)
    monkeypatch.setattr(demo_load, "run_demo", run_demo)
    result = demo_load.main(
        ["--threads", "1", "2", "--rounds", "2", "--max_steps", "5", "--json", str(tmp_path / "r.json")]
    )
    # quiet and busy alternate which goes first; exactly one competing process during the busy runs
    assert [(threads, busy) for threads, busy, _ in calls] == [
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (1, 1),
        (1, 0),
        (2, 1),
        (2, 0),
    ]
    assert all(arguments == ["--max_steps", "5"] for _, _, arguments in calls)
    assert len(started) == 4 and all(process.poll() is not None for process in started)  # all stopped
    assert result["summary"][1] == {"quiet_seconds": 31.0, "busy_seconds": 41.0, "busy_over_quiet": round(41 / 31, 2)}
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["2"]["busy_seconds"] == 42.0
