"""
Target 7 (needs an accelerator): PosSAM-B/L/H at 1024x1024, bf16 and fp32, batch 1 and 8, eager and compiled
(`torch.compile(fullgraph=True, dynamic=False)` of the whole model forward; post-processing eager) -> images per second
(forward + MASE panoptic post-processing), peak accelerator memory, the first call's time (compilation) and the
forward's FLOPs (FlopCounterMode's count) per second of the whole row. Goals on an H100 (issue 15): B bf16 batch 1 >= 25 FPS eager and
>= 60 FPS compiled; H bf16 batch 8 >= 40 images/s (eager or compiled: each row is judged). Training rows: B/L/H bf16
training steps at batch 2 per GPU (autocast as `--mixed_precision bf16`, AdamW, clipping) -> images/s and peak
memory per GPU, and the GPU-days the paper's schedule (250K iterations x 16 images) would take at that rate. Random
weights (timings do not depend on them).

Rows run in `plan`'s order, goal rows first, within an optional time budget, and each finished row is handed to a
callback (run.py writes the results file after each), because a lent GPU machine gives a session minutes, not hours.

`python benchmarks/run.py --suite gpu` (writes results-gpu.json); `benchmarks/device_session.sh` is the one command
for a lent machine. `--device cpu --variants tiny` exercises the same code on a CPU with the tiny config (used by the
tests; no figures are meaningful there).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from common import summary
from precision import count_flops

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


# inductor's counts: graphs left without CUDA graphs, and partitions of a graph split around what CUDA graphs cannot
# hold (a CPU operation, an unsafe op; graph partition is on by default); the reasons: TORCH_LOGS=cudagraphs
CUDAGRAPH_COUNTERS = ("cudagraph_skips", "cudagraph_partitions")


def _measure(model, processor, pixel_values, class_embeddings, device, repeats: int) -> dict:
    batch = pixel_values.shape[0]
    size = tuple(pixel_values.shape[-2:])

    def step():
        # a new iteration for CUDA graphs (`--compile-mode reduce-overhead`): the last step's outputs, read by its
        # post-processing, may be overwritten (a no-op for other models)
        torch.compiler.cudagraph_mark_step_begin()
        outputs = model(pixel_values, class_embeddings=class_embeddings)
        processor.post_process_panoptic_segmentation(outputs, target_sizes=[size] * batch)

    with torch.inference_mode():
        timing, peak = time_steps(step, device, repeats)
    return {"seconds": timing, "images_per_second": batch / timing["median_s"], "peak_memory_bytes": peak}


def time_steps(step, device: torch.device, repeats: int, warmup_s: float | None = None) -> tuple[dict, int | None]:
    """
    `step()` to warm up, twice and for at least `warmup_s` seconds after the first call (default: 1 s on CUDA, none
    elsewhere), then
    `repeats` timed calls: (`summary` of the times plus `first_call_s`, the first warm-up call, which holds
    compilation and autotuning, `warmup_calls`, and on CUDA `sm_clock_mhz`, the SM clock read just before and just
    after the timed calls; peak CUDA memory or None). The time-based warm-up is for the GPU's clocks: an idle GPU
    runs its SMs at a few hundred MHz and ramps up under load, and the first row of the H200 suite (2026-11-26),
    measured right after the model's construction, ran B bf16 batch 1 at 80 ms per image where other processes
    took 36-42 ms for the forward alone.
    """
    if warmup_s is None:
        warmup_s = 1.0 if device.type == "cuda" else 0.0
    start = time.perf_counter()
    step()
    _synchronize(device)
    first_call = time.perf_counter() - start
    # the clock starts after the first call: a compilation's minutes leave the GPU idle, not warm
    warm_start, warmup_calls = time.perf_counter(), 1
    while warmup_calls < 2 or time.perf_counter() - warm_start < warmup_s:
        step()
        _synchronize(device)
        warmup_calls += 1
    clocks = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        clocks.append(_sm_clock(device))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    timing = {**summary(times), "first_call_s": first_call, "warmup_calls": warmup_calls}
    if device.type == "cuda":
        timing["sm_clock_mhz"] = [*clocks, _sm_clock(device)]  # before, after
    return timing, (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


# the boxes of `PosSAMForPanopticSegmentation`'s forward timed apart by `box_times` (name, module path), in the order
# the forward runs them; a box inside another (the pixel decoder's encoder, the masked-attention decoder) is reported
# too but not counted again in "outside the boxes". The ConvNeXt trunk is its `stem` and `stages`: the CLIP box's own
# `forward` is not what the dense features call (`forward_features`), so hooks on it would not fire.
FORWARD_BOXES: tuple[tuple[str, str], ...] = (
    ("SAM encoder", "model.vision_encoder"),
    ("FPN", "model.fpn"),
    ("pixel decoder", "model.pixel_decoder"),
    ("pixel decoder: deformable encoder", "model.pixel_decoder.encoder"),
    ("transformer module", "model.transformer_module"),
    ("transformer module: masked-attention decoder", "model.transformer_module.decoder"),
    ("IoU head", "model.iou_head"),
    ("ConvNeXt stem", "clip.vision_model.stem"),
    ("ConvNeXt stages", "clip.vision_model.stages"),
    ("LDP", "ldp"),
    ("classifier", "classifier"),
)


def box_times(
    model: torch.nn.Module,
    step: Callable[[], object],
    device: torch.device,
    repeats: int = 3,
    boxes: tuple[tuple[str, str], ...] = FORWARD_BOXES,
) -> dict[str, float]:
    """
    Seconds per `step()` (a forward of `model`) spent in each box, the median of `repeats` steps, from forward hooks
    on the boxes' modules: on CUDA events recorded on the current stream at each box's entry and exit (no host
    synchronization inside a step, so the queue runs as in a timed step; a box's time is device time from its first
    kernel's queue position to its last's), elsewhere the host clock. A box called several times in a step (none of
    PosSAM's today) is summed. Also `"step"`, the whole step, and `"outside the boxes"`, the step less the outermost
    boxes (mask pooling, MASE's inputs, glue). Boxes whose module the model lacks are left out. One untimed step
    runs first; the GPU's clocks are assumed warm already (the callers time other steps just before).
    """
    timed = device.type == "cuda"

    def now():
        if timed:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(start, end) -> float:
        return start.elapsed_time(end) / 1e3 if timed else end - start

    present = [(name, path) for name, path in boxes if _has_submodule(model, path)]
    marks: dict[str, list[list]] = {name: [] for name, _ in present}
    handles = []
    for name, path in present:
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: marks[name].append([now(), None])))
        handles.append(module.register_forward_hook(lambda *_, name=name: marks[name][-1].__setitem__(1, now())))
    outermost = [
        name
        for name, path in present
        if not any(path.startswith(other + ".") for _, other in present if other != path)
    ]
    steps = []
    try:
        step()  # one untimed step first: a box's first call may allocate, autotune or compile
        _synchronize(device)
        for _ in range(repeats):
            for pairs in marks.values():
                pairs.clear()
            start = now()
            step()
            end = now()
            _synchronize(device)
            row = {name: sum(seconds(entry, exit) for entry, exit in pairs) for name, pairs in marks.items()}
            row["step"] = seconds(start, end)
            row["outside the boxes"] = row["step"] - sum(row[name] for name in outermost)
            steps.append(row)
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(statistics.median(row[name] for row in steps)) for name in steps[0]}


def _has_submodule(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _sm_clock(device: torch.device) -> int | str:
    """The SM clock in MHz (`torch.cuda.clock_rate`, through NVML), or why it could not be read."""
    try:
        return torch.cuda.clock_rate(device)
    except Exception as error:  # pynvml missing, or no permission: reported, not fatal
        return f"unavailable: {type(error).__name__}"


@dataclass(frozen=True)
class Case:
    """One row of target 7's matrix: an inference configuration, or a bf16 training step (`training`)."""

    variant: str
    dtype: str
    batch: int
    compiled: bool = False
    training: bool = False
    # SAM's attention through the Triton kernel (`relative_position_attention_triton`, a candidate for CUDA's
    # default), chosen for this row only
    sam_attention_kernel: bool = False


def plan(
    variants: tuple[str, ...],
    dtypes: tuple[str, ...],
    batches: tuple[int, ...],
    compile_models: bool,
    training_batch: int | None = None,
    sam_kernel_rows: bool = False,
) -> list[Case]:
    """
    The matrix in the order it is measured, so that a session whose device time runs out (`run(..., budget_s=...)`)
    has measured what matters most: 0. the eager rows with an issue-15 goal (B bf16 batch 1, H bf16 batch 8), with
    `sam_kernel_rows` each followed by the same row with SAM's attention through the Triton kernel (a candidate: the
    whole model both ways in one run, seconds each, one model build); 1. the
    first variant's compiled goal row (B bf16 batch 1: one compilation, minutes); 2. the other bf16 eager rows;
    3. bf16 training steps at `training_batch` (None: none); 4. fp32 eager; 5. the other bf16 compiled rows; 6. fp32
    compiled. Within a tier: the first variant, then H, then the others as given; then batches as given.
    """
    first = variants[0]
    others = sorted(variants[1:], key=lambda variant: variant != "vit-h")  # H's goal first
    order = {variant: index for index, variant in enumerate([first, *others])}

    def tier(case: Case) -> int:
        if case.training:
            return 3
        has_goal = goal(case.variant, case.dtype, case.batch, case.compiled) is not None
        if not case.compiled:
            return 0 if has_goal else 2 if case.dtype == "bfloat16" else 4
        if has_goal and case.variant == first:
            return 1
        return 5 if case.dtype == "bfloat16" else 6

    cases = [
        Case(variant, dtype, batch, compiled)
        for variant in variants
        for dtype in dtypes
        for compiled in ((False, True) if compile_models else (False,))
        for batch in batches
    ]
    if training_batch is not None:
        cases += [Case(variant, "bfloat16", training_batch, training=True) for variant in variants]
    if sam_kernel_rows:
        cases += [
            Case(case.variant, case.dtype, case.batch, sam_attention_kernel=True) for case in cases if tier(case) == 0
        ]
    batch_order = {batch: index for index, batch in enumerate(batches)}
    # a candidate row right after its default one: one model build per variant
    return sorted(
        cases,
        key=lambda case: (
            tier(case),
            order[case.variant],
            batch_order.get(case.batch, 0),
            case.sam_attention_kernel,
        ),
    )


def _row(case: Case, size: int, compile_mode: str | None = None) -> dict:
    if case.training:
        figure = f"{_name(case.variant)} bfloat16 training, batch {case.batch} at {size}x{size} (autocast, AdamW)"
    else:
        figure = f"{_name(case.variant)} {case.dtype} batch {case.batch} at {size}x{size}, " + (
            ("torch.compile" + (f" mode={compile_mode}" if compile_mode else "")) if case.compiled else "eager"
        )
        if case.sam_attention_kernel:
            figure += ", SAM attention through the Triton kernel (candidate)"
    row = {
        "target": 7,
        "figure": figure,
        "variant": case.variant,
        "dtype": case.dtype,
        "batch": case.batch,
        "compiled": case.compiled,
        "goal": "reported",
        "pass": None,
    }
    if case.training:
        row["training"] = True
    else:
        row["paper_fps_a100"] = PAPER_FPS.get(case.variant)
    if case.sam_attention_kernel:
        row["sam_attention_kernel"] = True
    return row


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of a `size`^3 matmul in `dtype` on `device` (mean of `repeats` after 3 warm-ups), the peak reference."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(device, dtype)
    right = torch.randn(size, size, generator=generator).to(device, dtype)
    for _ in range(3):
        torch.matmul(left, right)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(left, right)
    _synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


class _Models:
    """The model of the variant at hand, its dtype, and its compiled forwards; rebuilt when the variant changes."""

    def __init__(self, device: torch.device, compile_mode: str | None = None):
        self.device = device
        self.compile_mode = compile_mode
        self.variant: str | None = None
        self.model = None
        self.compiled: dict[tuple[str, bool], object] = {}
        self.fullgraph_failed: set[str] = set()  # dtypes whose fullgraph compilation failed: not tried again

    def drop(self) -> None:
        self.model, self.variant = None, None
        self.compiled.clear()
        torch._dynamo.reset()  # compiled graphs hold their own references to weights and buffers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def get(self, variant: str, dtype: torch.dtype):
        from transformers_possam import PosSAMForPanopticSegmentation

        if variant != self.variant:
            self.drop()
            torch.manual_seed(0)
            with torch.device(self.device):
                self.model = PosSAMForPanopticSegmentation(_config(variant)).eval()
            self.variant = variant
        if self.model.dtype != dtype:
            self.compiled.clear()
            torch._dynamo.reset()
            self.model.to(dtype)
        return self.model

    def runner(self, variant: str, dtype: torch.dtype, compiled: bool, fullgraph: bool = True):
        model = self.get(variant, dtype)
        if not compiled:
            return model
        key = (str(dtype), fullgraph)
        if key not in self.compiled:
            # static shapes (one graph per batch size), whole forward as one graph: a graph break is an error;
            # mode "reduce-overhead" adds CUDA graphs (the forward makes no host synchronization)
            self.compiled[key] = torch.compile(model, fullgraph=fullgraph, dynamic=False, mode=self.compile_mode)
        return self.compiled[key]


@contextlib.contextmanager
def _sam_attention_kernel_chosen(chosen: bool) -> Iterator[None]:
    """With `chosen`, SAM's attention through `relative_position_attention_triton` inside the block (as
    gpu_candidates.py does), put back after; otherwise nothing."""
    if not chosen:
        yield
        return
    from transformers_possam.modeling.sam_attention import PosSAMVisionAttention
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    original = PosSAMVisionAttention.__dict__["attention_function"]
    PosSAMVisionAttention.attention_function = staticmethod(lambda device_type: relative_position_attention_triton)
    try:
        yield
    finally:
        PosSAMVisionAttention.attention_function = original


def _inference(models: _Models, case: Case, row: dict, repeats: int, flops_per_image: dict) -> None:
    from transformers_possam import PosSAMImageProcessor

    device, dtype = models.device, getattr(torch, case.dtype)
    model = models.get(case.variant, dtype)
    config = model.config
    size = config.vision_config.image_size
    processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    class_embeddings = torch.nn.functional.normalize(
        torch.randn(150, 1, config.clip_embed_dim, device=device), dim=-1
    ).to(dtype)
    pixel_values = torch.randn(case.batch, 3, size, size, device=device, dtype=dtype)
    key = (case.variant, case.dtype)
    if key not in flops_per_image:  # FlopCounterMode's count of one image's forward (eager)
        with torch.inference_mode():
            flops_per_image[key] = count_flops(lambda: model(pixel_values[:1], class_embeddings=class_embeddings))
    fullgraph = str(dtype) not in models.fullgraph_failed
    inductor_counters = torch._dynamo.utils.counters["inductor"]
    cudagraph_counts_before = {name: inductor_counters[name] for name in CUDAGRAPH_COUNTERS}
    try:
        runner = models.runner(case.variant, dtype, case.compiled, fullgraph=fullgraph)
        with _sam_attention_kernel_chosen(case.sam_attention_kernel):
            row.update(_measure(runner, processor, pixel_values, class_embeddings, device, repeats))
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
        if not case.compiled:
            raise
        # the whole forward did not capture as one graph: recorded, then measured with graph breaks allowed (other
        # failures, e.g. out of memory or a compiler crash, are the row's error: a second compilation would fail too)
        row["fullgraph_error"] = f"{type(error).__name__}: {error}"[:500]
        models.fullgraph_failed.add(str(dtype))
        runner = models.runner(case.variant, dtype, case.compiled, fullgraph=False)
        row.update(_measure(runner, processor, pixel_values, class_embeddings, device, repeats))
    if not fullgraph:
        row["fullgraph_error"] = "fullgraph failed on an earlier row of this dtype: graph breaks allowed"
    if case.compiled and models.compile_mode in ("reduce-overhead", "max-autotune"):
        row.update({name: inductor_counters[name] - cudagraph_counts_before[name] for name in CUDAGRAPH_COUNTERS})
    row["forward_tflop_per_image"] = flops_per_image[key] / 1e12
    # forward FLOPs over the time of forward + MASE + post-processing: a lower bound of the forward's own rate
    row["end_to_end_tflops"] = flops_per_image[key] * row["images_per_second"] / 1e12
    minimum = goal(case.variant, case.dtype, case.batch, case.compiled)
    if minimum is not None and case.sam_attention_kernel:  # not the package's default: compared, not judged
        row["goal"] = f">= {minimum:g} images/s (H100) for the default path; this row is a candidate's"
    elif minimum is not None:
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        if "H100" in device_name:
            row.update(goal=f">= {minimum:g} images/s (H100)", **{"pass": row["images_per_second"] >= minimum})
        else:  # the goals are an H100's: another device's figure is reported, not judged
            row["goal"] = f">= {minimum:g} images/s on an H100 (not judged on {device_name})"


def _training(models: _Models, case: Case, row: dict, repeats: int) -> None:
    from transformers_possam import PosSAMForPanopticSegmentation

    models.drop()  # the inference model's memory back before a training model and its optimizer
    device = models.device
    torch.manual_seed(0)
    with torch.device(device):
        model = PosSAMForPanopticSegmentation(_config(case.variant))
    try:
        step = make_training_step(model, case.batch, device, autocast_dtype=torch.bfloat16)
        timing, peak = time_steps(step, device, repeats)
    finally:
        del model
    images_per_second = case.batch / timing["median_s"]
    row.update(
        seconds=timing,
        images_per_second=images_per_second,
        peak_memory_bytes=peak,
        gpu_days_paper_schedule=gpu_days(images_per_second),
    )


def run(
    device_name: str = "cuda",
    variants: tuple[str, ...] = ("vit-b", "vit-l", "vit-h"),
    repeats: int = 10,
    batches: tuple[int, ...] = (1, 8),
    dtypes: tuple[str, ...] = ("bfloat16", "float32"),
    compile_models: bool = True,
    training_batch: int | None = None,
    budget_s: float | None = None,
    on_row: Callable[[dict], None] | None = None,
    compile_mode: str | None = None,
    compile_reserve_s: float = 150.0,
    sam_kernel_rows: bool | None = None,
) -> list[dict]:
    """
    Target 7's matrix, one row per `Case`, in `plan`'s order (goal rows first): variants x dtypes x batches x
    (eager, compiled; `compile_models=False`: eager only), plus bf16 training steps at `training_batch` per device
    when given. Each inference row: images/s of forward + MASE panoptic post-processing, peak memory, the first
    call's seconds (compilation), FLOPs per image and achieved TFLOP/s. A failure (out of memory for H at batch 8
    in fp32, say) is reported in its row and the other rows stand; a compiled row whose `fullgraph=True` compile
    fails records that error and is measured with graph breaks allowed.

    `budget_s`: once this many seconds have passed, the remaining rows are reported as skipped (a row already
    started runs to its end), and a compiled row is skipped once less than `compile_reserve_s` is left (compiling a
    full-size model takes minutes). `on_row(row)` is called after each row (run.py writes the partial results file), so a
    command stopped at its time limit keeps every finished row. `compile_mode`: `torch.compile`'s mode for the
    compiled rows (None: its default; "reduce-overhead": with CUDA graphs). `sam_kernel_rows`: the eager goal rows
    again with SAM's attention through the Triton kernel (None: where Triton runs on the device).
    """
    device = torch.device(device_name)
    started = time.perf_counter()
    models = _Models(device, compile_mode)
    flops_per_image: dict[tuple[str, str], int] = {}
    rows = []
    if sam_kernel_rows is None:
        from transformers_possam.triton_support import triton_runs_on

        sam_kernel_rows = triton_runs_on(device)
    for case in plan(variants, dtypes, batches, compile_models, training_batch, sam_kernel_rows):
        row = _row(case, _config(case.variant).vision_config.image_size, compile_mode)
        left = None if budget_s is None else budget_s - (time.perf_counter() - started)
        if left is not None and left <= 0:
            row["skipped"] = f"time budget of {budget_s:g} s spent"
        elif left is not None and case.compiled and left < compile_reserve_s:
            row["skipped"] = f"{left:.0f} s of the budget left, under the {compile_reserve_s:g} s a compilation needs"
        else:
            case_start = time.perf_counter()
            try:
                if case.training:
                    _training(models, case, row, max(repeats // 2, 1))
                else:
                    _inference(models, case, row, repeats, flops_per_image)
            except Exception as error:  # reported, never hidden: the other rows stand
                row["error"] = f"{type(error).__name__}: {error}"[:500]
                if "out of memory" in str(error).lower():
                    models.drop()
                gc.collect()  # the failed row's tensors, held by the traceback's frames
            row["wall_seconds"] = time.perf_counter() - case_start
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        if on_row is not None:
            on_row(row)
    models.drop()
    return rows


def gpu_days(images_per_second: float, images: int = PAPER_SCHEDULE_IMAGES) -> float:
    """Device-days to train on `images` images at `images_per_second` per device (the paper's schedule by default)."""
    return images / images_per_second / 86_400
