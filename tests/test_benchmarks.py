"""The benchmark suite's code paths on tiny inputs (figures themselves come from `benchmarks/run.py`)."""

import re

import pytest
import torch

from .conftest import load_script, tiny_model_outputs


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
    assert all("error" not in row for row in rows), [row.get("error") for row in rows]
    assert all(row["images_per_second"] > 0 and row["target"] == 7 for row in rows)
    for row in rows:  # FLOPs of one image's forward (FlopCounterMode), the first call's time
        assert row["forward_tflop_per_image"] > 0 and row["end_to_end_tflops"] > 0
        assert row["seconds"]["first_call_s"] > 0


def test_gpu_suite_measures_the_goal_rows_first():
    """
    A lent GPU machine gives minutes: the matrix runs the eager rows with issue 15's goals first (B bf16 batch 1,
    H bf16 batch 8), then B bf16 compiled at batch 1 (a goal: one compilation), the other bf16 eager rows, training,
    fp32 eager, the other compiled rows (each a compilation of minutes); within a tier B, then H, then L.
    """
    gpu = load_script("benchmarks/gpu.py")
    cases = gpu.plan(("vit-b", "vit-l", "vit-h"), ("bfloat16", "float32"), (1, 8), True, training_batch=2)
    assert len(cases) == 3 * 2 * 2 * 2 + 3 and len(set(cases)) == len(cases)
    keys = [(c.variant[-1], c.dtype[:2], c.batch, "c" if c.compiled else "t" if c.training else "e") for c in cases]
    assert keys[:10] == [
        ("b", "bf", 1, "e"),
        ("h", "bf", 8, "e"),
        ("b", "bf", 1, "c"),
        ("b", "bf", 8, "e"),
        ("h", "bf", 1, "e"),
        ("l", "bf", 1, "e"),
        ("l", "bf", 8, "e"),
        ("b", "bf", 2, "t"),
        ("h", "bf", 2, "t"),
        ("l", "bf", 2, "t"),
    ]
    assert [key[0] for key in keys[10:16]] == ["b", "b", "h", "h", "l", "l"]
    assert all(key[1] == "fl" and key[3] == "e" for key in keys[10:16])
    assert [key[:3] for key in keys[16:21]] == [
        ("b", "bf", 8),
        ("h", "bf", 1),
        ("h", "bf", 8),
        ("l", "bf", 1),
        ("l", "bf", 8),
    ]
    assert all(key[3] == "c" for key in keys[16:21])
    assert all(key[1] == "fl" and key[3] == "c" for key in keys[21:])


def test_gpu_suite_measures_the_goal_rows_again_with_the_sam_kernel_where_asked():
    """With `sam_kernel_rows` (by default where Triton runs on the device), each eager goal row comes again right
    after itself (one model build per variant), before the compiled goal row, with SAM's attention through the
    Triton kernel; those rows name it, and within their block SAM's layers choose the kernel, the default again
    after it (also after an error)."""
    gpu = load_script("benchmarks/gpu.py")
    from transformers_possam.modeling.sam_attention import PosSAMVisionAttention, relative_position_attention
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    cases = gpu.plan(("vit-b", "vit-l", "vit-h"), ("bfloat16", "float32"), (1, 8), True, 2, sam_kernel_rows=True)
    keys = [(c.variant[-1], c.batch, c.compiled, c.sam_attention_kernel) for c in cases[:5]]
    assert keys == [
        ("b", 1, False, False),
        ("b", 1, False, True),
        ("h", 8, False, False),
        ("h", 8, False, True),
        ("b", 1, True, False),
    ]
    assert sum(case.sam_attention_kernel for case in cases) == 2
    assert len(gpu.plan(("vit-b", "vit-h"), ("bfloat16",), (1, 8), True)) == 2 * 2 * 2  # none unless asked
    row = gpu._row(cases[1], 1024)
    assert row["sam_attention_kernel"] and "SAM attention through the Triton kernel" in row["figure"]
    assert "sam_attention_kernel" not in gpu._row(cases[0], 1024)
    with gpu._sam_attention_kernel_chosen(True):
        assert PosSAMVisionAttention.attention_function("cuda") is relative_position_attention_triton
    assert PosSAMVisionAttention.attention_function("cuda") is relative_position_attention
    with pytest.raises(ZeroDivisionError), gpu._sam_attention_kernel_chosen(True):
        1 / 0
    assert PosSAMVisionAttention.attention_function("cuda") is relative_position_attention
    with gpu._sam_attention_kernel_chosen(False):
        assert PosSAMVisionAttention.attention_function("cuda") is relative_position_attention


def test_gpu_suite_hands_each_row_over_and_skips_rows_past_its_budget():
    """`on_row` sees each row as it finishes (run.py writes the results file then). A row started within `budget_s`
    runs to its end; rows not started by then are reported as skipped, not measured and not dropped; a compiled row
    is skipped while less than `compile_reserve_s` is left."""
    gpu = load_script("benchmarks/gpu.py")
    seen = []
    threads = torch.get_num_threads()
    try:
        rows = gpu.run(
            "cpu",
            ("tiny",),
            repeats=1,
            batches=(1, 2),
            dtypes=("float32",),
            compile_models=False,
            budget_s=0.05,
            on_row=seen.append,
        )
        reserved = gpu.run(
            "cpu", ("tiny",), repeats=1, batches=(1,), dtypes=("float32",), budget_s=3600, compile_reserve_s=7200
        )
    finally:
        torch.set_num_threads(threads)
    assert seen == rows and len(rows) == 2
    # the first row starts at once and takes longer than 0.05 s: measured; the second starts after the budget
    assert "skipped" not in rows[0] and rows[0]["images_per_second"] > 0
    assert rows[1]["skipped"].startswith("time budget") and "images_per_second" not in rows[1]
    assert [row["compiled"] for row in reserved] == [False, True]
    assert "images_per_second" in reserved[0] and "compilation needs" in reserved[1]["skipped"]


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


