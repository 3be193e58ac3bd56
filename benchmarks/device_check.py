#!/usr/bin/env python
"""
Checks of PosSAM's accelerator code paths on a lent GPU machine (the tiny config: seconds each; `compiled` about a
minute), run by `benchmarks/device_session.sh` before the GPU suite. Each check's result (ok, details, or the error
with its traceback) is written to `--output` as soon as it ends, so a stopped run keeps what it found.

- `versions`: torch, transformers, the device, and where `transformers_possam` was imported from;
- `outputs_match_cpu`: fp32 outputs on the device (TF32 off) against the same weights on the CPU, within 1e-4;
- `sam_attention_all_heads`: every SAM attention call on the device is one `scaled_dot_product_attention` over all
  heads (issue 15 item 4: not head by head);
- `sam_attention_fused_kernel`: SAM-B/L/H attention shapes at 1024 in bf16 run with SDPA limited to its fused
  kernels (flash, memory-efficient, cuDNN): an unfused math fallback is an error;
- `sam_attention_triton`: SAM's attention through the Triton kernel (a candidate for CUDA's default) at SAM-B's and
  SAM-H's shapes at 1024 for 8 images in bf16: within twice the default path's error, and both timed;
- `deformable_backward_triton`: the deformable sampler's backward kernel (a candidate for training on CUDA) at the
  pixel decoder's shapes at 1024: gradients against transformers' sampler, forward + backward of both timed;
- `bf16`: a bf16 copy of the model runs on the device; finite outputs, its mask-logit relative error against fp32;
- `no_host_sync`: forward, MASE and the panoptic post-processing under `torch.cuda.set_sync_debug_mode("warn")`,
  every reported synchronizing call recorded with where it happened, the dense path's one device-to-host transfer
  (`postprocessing._fetch_to_host`) allowed and counted; and a forward queued behind a GPU sleep must not wait;
- `training_step`: two bf16-autocast training steps (AdamW, clipping): finite losses, the trainable parameters
  finite and moved, the frozen ones unchanged;
- `training_syncs`: the bf16-autocast training forward and loss under the same debug mode: the Hungarian
  matching's host reads (`loss._read_on_host`, one per matched layer) are the only synchronizations;
- `compiled` (last): `torch.compile(fullgraph=True)` of the forward on the device against eager (TF32 off), relative
  error below 1e-3; on CUDA with CUDA graphs (`mode="reduce-overhead"`), the replayed graph's outputs.

On a CPU (`--device cpu`) the same code runs (the tests do that); `no_host_sync` and `training_syncs` need CUDA and
say they skipped.
Exit status 0 when every check run is ok (or skipped), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from common import device_name, output_file
from gpu import time_steps
from torch.overrides import TorchFunctionMode

from training import make_training_batch, make_training_step


OUTPUT_NAMES = ("class_queries_logits", "masks_queries_logits", "clip_class_logits", "iou_scores")


class Context:
    """The tiny model on the CPU and a copy on the device, and inputs with a precomputed vocabulary (7 classes, up to
    2 synonyms each)."""

    def __init__(self, device: torch.device):
        from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, tiny_config

        self.device = device
        torch.manual_seed(0)
        self.cpu_model = PosSAMForPanopticSegmentation(tiny_config()).eval()
        self.model = copy.deepcopy(self.cpu_model).to(device)
        size = self.cpu_model.config.vision_config.image_size
        self.size = size
        self.processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
        generator = torch.Generator().manual_seed(1)
        synonym_mask = torch.rand(7, 2, generator=generator) > 0.5
        synonym_mask[:, 0] = True
        self.cpu_inputs = {
            "pixel_values": torch.randn(2, 3, size, size, generator=generator),
            "class_embeddings": torch.nn.functional.normalize(
                torch.randn(7, 2, self.cpu_model.config.clip_embed_dim, generator=generator), dim=-1
            ),
            "synonym_mask": synonym_mask,
        }
        self.inputs = {name: value.to(device) for name, value in self.cpu_inputs.items()}

    def outputs(self, model, inputs) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            outputs = model(**inputs)
        return {name: getattr(outputs, name).float().cpu() for name in OUTPUT_NAMES}


def _max_relative_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    return ((found - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def check_versions(context: Context) -> dict:
    import transformers

    import transformers_possam

    details = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_possam": str(Path(transformers_possam.__file__).parent),
        "device": str(context.device),
    }
    if context.device.type == "cuda":
        details["name"] = torch.cuda.get_device_name(context.device)
        details["capability"] = list(torch.cuda.get_device_capability(context.device))
        details["cuda"] = torch.version.cuda
    return details


def check_outputs_match_cpu(context: Context) -> dict:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 against fp32
    try:
        found = context.outputs(context.model, context.inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    expected = context.outputs(context.cpu_model, context.cpu_inputs)
    differences = {name: _max_relative_difference(found[name], expected[name]) for name in OUTPUT_NAMES}
    for name in OUTPUT_NAMES:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-4, msg=name)
    return {"max_relative_difference": differences}


def check_sam_attention_all_heads(context: Context) -> dict:
    encoder = context.model.model.vision_encoder
    vision_config = context.model.config.vision_config
    shapes: list[tuple[int, ...]] = []

    class RecordAttention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    pixel_values = context.inputs["pixel_values"]
    with torch.no_grad(), RecordAttention():
        encoder(pixel_values)
    heads = vision_config.num_attention_heads
    details = {
        "sdpa_query_shapes": [list(shape) for shape in shapes],
        "num_hidden_layers": vision_config.num_hidden_layers,
    }
    if len(shapes) != vision_config.num_hidden_layers or any(shape[1] != heads for shape in shapes):
        raise AssertionError(
            f"expected one scaled_dot_product_attention over all {heads} heads per SAM layer "
            f"({vision_config.num_hidden_layers} layers), saw query shapes {shapes}"
        )
    return details


def check_sam_attention_fused_kernel(context: Context) -> dict:
    """
    SAM-B/L (head size 64) and SAM-H (80) attention shapes at 1024x1024 (14 x 14 windows, 64 x 64 global grid) in
    bf16 through the all-heads form, with SDPA limited to its fused CUDA kernels (no unfused math fallback): an
    error means a full-size layer would run unfused. On a CPU the same calls run without the limit.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from transformers_possam.modeling.sam_attention import relative_position_attention

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    backends = fused if context.device.type == "cuda" else [*fused, SDPBackend.MATH]
    shapes = {}
    for head_dim, heads in ((64, 12), (80, 16)):
        for sequences, size in ((25, (14, 14)), (1, (64, 64))):
            tokens = size[0] * size[1]
            query, key, value = (
                torch.randn(sequences, heads, tokens, head_dim, device=context.device, dtype=torch.bfloat16)
                for _ in "qkv"
            )
            tables = [torch.randn(n, n, head_dim, device=context.device, dtype=torch.bfloat16) for n in size]
            with torch.no_grad(), sdpa_kernel(backends):
                output = relative_position_attention(query, key, value, *tables, size)
            if not torch.isfinite(output).all():
                raise AssertionError(f"non-finite attention for head size {head_dim}, grid {size}")
            shapes[f"head {head_dim}, grid {size[0]}x{size[1]}"] = list(output.shape)
    return {"backends": [backend.name for backend in backends], "shapes": shapes}


