"""
Memory traffic of one forward by operator and source line (issue 15, target 7), without a GPU: the bytes each aten
operator reads and writes (its tensor inputs plus its outputs; an in-place operator reads and writes its tensor), on
the code path a CUDA device runs (`--path cuda`: the fused Triton sampler, counted as one operator, the all-heads
SAM attention, the whole-tensor MLPs, chosen by device type in the package and swapped in here) or the CPU's (`--path cpu`), run on the
CPU. On a GPU every operator but the matmuls and convolutions is bound by memory bandwidth, so these bytes over the
bandwidth are a floor on their device time, and the largest rows name what to fuse or remove; a session without a
GPU can rank them. Counts every tensor an operator touches once (broadcast operands at their own size; caches and
re-reads inside a kernel are not modelled). Operators that return their input unchanged (`dropout` in eval mode,
`contiguous` of a contiguous tensor) move nothing and count nothing.

`python benchmarks/traffic.py --variant vit-b --dtype bfloat16 --path cuda` prints the largest rows (the figures in
docs/design.md, "Thirteenth session"; the sampler there was still transformers' grid_sample version), `--order
calls` the most called rows instead (about one kernel launch per call: where a host-bound forward, PosSAM-B at batch
1 on an H200, spends its launches); `--sam-attention-kernel` counts SAM's attention as its Triton kernel (a CUDA
candidate) instead; `--variant tiny` runs in seconds (the tests do).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import traceback
from collections.abc import Iterator

import torch
from common import FLOAT_DTYPES, VARIANTS, output_file, positive_int
from gpu import _config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


# operators bound by arithmetic rather than memory on a GPU: reported apart
COMPUTE_BOUND = frozenset(
    {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "conv2d", "linear", "matmul", "einsum"}
    | {"scaled_dot_product_attention", "_scaled_dot_product_efficient_attention", "_efficient_attention_forward"}
    | {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"}
    # SAM's Triton attention kernel (`fused_sam_attention_stand_in`), an attention like SDPA's
    | {"relative_position_attention_triton"}
)


def _tensors(value) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _source(package_roots: tuple[str, ...], frames: int = 2) -> str:
    """The innermost `frames` lines of the caller's stack inside the package or transformers, innermost first."""
    stack = [
        frame for frame in traceback.extract_stack()[:-3] if any(root in frame.filename for root in package_roots)
    ]
    return " <- ".join(
        f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}({frame.name})" for frame in reversed(stack[-frames:])
    )