def test_device_check_runs_its_checks_on_cpu_and_writes_each_result(tmp_path):
    """benchmarks/device_check.py (run on a lent GPU machine by device_session.sh), its code on the CPU: every check
    but `compiled` (a minute of inductor here; the compiled path has its own tests). On the CPU the SAM attention runs
    in cache-sized blocks by design, so `sam_attention_all_heads` must fail there (a check that cannot fail would
    prove nothing), and `no_host_sync` says it needs CUDA."""
    import json

    device_check = load_script("benchmarks/device_check.py")
    output = tmp_path / "check.json"
    names = [name for name in device_check.CHECKS if name != "compiled"]
    threads = torch.get_num_threads()
    try:
        status = device_check.main(["--device", "cpu", "--checks", *names, "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    written = json.loads(output.read_text())
    checks = written["checks"]
    assert list(checks) == names and written["triton_kernels_not_built"] == []
    assert status == 1 and not checks["sam_attention_all_heads"]["ok"]
    assert "one scaled_dot_product_attention over all" in checks["sam_attention_all_heads"]["error"]
    assert checks["no_host_sync"] == {
        "ok": True,
        "skipped": "torch.cuda.set_sync_debug_mode needs CUDA",
        "seconds": checks["no_host_sync"]["seconds"],
    }
    assert checks["training_syncs"]["skipped"] == "torch.cuda.set_sync_debug_mode needs CUDA"
    assert checks["sam_attention_triton"]["skipped"] == "Triton cannot run on cpu"  # outside the interpreter
    assert checks["deformable_backward_triton"]["skipped"] == "Triton cannot run on cpu"
    for name in ("versions", "outputs_match_cpu", "sam_attention_fused_kernel", "bf16", "training_step"):
        assert checks[name]["ok"], checks[name].get("traceback")
    assert checks["outputs_match_cpu"]["max_relative_difference"]["masks_queries_logits"] == 0.0  # same device
    assert 0 < checks["bf16"]["mask_logit_relative_error"] < 0.5  # 0.11 on the random tiny model; garbage ~1.4


def test_device_check_marks_a_check_started_before_it_runs(tmp_path, monkeypatch):
    """While a check runs, the results file already holds it as started and not finished (a check the session's
    time limit stops leaves that, not nothing); its result replaces the mark. With `--append` the results already
    in the file stay, and the exit status is that of the checks run now (and of the kernels not built)."""
    import json

    device_check = load_script("benchmarks/device_check.py")
    output = tmp_path / "check.json"
    seen = {}

    def peeking(context):
        seen.update(json.loads(output.read_text())["checks"])
        return {"peeked": True}

    monkeypatch.setitem(device_check.CHECKS, "versions", peeking)
    assert device_check.main(["--device", "cpu", "--checks", "versions", "--output", str(output)]) == 0
    assert seen == {"versions": {"ok": False, "error": "started, not finished (stopped by a time limit?)"}}
    assert json.loads(output.read_text())["checks"]["versions"]["peeked"]
    # a later run's check added to the same file
    monkeypatch.setitem(device_check.CHECKS, "bf16", lambda context: {"later": True})
    assert device_check.main(["--device", "cpu", "--checks", "bf16", "--output", str(output), "--append"]) == 0
    checks = json.loads(output.read_text())["checks"]
    assert list(checks) == ["versions", "bf16"] and checks["bf16"]["later"] and checks["versions"]["peeked"]


def test_device_check_fails_where_a_triton_kernel_gave_way_to_pytorch(tmp_path, monkeypatch):
    """A kernel that could not be built runs its PyTorch path for the rest of the process, so the checks after it
    pass on the fallback: the run itself fails and names the kernel."""
    import json

    from transformers_possam import triton_support

    device_check = load_script("benchmarks/device_check.py")
    monkeypatch.setattr(triton_support, "_unbuildable", {("deformable_attention_triton", "cuda:0", torch.bfloat16)})
    output = tmp_path / "check.json"
    assert device_check.main(["--device", "cpu", "--checks", "versions", "--output", str(output)]) == 1
    written = json.loads(output.read_text())
    assert written["checks"]["versions"]["ok"]
    assert written["triton_kernels_not_built"] == ["('deformable_attention_triton', 'cuda:0', torch.bfloat16)"]


def test_device_check_sees_all_heads_at_once_where_sam_runs_them_so(monkeypatch):
    """Positive control of `sam_attention_all_heads`: with SAM's all-heads form (what CUDA runs) in place of the CPU's
    blocked one, the check passes on the CPU."""
    from transformers_possam.modeling import sam_attention

    device_check = load_script("benchmarks/device_check.py")
    context = device_check.Context(torch.device("cpu"))
    monkeypatch.setattr(
        sam_attention, "relative_position_attention_blocked", sam_attention.relative_position_attention
    )
    details = device_check.check_sam_attention_all_heads(context)
    heads = context.model.config.vision_config.num_attention_heads
    assert len(details["sdpa_query_shapes"]) == details["num_hidden_layers"]
    assert all(shape[1] == heads for shape in details["sdpa_query_shapes"])


def test_cuda_sync_recorder_records_sync_warnings_only_and_allows_marked_blocks(monkeypatch):
    """`CudaSyncRecorder` (what `no_host_sync` and `training_syncs` count with on a GPU), its logic on the CPU: the
    debug mode is "warn" inside it and off in `allowed()` blocks and after it; PyTorch's sync warnings are recorded
    with where they happened, other warnings shown as usual."""
    import warnings

    device_check = load_script("benchmarks/device_check.py")
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest, **kw: shown.append(str(message)))

    def a_synchronizing_call():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    with device_check.CudaSyncRecorder() as recorder:
        a_synchronizing_call()
        warnings.warn("something else", UserWarning)
        with recorder.allowed():
            assert modes[-1] == 0
        a_synchronizing_call()
    assert modes == ["warn", 0, "warn", 0]
    assert len(recorder.syncs) == 2 and "a_synchronizing_call" in recorder.syncs[0]
    assert shown == ["something else"]
    assert warnings.showwarning is not recorder._record  # restored


def test_training_sync_reads_counts_the_matching_reads_and_fails_on_any_other_sync(monkeypatch):
    """`training_syncs`' body on the CPU (the debug mode stubbed: a CPU run reports nothing by itself): the tiny
    model's training forward and loss make one matching read per decoder layer, each of both images' cost matrices;
    a synchronizing call reported anywhere else fails the check (positive control)."""
    import warnings

    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
    from transformers_possam.modeling import loss as loss_module

    device_check = load_script("benchmarks/device_check.py")
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).train()
    batch = device_check.make_training_batch(model, 2, torch.device("cpu"))
    details = device_check.training_sync_reads(model, batch, "cpu")
    queries, segments = model.config.num_queries, batch["mask_labels"][0].shape[0]
    assert details["matching_reads"] == [[2 * queries * segments]] * model.config.decoder_layers
    assert details["reported_syncs"] == []
    assign = loss_module._assign

    def assign_with_a_sync(cost_matrices):
        warnings.warn("called a synchronizing CUDA operation", UserWarning)
        return assign(cost_matrices)

    monkeypatch.setattr(loss_module, "_assign", assign_with_a_sync)
    with pytest.raises(AssertionError, match="no other synchronizing call"):
        device_check.training_sync_reads(model, batch, "cpu")