def _median_call_ms(call: Callable[[], object], device: torch.device, repeats: int = 10) -> float:
    """The median of `repeats` timed calls of `call()` in milliseconds (`gpu.time_steps`, with the GPU suite's
    candidates' quarter second of warm-up on CUDA: a kernel's first launch compiles it)."""
    timing, _ = time_steps(call, device, repeats, warmup_s=0.25 if device.type == "cuda" else 0.0)
    return timing["median_s"] * 1e3


def check_sam_attention_triton(context: Context) -> dict:
    """
    SAM's attention through the Triton kernel (`relative_position_attention_triton`, a candidate for CUDA's
    default), at SAM-B's (12 heads of 64) and SAM-H's (16 of 80) shapes at 1024x1024 for 8 images in bf16 (200
    windows of 14 x 14, or one 64 x 64 grid per image), with the layer's relative-position rows (`get_rel_pos` of
    random tables): within twice the default path's (`relative_position_attention`, SDPA with the bias as extra
    channels) bf16 error of the float32 result, and both timed (median ms per call; the kernel also with 128 queries
    per program instead of 64), the kernel's figures early in a session whose candidates step may not be reached;
    then, at the first shape, the op inside a compiled function (on CUDA inductor with CUDA graphs) giving the eager
    kernel's output exactly. A failure there, or a form of the kernel that could not be built here (its figures
    would be the SDPA form's), makes the check not ok with every figure kept. Where Triton cannot run: skipped; on a
    CPU under Triton's interpreter (the tests): small shapes, and the times mean nothing.
    """
    from transformers_possam.modeling.sam_attention import relative_position_attention, relative_position_rows
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton
    from transformers_possam.triton_support import kernels_not_built, triton_runs_on

    if not triton_runs_on(context.device):
        return {"skipped": f"Triton cannot run on {context.device}"}
    full_size = context.device.type == "cuda"
    generator = torch.Generator().manual_seed(2)
    details: dict = {}
    first_shape = None
    for model_name, head_dim, heads in (("sam_b", 64, 12), ("sam_h", 80, 16)):
        for layer_name, sequences, size in (("windowed", 200, (14, 14)), ("global", 8, (64, 64))):
            if not full_size:
                heads, sequences, size = 2, 2, (4, 6)
            tokens = size[0] * size[1]
            qkv = torch.randn(sequences, tokens, 3, heads, head_dim, generator=generator).permute(2, 0, 3, 1, 4)
            query, key, value = qkv.to(context.device, torch.bfloat16).unbind(0)  # the layer's strided views
            rows = [
                relative_position_rows(
                    n,
                    n,
                    (torch.randn(2 * n - 1, head_dim, generator=generator) / 4).to(context.device, torch.bfloat16),
                )
                for n in size
            ]
            arguments = (query, key, value, *rows, size)
            with torch.inference_mode():
                exact = relative_position_attention(*(tensor.float() for tensor in arguments[:5]), size)
                default = relative_position_attention(*arguments)
                found = relative_position_attention_triton(*arguments)
                default_error = float((default.float() - exact).abs().max())
                found_error = float((found.float() - exact).abs().max())
                if not found_error <= 2 * default_error + 1e-3:
                    raise AssertionError(
                        f"{model_name} {layer_name}: the kernel's largest error {found_error:.3g} against float32, "
                        f"the default path's {default_error:.3g}"
                    )
                details[f"{model_name}_{layer_name}"] = {
                    "max_abs_error": found_error,
                    "default_max_abs_error": default_error,
                    "triton_ms": _median_call_ms(
                        lambda: relative_position_attention_triton(*arguments), context.device
                    ),
                    # a candidate setting: 128 queries per program (for sm_90 in bf16, 0-128 bytes of spills)
                    "triton_128_queries_ms": _median_call_ms(
                        lambda: relative_position_attention_triton(*arguments, block_queries=128), context.device
                    ),
                    "default_ms": _median_call_ms(lambda: relative_position_attention(*arguments), context.device),
                }
                if first_shape is None:
                    first_shape = arguments, found
    # after every shape is measured: a failure here keeps their figures (the check is then not ok)
    try:
        details["compiled"] = _sam_attention_kernel_compiled(*first_shape, context.device)
    except Exception as error:
        details["compiled"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
        details["ok"] = False
    fallen_back = [key for key in kernels_not_built() if "relative_position_attention_triton" in key]
    if fallen_back:  # some figures above would be the SDPA form's (a form of the kernel could not be built here)
        details["kernel_not_built"] = fallen_back
        details["ok"] = False
    return details


def _sam_attention_kernel_compiled(arguments: tuple, eager: torch.Tensor, device: torch.device) -> dict:
    """The SAM attention op inside a compiled function (the attention, then the output projection's view and an
    elementwise step), fullgraph: on CUDA with inductor and CUDA graphs (the third call replays the captured graph),
    elsewhere AOTAutograd's eager backend (the tests); its output against the eager kernel's."""
    from transformers_possam.modeling.sam_attention_triton import relative_position_attention_triton

    def attend_and_scale(query, key, value, relative_height, relative_width):
        attention = relative_position_attention_triton(query, key, value, relative_height, relative_width, size)
        return attention.transpose(1, 2).flatten(2) * 2

    size = arguments[5]
    options = {"mode": "reduce-overhead"} if device.type == "cuda" else {"backend": "aot_eager"}
    inductor_counters = torch._dynamo.utils.counters["inductor"]
    counts_before = {name: inductor_counters[name] for name in ("cudagraph_skips", "cudagraph_partitions")}
    compiled = torch.compile(attend_and_scale, fullgraph=True, dynamic=False, **options)
    start = time.perf_counter()
    for call in range(3):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        found = compiled(*arguments[:5]).clone()
        if call == 0:
            first_call_s = time.perf_counter() - start
    expected = eager.transpose(1, 2).flatten(2) * 2
    difference = float((found.float() - expected.float()).abs().max())
    if difference > 0:  # the same kernel on the same inputs
        raise AssertionError(f"the compiled SAM attention op differs from the eager kernel by {difference:.3g}")
    return {
        "first_call_s": first_call_s,
        "max_abs_difference": difference,
        "cuda_graphs": device.type == "cuda",
        # graphs inductor left without CUDA graphs, and partitions (reasons: TORCH_LOGS=cudagraphs)
        **{name: inductor_counters[name] - before for name, before in counts_before.items()},
    }


def check_deformable_backward_triton(context: Context) -> dict:
    """
    The deformable sampler's backward kernel (`deformable_attention_triton` under autograd, a candidate for CUDA's
    training sampler) at PosSAM's pixel-decoder shapes at 1024x1024 (levels of 128, 64 and 32 pixels a side, 8 heads
    of 32 channels, 4 points; 21,504 queries) with bf16 values, as bf16-autocast training gives them, and float32
    locations and weights: its gradients against autograd through transformers' sampler on the same values in
    float32 (no element of the values' gradient off by more than 1e-2 of its largest, bf16 rounding; of the
    weights' by more than 1e-3; of the locations' at most one in 100,000, see below), and the forward plus backward
    of both timed (median ms per call) at batch 2 (FC-CLIP's images per GPU) and 8; then the gradients at odd
    shapes (partial blocks of queries and channels, which PosSAM's shapes never leave). A backward that could not
    be built (its figures would be PyTorch's) makes the check not ok with every figure kept. Where Triton cannot
    run: skipped; on a CPU under Triton's interpreter (the tests): small shapes, and the times mean nothing.
    """
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    from transformers_possam.modeling.deformable_sampling_triton import deformable_attention_triton
    from transformers_possam.triton_support import kernels_not_built, triton_runs_on

    if not triton_runs_on(context.device):
        return {"skipped": f"Triton cannot run on {context.device}"}
    full_size = context.device.type == "cuda"
    repeats = 10 if full_size else 2  # (Triton's interpreter is slow, and its times mean nothing)
    generator = torch.Generator().manual_seed(3)
    # (name, level sizes, batch, heads, head dim, points, queries or None for one per value, timed)
    if full_size:
        cases = [(f"batch_{batch}", [(128, 128), (64, 64), (32, 32)], batch, 8, 32, 4, None, True) for batch in (2, 8)]
    else:
        cases = [("batch_1", [(4, 4), (2, 2)], 1, 2, 8, 2, None, True)]
    # PosSAM's shapes fill every block (21,504 queries, 32 channels): odd ones exercise the kernel's masks on a GPU
    cases.append(("odd_shapes", [(3, 5), (7, 2)], 2, 3, 24, 3, 1000 if full_size else 21, False))
    details: dict = {}

    def gradients(sampler, value, shapes, locations, weights, output_grad):
        inputs = [tensor.detach().requires_grad_() for tensor in (value, locations, weights)]
        output = sampler(inputs[0], shapes, inputs[1], inputs[2])
        return torch.autograd.grad(output, inputs, output_grad)

    for name, shapes, batch, heads, head_dim, points, queries, timed in cases:
        num_values = sum(height * width for height, width in shapes)
        queries = queries or num_values
        value = torch.randn(batch, num_values, heads, head_dim, generator=generator).to(context.device, torch.bfloat16)
        sample_shape = (batch, queries, heads, len(shapes), points)
        locations = (torch.rand(*sample_shape, 2, generator=generator) * 1.2 - 0.1).to(context.device)
        # normalized over levels x points, as the layer's softmax
        weights = torch.rand(*sample_shape, generator=generator).flatten(-2).softmax(-1).view(sample_shape)
        weights = weights.to(context.device)
        output_grad = torch.randn(batch, queries, heads * head_dim, generator=generator).to(context.device)
        arguments = (shapes, locations, weights, output_grad)
        expected = gradients(multi_scale_deformable_attention, value.float(), *arguments)
        found = gradients(deformable_attention_triton, value, *arguments)
        row: dict = {"value_grad_dtype": str(found[0].dtype), "relative_errors": {}, "elements_off": {}}
        failed = []
        for gradient_name, gradient, reference in zip(("value", "locations", "weights"), found, expected):
            difference = (gradient.float() - reference).abs()
            largest = reference.abs().max()
            row["relative_errors"][gradient_name] = float(difference.max() / largest)
            off = int((difference > _BACKWARD_LIMITS[gradient_name] * largest).sum())
            row["elements_off"][gradient_name] = off
            # the locations' gradient is one-sided at whole pixels: where the kernel's `x * w - 0.5` and
            # grid_sample's `((2 x - 1 + 1) * w - 1) / 2` round to the two sides of one, a sample's derivative
            # jumps (its value does not): a few such samples are not errors
            if off > (reference.numel() * 1e-5 if gradient_name == "locations" else 0):
                failed.append(gradient_name)
        if timed:
            row["triton_forward_backward_ms"] = _median_call_ms(
                lambda: gradients(deformable_attention_triton, value, *arguments), context.device, repeats
            )
            # transformers' sampler as training runs it (FC-CLIP's float32 sampling: the values' float32 copy)
            row["transformers_forward_backward_ms"] = _median_call_ms(
                lambda: gradients(multi_scale_deformable_attention, value.float(), *arguments),
                context.device,
                repeats,
            )
        if failed:
            row["failed"] = failed
            details["ok"] = False
        details[name] = row
    fallen_back = [
        key
        for key in kernels_not_built()
        if key.startswith(("('deformable_attention_triton',", "('deformable_attention_triton_backward',"))
    ]
    if fallen_back:  # the figures above would be PyTorch's
        details["kernel_not_built"] = fallen_back
        details["ok"] = False
    return details


# the largest difference from transformers' gradients, relative to the largest of them: the value's is rounded to
# bf16 once (relative 2^-8), the others are float32 sums in another order
_BACKWARD_LIMITS = {"value": 1e-2, "locations": 1e-3, "weights": 1e-3}


def check_bf16(context: Context) -> dict:
    model = copy.deepcopy(context.model).to(torch.bfloat16)
    inputs = {**context.inputs, "pixel_values": context.inputs["pixel_values"].to(torch.bfloat16)}
    found = context.outputs(model, inputs)
    expected = context.outputs(context.model, context.inputs)
    if not all(torch.isfinite(value).all() for value in found.values()):
        raise AssertionError("bf16 outputs are not finite")
    masks, reference = found["masks_queries_logits"], expected["masks_queries_logits"]
    return {"mask_logit_relative_error": ((masks - reference).norm() / reference.norm()).item()}


class CudaSyncRecorder:
    """
    Every synchronizing CUDA call PyTorch reports while active (`torch.cuda.set_sync_debug_mode("warn")`: all of
    them, with where they happened, not only the first as "error" would), in `syncs`; other warnings are shown as
    usual. `allowed()` is a block whose syncs are intended (the debug mode is off there).
    """

    def __init__(self):
        self.syncs: list[str] = []

    def _record(self, message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):  # other warnings are not syncs: shown as usual
            self._show_other_warning(message, category, filename, lineno, file, line)
            return
        stack = [frame for frame in traceback.format_stack()[:-1] if "warnings.py" not in frame]
        self.syncs.append(f"{message}\n" + "".join(stack[-6:]))

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        self._show_other_warning = warnings.showwarning
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self._warnings.__exit__(*exc)

    @contextlib.contextmanager
    def allowed(self):
        torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("warn")


def check_no_host_sync(context: Context) -> dict:
    """
    Every synchronizing CUDA call PyTorch reports (`CudaSyncRecorder`) in the forward, MASE and the panoptic
    post-processing, the dense path's one device-to-host transfer allowed and counted; then, since the debug mode
    does not see every stall, the same forward queued behind a ~0.5 s `torch.cuda._sleep`: the host must finish
    queueing it while the GPU still sleeps.
    """
    if context.device.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
    from transformers_possam import postprocessing

    original = postprocessing._fetch_to_host
    fetches: list[list[int]] = []
    recorder = CudaSyncRecorder()

    def counted_fetch(values):  # the dense path's one intended transfer
        with recorder.allowed():
            fetches.append(list(values.shape))
            return original(values)

    # a warm-up forward first: one-time work of a first call (library handles, autotuning) is not the forward's
    context.outputs(context.model, context.inputs)
    postprocessing._fetch_to_host = counted_fetch
    torch.cuda.synchronize(context.device)
    try:
        with torch.no_grad(), recorder:
            outputs = context.model(**context.inputs)
            results = context.processor.post_process_panoptic_segmentation(
                outputs, target_sizes=[(context.size, context.size)] * 2
            )
    finally:
        postprocessing._fetch_to_host = original
    syncs = recorder.syncs
    # the stall check: the host queues a forward behind a GPU sleep; if nothing in it waits for the GPU, the host is
    # done while the sleep still runs (an event recorded right after the sleep has not completed). `_sleep` counts
    # SM cycles; `clock_rate` (kHz, the boost clock) may be missing on some builds: 2 GHz, an H100's order.
    sleep_seconds = 0.5
    clock_khz = getattr(torch.cuda.get_device_properties(context.device), "clock_rate", 0) or 2_000_000
    torch.cuda.synchronize(context.device)
    start = time.perf_counter()
    torch.cuda._sleep(int(sleep_seconds * clock_khz * 1e3))
    slept = torch.cuda.Event()
    slept.record()
    with torch.no_grad():
        context.model(**context.inputs)
    host_seconds = time.perf_counter() - start
    sleep_still_running = not slept.query()
    torch.cuda.synchronize(context.device)
    device_seconds = time.perf_counter() - start
    details = {
        "transfers": fetches,
        "segments": [len(result["segments_info"]) for result in results],
        "reported_syncs": syncs,
        "stall_check": {
            "sleep_s": sleep_seconds,
            "host_s": host_seconds,
            "device_s": device_seconds,
            "sleep_still_running_when_queued": sleep_still_running,
        },
    }
    problems = []
    if syncs:
        problems.append(f"{len(syncs)} synchronizing call(s) reported, first: {syncs[0]}")
    if len(fetches) != 1:
        problems.append(f"expected one device-to-host transfer for the batch, saw {len(fetches)}")
    if not sleep_still_running:
        # the host waited for the GPU; or (host_s beyond the sleep) it only ran out of room in the launch queue,
        # about a thousand kernels deep, which the tiny forward nearly fills: then the result is inconclusive
        details["stall_check"]["verdict"] = "inconclusive" if host_seconds >= sleep_seconds else "waited"
        if host_seconds < sleep_seconds:
            problems.append(f"the host waited for the GPU while queueing the forward ({host_seconds:.3f} s)")
    if problems:
        raise AssertionError("; ".join(problems) + f" (details: {json.dumps(details, default=str)[:3000]})")
    return details


def check_compiled(context: Context) -> dict:
    """`torch.compile(fullgraph=True)` against eager, TF32 off in both (inductor may pick other conv algorithms),
    compared by relative norm (a thresholded mask logit may flip where eager's is near 0)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    # on CUDA with CUDA graphs (the GPU suite's compiled rows): the third call replays the captured graph (the first
    # warms up, the second records), Triton's deformable op inside it
    cuda_graphs = context.device.type == "cuda"
    inductor_counters = torch._dynamo.utils.counters["inductor"]
    counts_before = {name: inductor_counters[name] for name in ("cudagraph_skips", "cudagraph_partitions")}
    try:
        compiled = torch.compile(
            context.model, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda_graphs else None
        )
        start = time.perf_counter()
        found = context.outputs(compiled, context.inputs)
        compile_seconds = time.perf_counter() - start
        for _ in range(2 if cuda_graphs else 0):
            torch.compiler.cudagraph_mark_step_begin()
            found = context.outputs(compiled, context.inputs)
        expected = context.outputs(context.model, context.inputs)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    errors = {name: ((found[name] - expected[name]).norm() / expected[name].norm()).item() for name in OUTPUT_NAMES}
    if max(errors.values()) > 1e-3:
        raise AssertionError(f"compiled outputs differ from eager (relative norm): {errors}")
    return {
        "first_call_s": compile_seconds,
        "relative_error": errors,
        "cuda_graphs": cuda_graphs,
        # graphs inductor left without CUDA graphs, and partitions of a graph split around what they cannot hold
        # (reasons: TORCH_LOGS=cudagraphs)
        **{name: inductor_counters[name] - before for name, before in counts_before.items()},
    }


def check_training_step(context: Context) -> dict:
    """Two bf16-autocast training steps: finite losses, and every trainable parameter finite afterwards (the step
    clears the gradients, so a non-finite gradient shows through the parameters clipping and AdamW moved), most of
    them changed; frozen ones unchanged."""
    model = copy.deepcopy(context.model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = make_training_step(model, 2, context.device, autocast_dtype=torch.bfloat16)
    losses = [step() for _ in range(2)]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    parameters = dict(model.named_parameters())
    not_finite = [name for name in trainable if not torch.isfinite(parameters[name]).all()]
    changed = [name for name in trainable if not torch.equal(parameters[name], before[name])]
    frozen_moved = [
        name for name in parameters if name not in trainable and not torch.equal(parameters[name], before[name])
    ]
    if (
        not all(math.isfinite(loss) for loss in losses)
        or not_finite
        or frozen_moved
        or len(changed) < len(trainable) / 2
    ):
        raise AssertionError(
            f"training step: losses {losses}, non-finite parameters {not_finite[:5]}, frozen parameters moved "
            f"{frozen_moved[:5]}, {len(changed)} of {len(trainable)} trainable parameters changed"
        )
    return {"losses": losses, "trainable_tensors": len(trainable), "changed_tensors": len(changed)}


def check_training_syncs(context: Context) -> dict:
    """
    The bf16-autocast training forward and loss (`training_step`'s batch) under `CudaSyncRecorder`, after a warm-up
    call (`training_sync_reads`).
    """
    if context.device.type != "cuda":
        return {"skipped": "torch.cuda.set_sync_debug_mode needs CUDA"}
    model = copy.deepcopy(context.model).train()
    batch = make_training_batch(model, 2, context.device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(**batch)  # warm-up: a first call's one-time work is not the step's
    torch.cuda.synchronize(context.device)
    return training_sync_reads(model, batch, "cuda")


def training_sync_reads(model, batch: dict, device_type: str) -> dict:
    """
    `model(**batch).loss` under bf16 autocast and `CudaSyncRecorder`, with the targets' checks asynchronous
    (`value_checks("async")`; by default they read the device just before the loss, 2 short waits per image where the
    matching waits anyway): the only synchronizations must be the Hungarian matching's host reads
    (`loss._read_on_host`, one per matched layer with all images' cost matrices in one transfer); each is allowed
    and counted. Raises AssertionError on any other reported call, a read count other than `decoder_layers`, or a
    non-finite loss.
    """
    from transformers_possam.modeling import loss as loss_module
    from transformers_possam.value_checks import value_checks

    original = loss_module._read_on_host
    reads: list[list[int]] = []
    recorder = CudaSyncRecorder()

    def counted_read(values):
        with recorder.allowed():
            reads.append(list(values.shape))
            return original(values)

    loss_module._read_on_host = counted_read
    try:
        with recorder, value_checks("async"), torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(**batch).loss
    finally:
        loss_module._read_on_host = original
    layers = model.config.decoder_layers
    details = {"matching_reads": reads, "reported_syncs": recorder.syncs, "loss": float(loss.detach())}
    if recorder.syncs or len(reads) != layers or not math.isfinite(details["loss"]):
        raise AssertionError(
            f"expected {layers} matching reads and no other synchronizing call (details: "
            f"{json.dumps(details, default=str)[:3000]})"
        )
    return details


CHECKS: dict[str, Callable[[Context], dict]] = {
    "versions": check_versions,
    "outputs_match_cpu": check_outputs_match_cpu,
    "sam_attention_all_heads": check_sam_attention_all_heads,
    "sam_attention_fused_kernel": check_sam_attention_fused_kernel,
    "sam_attention_triton": check_sam_attention_triton,
    "deformable_backward_triton": check_deformable_backward_triton,
    "bf16": check_bf16,
    "no_host_sync": check_no_host_sync,
    "training_step": check_training_step,
    "training_syncs": check_training_syncs,
    "compiled": check_compiled,  # last: a slow compilation under the session's timeout stops only itself
}


def _write(output: Path, results: dict) -> None:
    temporary = output.with_name(output.name + ".tmp")  # renamed over the file: a kill never leaves half of it
    temporary.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    os.replace(temporary, output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", type=device_name)
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--output", default="device-check.json", type=output_file)
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these checks to the results already in --output (a second run of the session's later checks)",
    )
    parser.add_argument(
        "--check-flags",
        action="store_true",
        help="check the other flags, then exit without running (device_session.sh does, before any step)",
    )
    args = parser.parse_args(argv)
    if args.check_flags:
        return 0
    device = torch.device(args.device)
    from transformers_possam.triton_support import kernels_not_built

    results: dict = {"device": str(device), "checks": {}, "triton_kernels_not_built": []}
    output = Path(args.output)
    if args.append and output.exists():
        try:
            results = json.loads(output.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            parser.error(f"--append --output {output}: not a JSON file ({error}); give this script's own results")
        if not isinstance(results, dict) or not isinstance(results.get("checks"), dict):
            parser.error(f"--append --output {output}: not this script's results (no 'checks'); give its own file")
        earlier_not_built = list(results.get("triton_kernels_not_built", []))
    else:
        earlier_not_built = []
    context = Context(device)
    for name in args.checks:
        start = time.perf_counter()
        # written before the check runs: a check stopped by the session's time limit leaves this, not nothing
        results["checks"][name] = {"ok": False, "error": "started, not finished (stopped by a time limit?)"}
        _write(output, results)
        try:
            entry = {"ok": True, **CHECKS[name](context)}
        except Exception as error:  # recorded with its traceback; the other checks still run
            entry = {
                "ok": False,
                "error": f"{type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc()[-4000:],
            }
        entry["seconds"] = time.perf_counter() - start
        results["checks"][name] = entry
        # a Triton kernel that could not be built gave way to its PyTorch path (`launch_or_fall_back`), once per
        # process: the checks after it pass on the fallback, so the record goes with every write (a run stopped by
        # its time limit keeps it) and fails the run at the end
        results["triton_kernels_not_built"] = sorted({*earlier_not_built, *kernels_not_built()})
        _write(output, results)
        status = "skipped" if "skipped" in entry else ("ok" if entry["ok"] else "FAILED")
        print(f"{name}: {status} ({entry['seconds']:.1f} s) {entry.get('error', '')}", flush=True)
    not_built = results["triton_kernels_not_built"]  # as of the last check's write
    if not_built:
        print(f"Triton kernels not built (their PyTorch paths ran): {not_built}", flush=True)
    checks_ok = all(results["checks"][name]["ok"] for name in args.checks)
    return 0 if checks_ok and not not_built else 1


if __name__ == "__main__":
    raise SystemExit(main())
