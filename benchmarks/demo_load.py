#!/usr/bin/env python
"""
`make demo` on a quiet and on a busy machine: runs `training/demo.py` (each run from scratch, `--fresh`, in a temporary
folder) alternately without and with one competing CPU-bound process (`python -c "while True: pass"`), and prints each
run's wall time, the training part of it, the load averages around it, and the ratio busy / quiet per thread count.
Issue 15 asks for a ratio of at most 1.5 with the default thread count, and at most 5 minutes quiet.

    python benchmarks/demo_load.py                                    # the whole demo, 1 thread, once quiet, once busy
    python benchmarks/demo_load.py --threads 1 2 --rounds 2 --max_steps 150 --eval_images 8   # per-step comparison

Extra `--demo_args` go to demo.py unchanged. "Quiet" means no process of ours competes: whatever else runs on the
machine shows in the load averages printed beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import output_file, positive_int


REPOSITORY = Path(__file__).resolve().parents[1]
DEMO = REPOSITORY / "training" / "demo.py"


def run_demo(threads: int, output_dir: Path, demo_args: list[str], environment: dict[str, str]) -> dict:
    """One fresh demo run: wall seconds, demo.py's own training seconds and the load averages before and after."""
    env = {**environment, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(DEMO), "--fresh", "--output_dir", str(output_dir), *demo_args]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=REPOSITORY, capture_output=True, text=True)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {
        "wall_seconds": round(wall, 1),
        # CPU seconds of the demo (all its threads): with one thread, cpu / wall is the share of a core it was given
        "cpu_seconds": round(cpu, 1),
        "train_seconds": metrics["train_seconds"],
        **{key: round(metrics[key], 2) for key in ("PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "mask_AP")},
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in os.getloadavg()],
    }


def competitor() -> subprocess.Popen:
    """One CPU-bound process (a pure Python busy loop, one core)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", type=positive_int, nargs="+", default=[1], help="OMP_NUM_THREADS values to compare"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=1, help="quiet / busy pairs per thread count (interleaved)"
    )
    parser.add_argument(
        "--max_steps", type=positive_int, default=None, help="demo.py --max_steps (default: the demo's)"
    )
    parser.add_argument(
        "--eval_images", type=positive_int, default=None, help="demo.py --eval_images (default: the demo's)"
    )
    parser.add_argument(
        "--wait_policy",
        default=None,
        choices=["active", "passive"],
        help="OMP_WAIT_POLICY for the demo (default: unset)",
    )
    parser.add_argument(
        "--demo_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="further demo.py arguments: last on the line (everything after it goes to demo.py)",
    )
    parser.add_argument("--json", type=output_file, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    demo_args = list(args.demo_args)
    if args.max_steps is not None:
        demo_args += ["--max_steps", str(args.max_steps)]
    if args.eval_images is not None:
        demo_args += ["--eval_images", str(args.eval_images)]
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if args.wait_policy is not None:
        environment["OMP_WAIT_POLICY"] = args.wait_policy.upper()
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY / "src"), *filter(None, [environment.get("PYTHONPATH")])]
    )

    runs = []
    with tempfile.TemporaryDirectory(prefix="demo_load_") as folder:
        for round_index in range(args.rounds):
            for threads in args.threads:
                # alternate which condition goes first, so a drift in the machine's load hits both alike
                order = ("quiet", "busy") if round_index % 2 == 0 else ("busy", "quiet")
                for condition in order:
                    busy = competitor() if condition == "busy" else None
                    try:
                        result = run_demo(threads, Path(folder) / "demo", demo_args, environment)
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
                    result |= {"threads": threads, "condition": condition, "round": round_index}
                    runs.append(result)
                    print(
                        f"round {round_index} threads {threads} {condition:5s}: {result['wall_seconds']:7.1f} s wall, "
                        f"{result['cpu_seconds']:7.1f} s CPU, {result['train_seconds']:7.1f} s training+setup, PQ {result['PQ']:.1f}, load average "
                        f"{result['load_before']} -> {result['load_after']}",
                        flush=True,
                    )

    summary = {}
    for threads in args.threads:
        quiet = [run["wall_seconds"] for run in runs if run["threads"] == threads and run["condition"] == "quiet"]
        busy = [run["wall_seconds"] for run in runs if run["threads"] == threads and run["condition"] == "busy"]
        summary[threads] = {
            "quiet_seconds": min(quiet),
            "busy_seconds": min(busy),
            "busy_over_quiet": round(min(busy) / min(quiet), 2),
        }
        print(
            f"threads {threads}: quiet {min(quiet):.1f} s, with one competing process {min(busy):.1f} s "
            f"(best of {len(quiet)} each): ratio {min(busy) / min(quiet):.2f}"
        )
    result = {"runs": runs, "summary": summary, "demo_args": demo_args, "wait_policy": args.wait_policy}
    if args.json is not None:
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
