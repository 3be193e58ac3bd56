"""
Targets 9 and 10 (issue 15, items 1 and 2) on the full-size PosSAM-B (random weights), 1024x1024 input, batch 1,
150 classes, CPU:

9. bf16 vs fp32: the same model with its weights in bf16 (what `from_pretrained(..., dtype=torch.bfloat16)` loads)
   against fp32, forward + MASE panoptic post-processing; goal >= 3.0x faster (stretch 3.5x). Also reported: the
   mask-logit relative error of bf16 against fp32.
10. efficiency: the end-to-end achieved FLOP/s (FLOPs counted here with `torch.utils.flop_counter.FlopCounterMode` on
   the same call) against a large matmul's FLOP/s of the same dtype; goals >= 0.75x (fp32) and >= 0.70x (bf16).

The machine is shared: every repeat runs fp32 matmul, fp32 model, bf16 matmul, bf16 model back to back, so load
hits both sides alike, and the ratios are of medians.
"""

from __future__ import annotations

import copy
import time

import torch
from common import full_size_model, random_vocabulary, summary, test_image
from overhead import _prepare
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


MATMUL_SIZE = 4096
GOAL_BF16_SPEEDUP, STRETCH_BF16_SPEEDUP = 3.0, 3.5
GOAL_EFFICIENCY = {"float32": 0.75, "bfloat16": 0.70}


def matmul_seconds(dtype: torch.dtype, size: int = MATMUL_SIZE) -> float:
    """Seconds of one `size`^3 matmul in `dtype` (best of 2 after a warm-up: the kernel's rate under current load)."""
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(dtype)
    right = torch.randn(size, size, generator=generator).to(dtype)
    torch.matmul(left, right)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        torch.matmul(left, right)
        times.append(time.perf_counter() - start)
    return min(times)


def count_flops(step) -> int:
    """
    FLOPs of `step()` as torch's FlopCounterMode counts them (matmuls, convolutions, attention), with two additions
    its table lacks:
    - the CPU flash kernel that `scaled_dot_product_attention` runs here (its table has SDPA's CUDA kernels), with
      the same formula (two matmuls, 4 * B * heads * L_q * L_k * d);
    - in-place `baddbmm_`, counted as `baddbmm`: SAM's global attention accumulates its q k^T matmul onto the
      relative-position bias in place (`relative_position_attention_blocked`), which would otherwise go uncounted
      (0.10 of PosSAM-B's 2.95 TFLOP). Its windowed layers' bias matmul (the bias factors times a one-hot key grid,
      0.2% of the total) is counted with it.
    """

    def cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def in_place_baddbmm_flops(self_shape, batch1_shape, batch2_shape, *args, out_shape=None, **kwargs) -> int:
        batch, rows, inner = batch1_shape
        return 2 * batch * rows * inner * batch2_shape[-1]

    extra_formulas = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flops,
        torch.ops.aten.baddbmm_: in_place_baddbmm_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=extra_formulas) as counter:
        step()
    return counter.get_total_flops()


def _relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((found.float() - expected).norm() / expected.norm()).item()


def run(
    repeats: int, model=None, processor=None, matmul_size: int = MATMUL_SIZE, name: str = "PosSAM-B"
) -> list[dict]:
    """
    Rows of targets 9 and 10. `model`: an fp32 `PosSAMForPanopticSegmentation` in eval mode (default: the full-size B
    of `common.full_size_model`); its bf16 twin is a copy cast with `.to(torch.bfloat16)`, the weights
    `from_pretrained(..., dtype=torch.bfloat16)` would load.
    """
    from transformers_possam import PosSAMImageProcessor

    model = model if model is not None else full_size_model()
    size = model.config.vision_config.image_size
    if processor is None:
        processor = PosSAMImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    models = {"float32": model, "bfloat16": copy.deepcopy(model).to(torch.bfloat16)}
    pixel_values, pixel_mask, original_sizes, reshaped_sizes = _prepare(
        processor, test_image(683 * size // 1024, size)
    )
    class_embeddings = random_vocabulary(model)
    outputs = {}

    def full(dtype_name: str):
        dtype = getattr(torch, dtype_name)
        result = models[dtype_name](
            pixel_values.to(dtype), pixel_mask=pixel_mask, class_embeddings=class_embeddings.to(dtype)
        )
        outputs[dtype_name] = result
        return processor.post_process_panoptic_segmentation(
            result, target_sizes=original_sizes, reshaped_input_sizes=reshaped_sizes
        )

    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    matmul: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    with torch.inference_mode():
        flops = {dtype_name: count_flops(lambda: full(dtype_name)) for dtype_name in times}  # also the warm-up
        mask_error = _relative_error(outputs["bfloat16"].masks_queries_logits, outputs["float32"].masks_queries_logits)
        class_error = _relative_error(
            outputs["bfloat16"].class_queries_logits, outputs["float32"].class_queries_logits
        )
        for _ in range(repeats):  # interleaved: fp32 and bf16 see the same load
            for dtype_name in times:
                matmul[dtype_name].append(matmul_seconds(getattr(torch, dtype_name), matmul_size))
                start = time.perf_counter()
                full(dtype_name)
                times[dtype_name].append(time.perf_counter() - start)
    timing = {dtype_name: summary(values) for dtype_name, values in times.items()}
    matmul_rate = {
        dtype_name: 2 * matmul_size**3 / summary(values)["median_s"] for dtype_name, values in matmul.items()
    }
    speedup = timing["float32"]["median_s"] / timing["bfloat16"]["median_s"]
    figure = f"{name} at {size}x{size}, batch 1, 150 classes, forward + MASE panoptic post-processing"
    rows = [
        {
            "target": 9,
            "figure": f"CPU bf16 vs fp32: {figure}",
            "ours": timing["bfloat16"],
            "reference": timing["float32"],
            "reference_name": "the same model in fp32",
            "ratio": speedup,
            "mask_logit_relative_error": mask_error,
            "class_logit_relative_error": class_error,
            "goal": f">= {GOAL_BF16_SPEEDUP}x faster (stretch {STRETCH_BF16_SPEEDUP}x)",
            "pass": speedup >= GOAL_BF16_SPEEDUP,
        }
    ]
    for dtype_name in times:
        achieved = flops[dtype_name] / timing[dtype_name]["median_s"]
        ratio = achieved / matmul_rate[dtype_name]
        rows.append(
            {
                "target": 10,
                "figure": f"efficiency {dtype_name}: {figure}, FLOP/s vs a {matmul_size}^3 matmul",
                "dtype": dtype_name,
                "flops": flops[dtype_name],
                "seconds": timing[dtype_name],
                "achieved_flops_per_second": achieved,
                "matmul_flops_per_second": matmul_rate[dtype_name],
                "matmul_seconds": summary(matmul[dtype_name]),
                "ratio": ratio,
                "goal": f">= {GOAL_EFFICIENCY[dtype_name]}x the matmul",
                "pass": ratio >= GOAL_EFFICIENCY[dtype_name],
            }
        )
    return rows