def _probe_wheel(folder):
    """A minimal wheel holding the module `possam_wheel_probe` (what `pip install --target` needs, nothing more)."""
    import base64
    import hashlib
    import zipfile

    files = {
        "possam_wheel_probe.py": "VALUE = 42\n",
        "possam_wheel_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: possam-wheel-probe\nVersion: 1.0\n",
        "possam_wheel_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append("possam_wheel_probe-1.0.dist-info/RECORD,,")
    folder.mkdir()
    with zipfile.ZipFile(folder / "possam_wheel_probe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr("possam_wheel_probe-1.0.dist-info/RECORD", "\n".join(record) + "\n")


def run_device_session(tmp_path, timeout: int, **settings):
    """benchmarks/device_session.sh run from the repository root, its files in `tmp_path / "out"` (`$OUT`), with
    this interpreter and the CPU unless `settings` say otherwise: the completed process."""
    import os
    import subprocess
    import sys

    from .conftest import REPOSITORY

    environment = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "POSSAM_DEVICE": "cpu",
        **settings,
    }
    return subprocess.run(
        ["bash", "benchmarks/device_session.sh"],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_device_session_script_runs_its_steps_on_cpu(tmp_path):
    """benchmarks/device_session.sh, the one command for a lent GPU machine: on the CPU with the tiny config, it
    installs the carried wheels into its site folder (put first on PYTHONPATH, after this checkout's src/), then
    each step runs from the repository root with this checkout's package and writes its file into $OUT; the time
    budget it computes from its deadline leaves the goal rows measured."""
    import json

    from .conftest import REPOSITORY

    output = tmp_path / "out"
    _probe_wheel(tmp_path / "wheels")
    completed = run_device_session(
        tmp_path,
        300,
        POSSAM_WHEELS=str(tmp_path / "wheels"),
        POSSAM_SITE=str(tmp_path / "site"),
        POSSAM_GPU_VARIANTS="tiny",
        POSSAM_GPU_CHECKS="versions",
        # the later checks, after the suite, added to the same file (this one says it skipped: no Triton on the CPU)
        POSSAM_GPU_LATE_CHECKS="sam_attention_triton",
        POSSAM_GPU_ARGS="--batches 1",
        # the suite's own budget, whatever the checks before it took on a loaded machine: the eager rows; compiled
        # ones, last here (the tiny variant has no goal), need 150 s: skipped
        POSSAM_GPU_BUDGET_S="15",
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert (tmp_path / "site" / "possam_wheel_probe.py").read_text() == "VALUE = 42\n"
    assert {
        "nvidia-smi.txt",
        "device-check.json",
        "device-check.log",
        "candidates.json",
        "candidates.log",
        "results-gpu.json",
        "gpu.log",
    } == {path.name for path in output.iterdir()}
    candidates = json.loads((output / "candidates.json").read_text())
    assert candidates["model"]["batch_1"]["first_image_against_cpu_cell_bound"]["equal"]  # tiny: the first variant
    checks = json.loads((output / "device-check.json").read_text())["checks"]
    assert list(checks) == ["versions", "sam_attention_triton"] and checks["sam_attention_triton"]["skipped"]
    check = checks["versions"]
    assert check["ok"] and check["transformers_possam"] == str(REPOSITORY / "src" / "transformers_possam")
    assert "sam_attention_triton: skipped" in (output / "device-check.log").read_text()
    results = json.loads((output / "results-gpu.json").read_text())
    assert results["suite"] == "gpu" and results["figures"]
    rows = sorted(results["figures"], key=lambda row: "skipped" in row)
    assert "images_per_second" in rows[0] and rows[0]["dtype"] == "bfloat16" and not rows[0]["compiled"]
    assert "skipped" in rows[-1]


def test_gpu_profile_times_and_profiles_a_case_on_cpu(tmp_path):
    """benchmarks/gpu_profile.py (where a GPU row's time goes), its code on the CPU with the tiny config: the forward,
    the post-processing and both are timed, the two profiler tables written per case, and a case that fails while it
    runs (here: out of memory, made so) is reported in its entry while the others stand."""
    import json

    profile = load_script("benchmarks/gpu_profile.py")
    profile_case = profile.profile_case

    def fails_at_batch_2(variant, dtype_name, batch, *arguments):
        if batch == 2:
            raise torch.OutOfMemoryError("made to fail")
        return profile_case(variant, dtype_name, batch, *arguments)

    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(profile, "profile_case", fails_at_batch_2)
            status = profile.main(
                ["--device", "cpu", "--cases", "tiny:float32:1", "tiny:float32:2", "--repeats", "1", "--rows", "5"]
                + ["--output-dir", str(tmp_path)]
            )
    finally:
        torch.set_num_threads(threads)
    assert status == 0  # one case measured
    results = json.loads((tmp_path / "profile.json").read_text())
    assert [result["case"] for result in results] == ["tiny:float32:1", "tiny:float32:2"]
    assert results[1]["error"] == "OutOfMemoryError: made to fail"
    tiny, failed = results
    for part in ("forward", "post_processing", "both"):
        assert tiny[part]["median_s"] > 0
    tables = (tmp_path / "profile-tiny-float32-1.txt").read_text().split("\n\n== ")
    assert [table.split(" ==")[0].strip("= ") for table in tables] == ["device", "host", "shapes", "post_processing"]
    assert all("aten::" in table for table in tables) and "Input Shapes" in tables[2]

    def total_ms(table: str) -> float:
        value, unit = re.fullmatch(
            r"([0-9.]+)(us|ms|s)", table.split("Self CPU time total: ")[1].split("\n")[0]
        ).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    assert total_ms(tables[3]) < total_ms(tables[0]) / 2  # the post-processing alone, no forward in it
    boxes = tiny["boxes_s"]
    assert set(boxes) == {name for name, _ in load_script("benchmarks/gpu.py").FORWARD_BOXES} | {
        "step", "outside the boxes"}  # fmt: skip
    assert all(seconds > 0 for name, seconds in boxes.items() if name != "outside the boxes")
    assert {path.name for path in tmp_path.iterdir()} == {"profile.json", "profile-tiny-float32-1.txt"}
    assert "error" in failed


def test_gpu_candidates_run_on_cpu_and_agree_with_their_references(tmp_path, monkeypatch):
    """benchmarks/gpu_candidates.py (candidate GPU paths side by side), its code on the CPU with tiny shapes: every
    deformable sampler within float rounding of transformers' (the same samples), both pixel counters equal to
    bincount, the dense post-processing (the GPU's path, asked for) run and its segments equal to the cell-bound
    path's on the tiny model's outputs, in chunks of 1 mask (set here: the tiny model's 8 queries fit one chunk of 16)
    and of 64; the module-level names it swaps are restored afterwards."""
    import json

    from transformers_possam import postprocessing
    from transformers_possam.modeling import deformable_attention

    candidates = load_script("benchmarks/gpu_candidates.py")
    monkeypatch.setattr(postprocessing, "RESIZE_CHUNK", 1)
    dense_calls = []
    dense = postprocessing.PosSAMPostProcessingMixin._panoptic_dense

    def counted_dense(self, *args, **kwargs):
        dense_calls.append(postprocessing.RESIZE_CHUNK)
        return dense(self, *args, **kwargs)

    monkeypatch.setattr(postprocessing.PosSAMPostProcessingMixin, "_panoptic_dense", counted_dense)

    def swapped():
        return (
            deformable_attention.PosSAMMultiscaleDeformableAttention.__dict__["sampler"],
            postprocessing._fetch_to_host,
            postprocessing._pixels_per_query,
            postprocessing.RESIZE_CHUNK,
            postprocessing.RESIZE_ELEMENTS,
            postprocessing.PosSAMPostProcessingMixin.__dict__["_pixel_assignment"],
        )

    before = swapped()
    threads = torch.get_num_threads()
    try:
        results = candidates.main(
            ["--device", "cpu", "--variant", "tiny", "--batches", "2", "--repeats", "1"]
            + ["--output", str(tmp_path / "candidates.json")]
        )
    finally:
        torch.set_num_threads(threads)
    assert swapped() == before
    samplers = results["deformable_batch_2"]
    assert set(samplers) == {"transformers_stack", "embedding_bag_one_step", "embedding_bag_accelerator_steps",
                             "embedding_bag_cpu_steps", "grid_sample_by_level",
                             "embedding_bag_bf16_values"}  # fmt: skip
    bf16_values = samplers.pop("embedding_bag_bf16_values")  # no Triton kernel here: it runs where Triton does
    assert all(sampler["max_abs_difference"] < 1e-5 for sampler in samplers.values()), samplers
    assert 1e-4 < bf16_values["relative_difference"] < 1e-2  # bf16 rounding of the values and weights, no more
    assert all(counter["equal_to_bincount"] for counter in results["pixel_counts"].values())
    model = results["model"]["batch_2"]
    assert all("error" not in value for value in model.values()), model
    against_cpu = model["first_image_against_cpu_cell_bound"]
    assert against_cpu["equal"] and against_cpu["pixels_differing"] == 0 and against_cpu["segments"] >= 1
    chunked = model["post_processing_chunks_of_64"]
    assert chunked["pixels_differing"] == 0 and chunked["median_s"] > 0
    assert set(dense_calls) == {1, 64}  # every post-processing went through the dense path, in both chunkings
    assert all(model[f"forward_{name}"]["median_s"] > 0 for name in ("transformers_stack", "grid_sample_by_level"))
    for scope in ("convnext_trunk", "whole_model"):  # the same outputs in either memory format, up to rounding
        assert model[f"forward_channels_last_{scope}"]["max_abs_difference_of_mask_logits"] < 1e-2
    assert model["boxes_of_the_forward"]["SAM encoder"] > 0 and model["boxes_of_the_forward"]["step"] > 0
    # the tiny model has 8 queries: "16" and "all" keep every non-void one, both paths give the same segments
    kept = {name: model[f"post_processing_{name}_kept"] for name in (16, 64, "all")}
    assert kept[16]["threshold"] == kept["all"]["threshold"] == 0.0 and kept[16]["kept_per_image"] <= 8
    assert all(entry["pixels_differing"] == 0 and entry["dense"]["median_s"] > 0 for entry in kept.values())
    assert json.loads((tmp_path / "candidates.json").read_text())["model"] == results["model"]
    # SAM's attention three ways, each against the first (the CUDA path) at the tiny windowed and global shapes
    attention = results["sam_attention_batch_2"]
    assert set(attention) == {"tiny_windowed", "tiny_global"}
    for row in attention.values():
        assert set(row) == {"extended_qk", "extended_qk_value_padded", "bias_as_mask"}
        assert all(variant["max_abs_difference"] < 1e-5 and variant["median_s"] > 0 for variant in row.values()), row


def test_gpu_time_steps_warms_up_by_time_then_times_the_repeats():
    """`gpu.time_steps`: two warm-up calls at least, more until `warmup_s` has passed (for a GPU's clocks; none by
    default off CUDA), then exactly `repeats` timed calls, and the first call's time reported apart."""
    import time

    gpu = load_script("benchmarks/gpu.py")
    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.01)

    timing, peak = gpu.time_steps(step, torch.device("cpu"), repeats=3)
    assert peak is None and timing["warmup_calls"] == 2 and len(calls) == 2 + 3
    assert timing["repeats"] == 3 and timing["first_call_s"] >= 0.01 and timing["median_s"] >= 0.01
    assert "sm_clock_mhz" not in timing
    calls.clear()
    timing, _ = gpu.time_steps(step, torch.device("cpu"), repeats=2, warmup_s=0.1)
    assert timing["warmup_calls"] >= 3 and len(calls) == timing["warmup_calls"] + 2
    # the warm-up time counts from the end of the first call: a slow first call (a compilation) is not a warm-up
    assert calls[timing["warmup_calls"]] - calls[1] >= 0.099
    calls.clear()
    slow_first = iter([0.15])

    def slow_first_step():
        calls.append(time.perf_counter())
        time.sleep(next(slow_first, 0.01))

    timing, _ = gpu.time_steps(slow_first_step, torch.device("cpu"), repeats=1, warmup_s=0.1)
    assert timing["first_call_s"] >= 0.15 and timing["warmup_calls"] >= 3


def test_gpu_box_times_attributes_a_step_to_its_boxes():
    """`gpu.box_times`: each box's time is its module's own calls (summed when called twice), a box inside another
    is reported but not subtracted twice from the step for "outside the boxes", a box the model lacks is left out,
    and the hooks are removed afterwards. Sleeps of known length stand in for the work (host clock off CUDA)."""
    import time

    gpu = load_script("benchmarks/gpu.py")

    class Sleep(torch.nn.Module):
        def __init__(self, seconds, inner=None):
            super().__init__()
            self.seconds, self.inner = seconds, inner

        def forward(self):
            time.sleep(self.seconds)
            if self.inner is not None:
                self.inner()

    model = torch.nn.Module()
    model.outer = Sleep(0.02, inner=Sleep(0.03))
    model.twice = Sleep(0.01)

    def step():
        model.outer()
        model.twice()
        model.twice()
        time.sleep(0.04)  # outside every box

    boxes = (("outer", "outer"), ("inner", "outer.inner"), ("twice", "twice"), ("absent", "no.such.module"))
    times = gpu.box_times(model, step, torch.device("cpu"), repeats=1, boxes=boxes)
    assert set(times) == {"outer", "inner", "twice", "step", "outside the boxes"}
    # lower bounds only (a busy machine oversleeps); the attribution itself is exact arithmetic
    assert times["inner"] >= 0.03 and times["outer"] >= times["inner"] + 0.02 and times["twice"] >= 0.02
    assert times["outside the boxes"] == pytest.approx(times["step"] - times["outer"] - times["twice"])
    assert times["outside the boxes"] >= 0.04 and times["step"] >= 0.11
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


@pytest.mark.parametrize("scope", ["convnext_trunk", "whole_model"])
def test_gpu_candidates_channels_last_forward_puts_the_model_back(scope):
    """`gpu_candidates.channels_last_forward`: while timed, the scope's convolution weights are channels-last (the
    candidate is what it says); afterwards every 4-d weight is back in the default layout, no hook is left, and the
    model's outputs are bitwise what they were before."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

    candidates = load_script("benchmarks/gpu_candidates.py")
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size)
    class_embeddings = torch.nn.functional.normalize(torch.randn(4, 1, model.config.clip_embed_dim), dim=-1)

    def hooks(model):  # the model's own hooks (transformers registers some) by module
        return {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}

    hooks_before = hooks(model)
    layouts_seen = []
    stem_conv = model.clip.vision_model.stem[0]
    probe = stem_conv.register_forward_pre_hook(
        lambda module, arguments: layouts_seen.append(
            (module.weight.is_contiguous(memory_format=torch.channels_last), arguments[0].is_contiguous())
        )
    )
    # SAM's patch convolution follows the scope; its (1, 64, 64, C) position embedding, not a map, never changes
    sam = model.model.vision_encoder
    sam_layouts = []
    sam_probe = sam.register_forward_pre_hook(
        lambda module, _: sam_layouts.append(
            (
                module.patch_embed.projection.weight.is_contiguous(memory_format=torch.channels_last),
                module.pos_embed.is_contiguous(),
            )
        )
    )
    with torch.inference_mode():
        before = model(pixel_values, class_embeddings=class_embeddings).masks_queries_logits
        layouts_seen.clear()
        sam_layouts.clear()
        timing = candidates.channels_last_forward(
            model, scope, pixel_values, class_embeddings, before, torch.device("cpu"), repeats=1
        )
        probe.remove()
        sam_probe.remove()
        after = model(pixel_values, class_embeddings=class_embeddings).masks_queries_logits
    # channels-last weights and a channels-last (so not default-contiguous) input in every timed call
    assert layouts_seen and all(weight_cl and not input_contiguous for weight_cl, input_contiguous in layouts_seen)
    assert set(sam_layouts) == {(scope == "whole_model", True)}
    assert timing["median_s"] > 0 and timing["max_abs_difference_of_mask_logits"] < 1e-4
    assert all(parameter.is_contiguous() for parameter in model.parameters())
    assert not any(parameter.is_inference() for parameter in model.parameters())  # the originals, not copies
    assert hooks(model) == hooks_before
    assert torch.equal(before, after)


def test_gpu_candidates_channels_last_forward_puts_the_model_back_after_a_failure(monkeypatch):
    """A failure while the candidate is set up (here: registering its stem hook) leaves the model as it was: every
    convolution's original weight tensor back, no hook left."""
    from transformers_possam import PosSAMForPanopticSegmentation, tiny_config

    candidates = load_script("benchmarks/gpu_candidates.py")
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    size = model.config.vision_config.image_size
    # each weight's memory and layout: the originals back means the same storage with the same strides
    weights = {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()}
    stem = model.clip.vision_model.stem

    converted_when_it_failed = []

    def failing(*arguments, **keywords):
        converted_when_it_failed.append(stem[0].weight.is_contiguous(memory_format=torch.channels_last))
        raise RuntimeError("no hook today")

    monkeypatch.setattr(stem, "register_forward_pre_hook", failing)
    with pytest.raises(RuntimeError, match="no hook today"), torch.inference_mode():
        candidates.channels_last_forward(
            model, "whole_model", torch.randn(1, 3, size, size), None, None, torch.device("cpu"), repeats=1
        )
    assert converted_when_it_failed == [True]  # the weights had been converted: the restoring was exercised
    assert {name: (p.data_ptr(), p.stride()) for name, p in model.named_parameters()} == weights


def test_gpu_profile_device_busy_counts_each_kernel_once_as_torch_tables_do():
    """`gpu_profile.device_busy_us` against torch's own table total ("Self CUDA time total") on a kineto-style event
    list made by hand (an operator on the host whose kernel is also an event of its own, as a CUDA profile has
    them): 3 kernels of 30 us are 90 us, where summing every event's self device time gives 180 (the H200 profile's
    doubled "device busy")."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    profile = load_script("benchmarks/gpu_profile.py")
    events = []
    for step in range(3):
        start = 100 * step
        operator = FunctionEvent(
            id=2 * step, name="aten::mul", thread=0, start_us=start, end_us=start + 50, use_device="cuda", stack=[]
        )
        kernel = FunctionEvent(
            id=2 * step + 1,
            name="mul_kernel",
            thread=0,
            start_us=start + 10,
            end_us=start + 40,
            use_device="cuda",
            device_type=DeviceType.CUDA,
            stack=[],
        )
        operator.append_kernel("mul_kernel", 0, 30)
        events += [operator, kernel]
    event_list = EventList(events, use_device="cuda")
    event_list._build_tree()
    averages = event_list.key_averages()
    table_total = re.search(r"Self CUDA time total: ([0-9.]+)us", averages.table()).group(1)
    assert profile.device_busy_us(averages) == float(table_total) == 90
    assert sum(event.self_device_time_total for event in averages) == 180  # the double count this replaces


def test_gpu_candidates_post_processing_by_kept_queries_keeps_that_many():
    """`gpu_candidates.post_processing_by_kept_queries` with fewer queries kept than the model has: the threshold it
    derives keeps exactly that many per image (batch 1: the median is the image's own midpoint), the dense and the
    cell-bound paths agree on the segmentation, and no more segments come out than queries were kept."""
    candidates = load_script("benchmarks/gpu_candidates.py")
    processor, outputs, size = tiny_model_outputs(batch=1)
    with torch.inference_mode():
        result = candidates.post_processing_by_kept_queries(
            processor, outputs, [(size, size)], 3, torch.device("cpu"), repeats=1
        )
    assert result["kept_per_image"] == 3 and result["threshold"] > 0
    assert result["pixels_differing"] == 0 and 1 <= result["segments"] <= 3
    assert result["dense"]["median_s"] > 0 and result["cell_bound"]["median_s"] > 0
    # 6 of the 8 queries void: the 3rd best is a void query's -1, the midpoint below 0; the threshold stays at 0
    # (a valid threshold) and keeps the 2 non-void queries
    logits = outputs.class_queries_logits.clone()
    logits[:, 2:, -1] = 100.0
    mostly_void = type(outputs)(**{**outputs, "class_queries_logits": logits})
    with torch.inference_mode():
        result = candidates.post_processing_by_kept_queries(
            processor, mostly_void, [(size, size)], 3, torch.device("cpu"), repeats=1
        )
    assert result["threshold"] == 0.0 and result["kept_per_image"] == 2


def test_traffic_counter_counts_the_bytes_each_operator_moves():
    """benchmarks/traffic.py's counter on operators whose traffic is known by hand: an out-of-place add reads two
    tensors and writes one, an in-place product reads and writes its tensor, a copy into a new layout reads and
    writes, as does a reshape that cannot be a view; dropout in eval mode and `contiguous` of a contiguous tensor
    return their input and move nothing; views move nothing."""
    traffic = load_script("benchmarks/traffic.py")
    a, b = torch.randn(1000), torch.randn(1000)
    matrix = torch.randn(30, 40)
    counter = traffic.TrafficCounter(package_roots=("test_benchmarks",))
    with torch.inference_mode(), counter:
        torch.add(a, b)  # 3 x 4000 bytes
        a.mul_(2)  # 2 x 4000
        matrix.t().contiguous()  # 2 x 4800
        torch.nn.functional.dropout(a, p=0.5, training=False)  # nothing
        a.contiguous()  # nothing
        a.view(10, 100).permute(1, 0)  # nothing
        a[10:20].unsqueeze(0)  # nothing: views at an offset into the storage
        a.to(torch.bfloat16)  # 4000 + 2000
        matrix.t().reshape(-1)  # a reshape that cannot be a view: a copy, 2 x 4800
    moved = {name: rows[0] for (name, _), rows in counter.rows.items()}
    assert moved.pop("add") == 12000 and moved.pop("mul_") == 8000 and moved.pop("to") == 6000
    assert moved.pop("contiguous") == 9600 and moved.pop("reshape") == 9600 and not moved, moved


def test_traffic_of_the_tiny_model_with_the_sam_attention_kernel():
    """`forward_traffic(..., sam_attention_kernel=True)`: SAM's attention counted as its Triton kernel, one operator
    per SAM layer, without the SDPA form's bias einsums, concatenations and attention call, nor the copy of its
    output into the output projection's layout; fewer calls and bytes than the default CUDA path; the layer's choice
    put back afterwards; refused on the CPU's path."""
    from transformers_possam import tiny_config
    from transformers_possam.modeling import sam_attention

    traffic = load_script("benchmarks/traffic.py")
    choice = sam_attention.PosSAMVisionAttention.__dict__["attention_function"]
    threads = torch.get_num_threads()
    try:
        default, kernel = (
            traffic.summarize(traffic.forward_traffic("tiny", "float32", "cuda", sam_attention_kernel=flag), rows=500)
            for flag in (False, True)
        )
        with pytest.raises(ValueError, match="CUDA candidate"):
            traffic.forward_traffic("tiny", "float32", "cpu", sam_attention_kernel=True)
    finally:
        torch.set_num_threads(threads)
    assert sam_attention.PosSAMVisionAttention.__dict__["attention_function"] is choice
    kernel_rows = [row for row in kernel["most_called"] if row["operator"] == traffic.FUSED_SAM_ATTENTION]
    assert sum(row["calls"] for row in kernel_rows) == tiny_config().vision_config.num_hidden_layers
    sources = " ".join(row["source"] for row in kernel["most_called"])
    assert "relative_position_query_and_key" not in sources and "_decomposed_bias_factors" not in sources
    assert "relative_position_query_and_key" in " ".join(row["source"] for row in default["most_called"])
    assert kernel["calls"] < default["calls"] and kernel["memory_bound_gb"] < default["memory_bound_gb"]
    # counted beside SDPA, as an attention, not among the memory-bound operators
    assert traffic.FUSED_SAM_ATTENTION in traffic.COMPUTE_BOUND
    assert traffic.FUSED_SAM_ATTENTION not in {row["operator"] for row in kernel["largest"]}


def test_traffic_of_the_tiny_model_on_both_code_paths():
    """`traffic.forward_traffic` on the tiny config: the CUDA code path samples with the fused kernel (one operator
    per layer, its stand-in's result computed by transformers' grid_sample version outside the count), the CPU's
    with embedding_bag, each attributed to its source line; the package's choices are put back afterwards; the most
    called rows come with the number of calls."""
    from transformers_possam import tiny_config
    from transformers_possam.modeling import deformable_attention, mlp, sam_attention

    traffic = load_script("benchmarks/traffic.py")
    choices = (
        deformable_attention.PosSAMMultiscaleDeformableAttention.__dict__["sampler"],
        sam_attention.relative_position_attention_blocked,
        mlp.runs_in_row_blocks,
    )
    threads = torch.get_num_threads()
    try:
        summaries = {
            path: traffic.summarize(traffic.forward_traffic("tiny", "float32", path), rows=500)
            for path in ("cuda", "cpu")
        }
    finally:
        torch.set_num_threads(threads)
    assert choices == (
        deformable_attention.PosSAMMultiscaleDeformableAttention.__dict__["sampler"],
        sam_attention.relative_position_attention_blocked,
        mlp.runs_in_row_blocks,
    )
    operators = {path: set(summary["by_operator_gb"]) for path, summary in summaries.items()}
    fused = traffic.FUSED_SAMPLER
    assert fused in operators["cuda"] and not {"grid_sampler", "embedding_bag"} & operators["cuda"]
    assert "embedding_bag" in operators["cpu"] and not {"grid_sampler", fused} & operators["cpu"]
    layers = tiny_config().encoder_layers
    fused_rows = [row for row in summaries["cuda"]["most_called"] if row["operator"] == fused]
    assert sum(row["calls"] for row in fused_rows) == layers, fused_rows  # one kernel per layer
    # ... from the projections: the softmax and the sampling locations are inside it on CUDA, not on the CPU
    for path, present in (("cuda", False), ("cpu", True)):
        sources = [row["source"] for row in summaries[path]["most_called"]]
        for step in ("softmax_over_a_short_last_dimension", "sampling_locations"):
            assert any(step in source for source in sources) is present, (path, step)
    calls = [row["calls"] for row in summaries["cuda"]["most_called"]]
    # rows=500 lists every row of the tiny forward: their calls add up to the total
    assert calls == sorted(calls, reverse=True) and summaries["cuda"]["calls"] == sum(calls) > 0
    for summary in summaries.values():
        assert 0 < summary["memory_bound_gb"] < summary["total_gb"] and "dropout" not in summary["by_operator_gb"]
        assert any("deformable_attention.py" in row["source"] for row in summary["largest"])


# careless values for the benchmark scripts' flags (a sweep found each as an unrelated traceback deep inside a
# library, a silently empty result written over a committed file, or an error after the whole run): each is now a
# usage error (exit status 2) naming the flag, before anything is built or measured; `{tmp}` is a fresh folder
CARELESS_FLAGS = [
    # (script, arguments, what the usage error says)
    ("traffic", ["--variant", "B"], "argument --variant: invalid choice: 'B'"),  # was a Hub lookup of possam-B
    ("traffic", ["--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),  # was AttributeError from torch
    ("traffic", ["--batch", "0"], "argument --batch: 0 is not a positive integer"),
    ("traffic", ["--rows", "-3"], "argument --rows: -3 is not a positive integer"),  # printed all but 3 rows
    ("traffic", ["--sam-attention-kernel", "--path", "cpu"], "--sam-attention-kernel is a CUDA candidate"),
    ("traffic", ["--output", "{tmp}/missing/out.json"], "argument --output: the folder of"),  # after the run
    ("gpu_candidates", ["--device", "cpu", "--variant", "possam-vit-b"], "argument --variant: invalid choice"),
    ("gpu_candidates", ["--device", "cpu", "--batches"], "argument --batches: expected at least one argument"),
    ("gpu_candidates", ["--device", "cpu", "--batches", "0"], "argument --batches: 0 is not a positive integer"),
    ("gpu_candidates", ["--device", "cpu", "--repeats", "0"], "argument --repeats: 0 is not a positive"),
    ("gpu_candidates", ["--device", "CUDA"], "argument --device: 'CUDA' is not a device"),
    ("gpu_candidates", ["--device", "cpu", "--output", "{tmp}"], "argument --output: {tmp} is a folder"),
    ("run", ["--suite", "gpu", "--device", "cpu", "--variants", "vit-b", "H"], "argument --variants: invalid choice"),
    ("run", ["--suite", "gpu", "--device", "cpu", "--variants"], "argument --variants: expected at least one"),
    ("run", ["--suite", "gpu", "--device", "cpu", "--batches", "0", "-1"], "argument --batches: 0 is not a positive"),
    ("run", ["--suite", "gpu", "--device", "cpu", "--time-budget-s", "0"], "0 is not a number of seconds above 0"),
    ("run", ["--suite", "gpu", "--device", "cpu", "--time-budget-s", "nan"], "nan is not a number of seconds"),
    ("run", ["--suite", "gpu", "--device", "cpu", "--targets", "1"], "--targets: for --suite cpu, not --suite gpu"),
    # the CPU suite silently ran nothing, or everything (hours), and wrote over benchmarks/results-cpu.json
    ("run", ["--targets", "7"], "argument --targets: invalid choice: 7"),
    ("run", ["--targets"], "argument --targets: expected at least one argument"),
    ("run", ["--device", "cpu", "--variants", "tiny"], "--device --variants: for --suite gpu, not --suite cpu"),
    ("run", ["--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("run", ["--amg-points", "0"], "argument --amg-points: 0 is not a positive integer"),
    ("run", ["--output", "{tmp}"], "argument --output: {tmp} is a folder"),
    ("gpu_profile", ["--device", "cpu", "--cases", "B:bfloat16:1"], "variant 'B' is not one of tiny, vit-b"),
    ("gpu_profile", ["--device", "cpu", "--cases", "tiny:bf16:1"], "dtype 'bf16' is not one of bfloat16"),
    ("gpu_profile", ["--device", "cpu", "--cases", "tiny:float32:0"], "0 is not a positive integer"),
    ("gpu_profile", ["--device", "cpu", "--cases", "vit-b"], "'vit-b' is not variant:dtype:batch"),
    ("gpu_profile", ["--device", "cpu", "--cases"], "argument --cases: expected at least one argument"),
    ("gpu_profile", ["--device", "cpu", "--repeats", "0"], "argument --repeats: 0 is not a positive integer"),
    ("device_check", ["--device", "cpu", "--checks"], "argument --checks: expected at least one argument"),
    ("device_check", ["--device", "cpu", "--append", "--output", "{tmp}/gpu.json"], "not this script's results"),
    ("device_check", ["--device", "cpu", "--append", "--output", "{tmp}/cut.json"], "not a JSON file"),
    ("demo_load", ["--rounds", "0"], "argument --rounds: 0 is not a positive integer"),
    ("demo_load", ["--threads", "0"], "argument --threads: 0 is not a positive integer"),
]


@pytest.mark.parametrize("script, arguments, expected", CARELESS_FLAGS)
def test_benchmark_scripts_refuse_careless_flags(script, arguments, expected, tmp_path, capsys):
    (tmp_path / "gpu.json").write_text('{"figures": []}')  # another script's results
    (tmp_path / "cut.json").write_text('{"checks": {"versions": {')  # a file cut short
    module = load_script(f"benchmarks/{script}.py")
    with pytest.raises(SystemExit) as exit_:
        module.main([argument.replace("{tmp}", str(tmp_path)) for argument in arguments])
    assert exit_.value.code == 2
    assert expected.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cut.json", "gpu.json"]  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_benchmark_scripts_refuse_cuda_where_there_is_none(capsys):
    """The GPU scripts' default device is CUDA: without it, a usage error that says what to pass (was torch's
    'Found no NVIDIA driver' traceback, or an error row and exit status 0)."""
    for script in ("gpu_candidates", "gpu_profile", "device_check"):
        with pytest.raises(SystemExit):
            load_script(f"benchmarks/{script}.py").main([])
        assert "argument --device: cuda: CUDA is not available here; use --device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_script("benchmarks/run.py").main(["--suite", "gpu", "--variants", "tiny"])
    assert "--device: cuda: CUDA is not available here" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, expected",
    [
        (["benchmarks/training.py", "--full-size-step", "--steps", "0"], "argument --steps: 0 is not a positive"),
        (["benchmarks/memory.py"], "one of the arguments --inference --train-step is required"),  # was a TypeError
        (["benchmarks/onnx_cpu.py", "--threads", "0"], "argument --threads: 0 is not a positive integer"),
    ],
)
def test_benchmark_scripts_without_a_main_refuse_careless_flags(command, expected):
    """The scripts that parse their flags only when run (`python benchmarks/x.py`)."""
    import subprocess
    import sys

    from .conftest import REPOSITORY

    result = subprocess.run([sys.executable, *command], cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"POSSAM_GPU_VARIANTS": "B"}, "POSSAM_GPU_VARIANTS: B is not one of tiny vit-b vit-l vit-h"),
        ({"POSSAM_GPU_VARIANTS": " "}, "POSSAM_GPU_VARIANTS is empty"),
        ({"POSSAM_GPU_VARIANTS": "\t\n"}, "POSSAM_GPU_VARIANTS is empty"),  # blanks other than spaces
        ({"POSSAM_GPU_VARIANTS": "vit-b *"}, "POSSAM_GPU_VARIANTS: * is not one of"),  # (not the file names)
        ({"POSSAM_DEADLINE_S": "8m"}, "POSSAM_DEADLINE_S=8m: give whole seconds"),
        ({"POSSAM_DEADLINE_S": "0480"}, "POSSAM_DEADLINE_S=0480: give whole seconds"),  # bash: octal, an error
        ({"POSSAM_GPU_BUDGET_S": "480.5"}, "POSSAM_GPU_BUDGET_S=480.5: give whole seconds"),
        ({"POSSAM_GPU_BUDGET_S": "0"}, "POSSAM_GPU_BUDGET_S=0: give whole seconds, at least 1"),
        ({"POSSAM_CANDIDATES": "no"}, "POSSAM_CANDIDATES=no: 1 runs the candidates, 0 skips them"),
    ],
)
def test_device_session_refuses_careless_settings_before_any_step(setting, expected, tmp_path):
    """device_session.sh's settings are checked before any step: a variant the suite would refuse, or a number bash
    cannot count with, used to surface only after the device checks had spent their share of the lent machine's
    minutes, and the session then went on without its suite and exited 0."""
    result = run_device_session(tmp_path, 60, PYTHON="false", **setting)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # no step ran


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"POSSAM_GPU_ARGS": "--compile-mode reduce_overhead"}, "argument --compile-mode: invalid choice"),
        ({"POSSAM_GPU_LATE_CHECKS": "compile"}, "argument --checks: invalid choice: 'compile'"),
    ],
)
def test_device_session_checks_the_scripts_flags_before_any_step(setting, expected, tmp_path):
    """Settings that change the scripts' flags are checked by the scripts' own parsers (`--check-flags`) before
    any step: a typo in POSSAM_GPU_ARGS used to lose the suite, one in the later checks the compiled check."""
    result = run_device_session(
        tmp_path, 120, POSSAM_WHEELS=str(tmp_path / "no-wheels"), POSSAM_GPU_VARIANTS="tiny", **setting
    )
    assert result.returncode == 2 and expected in result.stderr, result.stderr[-3000:]
    assert "are refused, above" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []  # no step ran