class TrafficCounter(TorchDispatchMode):
    """
    Under this mode every aten operator adds its bytes to `rows[(operator, source line)]` = [bytes, calls]. An
    operator whose outputs all share storage with its inputs without writing them (not mutable: views, `dropout` in
    eval mode, a no-op `contiguous` or `to`) counts nothing; a `reshape` or `flatten` that has to copy counts. Under
    `torch.inference_mode()` (as `forward_traffic` runs) composite operators are seen by their own names (`to`,
    `contiguous`, `linear`); outside it, by what they decompose into (`_to_copy`, `clone`, `mm`).
    """

    def __init__(
        self, package_roots: tuple[str, ...] = ("transformers_possam", "transformers/models", "timm/")
    ) -> None:
        super().__init__()
        self.package_roots = package_roots
        self.rows: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        inputs, outputs = _tensors((args, kwargs)), _tensors(output)
        input_storages = {tensor.untyped_storage().data_ptr() for tensor in inputs}
        if not func._schema.is_mutable and all(
            tensor.untyped_storage().data_ptr() in input_storages for tensor in outputs
        ):
            return output  # a view, or an input returned as it was
        self.add(name, inputs, outputs)
        return output

    def add(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """One call of operator `name` reading `inputs` and writing `outputs`, attributed to the caller's source."""
        row = self.rows[(name, _source(self.package_roots))]
        row[0] += _bytes(inputs) + _bytes(outputs)
        row[1] += 1


# what CUDA's sampler (`deformable_attention_triton`, one Triton kernel) is counted as
FUSED_SAMPLER = "deformable_attention_triton"


def fused_sampler_stand_in(value, spatial_shapes, sampling_locations, attention_weights) -> torch.Tensor:
    """
    The CUDA sampler's traffic on any device: counted as the one kernel it is (its inputs read once, bf16 values as
    they are, plus its float32 output; the bilinear corners it gathers stay in the caches at these sizes, an
    assumption, as for every operator here), its result computed by transformers' sampler outside the count.
    """
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode
    from transformers.models.mask2former.modeling_mask2former import multi_scale_deformable_attention

    counter = _get_current_dispatch_mode()
    with _disable_current_modes():
        output = multi_scale_deformable_attention(
            value.float(), spatial_shapes, sampling_locations.float(), attention_weights.float()
        )
    if isinstance(counter, TrafficCounter):
        counter.add(FUSED_SAMPLER, [value, sampling_locations, attention_weights], [output])
    return output


def fused_sampler_from_projections_stand_in(
    value, spatial_shapes, reference_points, offsets, attention_logits
) -> torch.Tensor:
    """
    The CUDA sampler's fused form (`deformable_attention_triton_from_projections`: softmax, locations and sampling in
    one kernel) counted as the one kernel it is: its inputs read once, its output in the values' dtype; its result
    computed by transformers' steps outside the count.
    """
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    from transformers_possam.modeling.deformable_sampling_triton import _from_projections_in_pytorch

    counter = _get_current_dispatch_mode()
    with _disable_current_modes():  # the kernel's own PyTorch fallback, outside the count
        output = _from_projections_in_pytorch(value, spatial_shapes, reference_points, offsets, attention_logits).to(
            value.dtype
        )
    if isinstance(counter, TrafficCounter):
        counter.add(FUSED_SAMPLER, [value, reference_points, offsets, attention_logits], [output])
    return output


# as the kernel: the layer passes a bf16 model's values without their float32 copy, and calls the fused form where
# it does not return its attention weights
fused_sampler_stand_in.reads_reduced_precision_values = True  # type: ignore[attr-defined]
fused_sampler_stand_in.from_projections = fused_sampler_from_projections_stand_in  # type: ignore[attr-defined]


# what SAM's Triton attention kernel (`relative_position_attention_triton`, a CUDA candidate) is counted as
FUSED_SAM_ATTENTION = "relative_position_attention_triton"


def fused_sam_attention_stand_in(query, key, value, relative_height, relative_width, size) -> torch.Tensor:
    """
    SAM's Triton attention kernel counted as the one kernel it is: q, k and v read once (views of the qkv
    projection), the two row tables, its output written once in the `(B, tokens, heads, d)` layout the output
    projection reads (so the layer's reshape after it is a view, as with the kernel); its result computed by the
    SDPA form outside the count.
    """
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    from transformers_possam.modeling.sam_attention import relative_position_attention

    counter = _get_current_dispatch_mode()
    with _disable_current_modes():
        batch_size, num_heads, tokens, head_dim = query.shape
        output = query.new_empty(batch_size, tokens, num_heads, head_dim).transpose(1, 2)
        output.copy_(relative_position_attention(query, key, value, relative_height, relative_width, size))
    if isinstance(counter, TrafficCounter):
        counter.add(FUSED_SAM_ATTENTION, [query, key, value, relative_height, relative_width], [output])
    return output


@contextlib.contextmanager
def cuda_code_path(sam_attention_kernel: bool = False) -> Iterator[None]:
    """The choices the package makes by device type, set to what a CUDA device gets, on any device (the deformable
    sampler: `fused_sampler_stand_in`); with `sam_attention_kernel`, SAM's attention through the Triton kernel, a
    candidate (`fused_sam_attention_stand_in`); put back after."""
    import transformers_possam.modeling.mlp as mlp
    import transformers_possam.modeling.pixel_decoder_encoder as pixel_decoder_encoder
    import transformers_possam.modeling.sam_attention as sam_attention
    from transformers_possam.modeling.deformable_attention import PosSAMMultiscaleDeformableAttention

    saved = (
        PosSAMMultiscaleDeformableAttention.__dict__["sampler"],
        sam_attention.relative_position_attention_blocked,
        mlp.runs_in_row_blocks,
        pixel_decoder_encoder.runs_in_row_blocks,
        sam_attention.PosSAMVisionAttention.__dict__["attention_function"],
    )
    PosSAMMultiscaleDeformableAttention.sampler = staticmethod(lambda device_type: fused_sampler_stand_in)
    sam_attention.relative_position_attention_blocked = sam_attention.relative_position_attention
    mlp.runs_in_row_blocks = pixel_decoder_encoder.runs_in_row_blocks = lambda *arguments: False
    if sam_attention_kernel:
        sam_attention.PosSAMVisionAttention.attention_function = staticmethod(
            lambda device_type: fused_sam_attention_stand_in
        )
    try:
        yield
    finally:
        PosSAMMultiscaleDeformableAttention.sampler = saved[0]
        sam_attention.relative_position_attention_blocked = saved[1]
        mlp.runs_in_row_blocks, pixel_decoder_encoder.runs_in_row_blocks = saved[2], saved[3]
        sam_attention.PosSAMVisionAttention.attention_function = saved[4]


def forward_traffic(
    variant: str,
    dtype_name: str,
    path: str,
    batch: int = 1,
    warm_up: bool = True,
    sam_attention_kernel: bool = False,
) -> TrafficCounter:
    """
    One forward of `variant` (random weights, 150 classes, pixels of its input size) under a `TrafficCounter`; with
    `warm_up`, after one forward not counted, so that what the package makes once per shape and device
    (`DeviceConstants`: index grids, position embeddings, reference points) is made, as in every forward after a
    GPU's first. `sam_attention_kernel` (CUDA's path only): SAM's attention through its Triton kernel, a candidate.
    """
    from transformers_possam import PosSAMForPanopticSegmentation

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(_config(variant)).eval().to(dtype)
    size = model.config.vision_config.image_size
    class_embeddings = torch.nn.functional.normalize(torch.randn(150, 1, model.config.clip_embed_dim), dim=-1)
    pixel_values = torch.randn(batch, 3, size, size, dtype=dtype)
    counter = TrafficCounter()
    if sam_attention_kernel and path != "cuda":
        raise ValueError("sam_attention_kernel is a CUDA candidate: count it on the cuda code path.")
    code_path = cuda_code_path(sam_attention_kernel) if path == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), code_path:
        if warm_up:
            model(pixel_values, class_embeddings=class_embeddings.to(dtype))
        with counter:
            model(pixel_values, class_embeddings=class_embeddings.to(dtype))
    return counter


def summarize(counter: TrafficCounter, rows: int = 40) -> dict:
    """Totals (GB: all, compute-bound operators, the rest), GB by operator, and the largest rows of the rest."""
    by_operator: collections.Counter[str] = collections.Counter()
    for (name, _), (moved, _) in counter.rows.items():
        by_operator[name] += moved
    compute = sum(moved for name, moved in by_operator.items() if name in COMPUTE_BOUND)
    total = sum(by_operator.values())
    memory_rows = [
        (moved, calls, name, source)
        for (name, source), (moved, calls) in counter.rows.items()
        if name not in COMPUTE_BOUND
    ]
    by_calls = sorted(
        ((calls, moved, name, source) for (name, source), (moved, calls) in counter.rows.items()), reverse=True
    )
    return {
        "calls": sum(calls for _, calls in counter.rows.values()),
        "total_gb": total / 1e9,
        "compute_bound_gb": compute / 1e9,
        "memory_bound_gb": (total - compute) / 1e9,
        "by_operator_gb": {name: moved / 1e9 for name, moved in by_operator.most_common()},
        "largest": [
            {"gb": moved / 1e9, "calls": calls, "operator": name, "source": source}
            for moved, calls, name, source in sorted(memory_rows, reverse=True)[:rows]
        ],
        "most_called": [
            {"calls": calls, "gb": moved / 1e9, "operator": name, "source": source}
            for calls, moved, name, source in by_calls[:rows]
        ],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="vit-b", choices=VARIANTS)
    parser.add_argument("--dtype", default="bfloat16", choices=FLOAT_DTYPES)
    parser.add_argument("--path", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--rows", type=positive_int, default=40)
    parser.add_argument(
        "--order",
        default="bytes",
        choices=["bytes", "calls"],
        help="rank the memory-bound rows by bytes, or every row by calls (about one kernel launch each: where a "
        "host-bound forward spends its launches)",
    )
    parser.add_argument(
        "--sam-attention-kernel",
        action="store_true",
        help="SAM's attention through its Triton kernel (a CUDA candidate), counted as one kernel per layer",
    )
    parser.add_argument(
        "--output", default=None, type=output_file, help="a JSON file for the summary (default: print only)"
    )
    args = parser.parse_args(argv)
    if args.sam_attention_kernel and args.path != "cuda":
        parser.error("--sam-attention-kernel is a CUDA candidate: use it with --path cuda")
    counter = forward_traffic(
        args.variant, args.dtype, args.path, args.batch, sam_attention_kernel=args.sam_attention_kernel
    )
    summary = summarize(counter, args.rows)
    kernel = ", SAM attention through its Triton kernel" if args.sam_attention_kernel else ""
    print(
        f"{args.variant} {args.dtype} batch {args.batch}, {args.path} code path{kernel}: "
        f"{summary['total_gb']:.2f} GB moved, "
        f"{summary['memory_bound_gb']:.2f} GB by memory-bound operators, {summary['calls']} operator calls"
    )
    for row in summary["largest" if args.order == "bytes" else "most_called"]:
        print(f"{row['gb'] * 1e3:9.1f} MB {row['calls']:5d}  {row['operator']:24s} {row['source']}")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump({"variant": args.variant, "dtype": args.dtype, "path": args.path, **summary}, file, indent=1)
    return summary


if __name__ == "__main__":
    main()
