"""Mask pooling ("ROI pooling" in the paper): average features inside each binarized mask."""

from __future__ import annotations

import torch

from ..device_transfer import DeviceConstants, to_device


__all__ = ["bilinear_resize", "mask_pool"]


def _axis_taps(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    PyTorch's bilinear taps along one axis (align_corners=False, no antialiasing), computed as its CPU kernel does:
    source `max(0, (out + 0.5) * in / out - 0.5)` in float32, first tap its floor (at most `in - 1`), second tap the
    next index (the same at the edge), weight of the second tap the fractional part.

    Returns:
        `(first, second)` int64 indices `(out_size,)` and the second tap's float32 weight `(out_size,)`.
    """
    # the kernel (as PyTorch builds it for x86) divides in float32 and evaluates `scale * (out + 0.5) - 0.5` as one
    # fused multiply-add; the product is exact in float64, so float64 rounded once to float32 gives its positions
    # (float32 throughout rounded twice: other taps on 263 of 1794 axes, 6e-4 off for 1024 -> 7)
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    positions = torch.arange(out_size, dtype=torch.float64) + 0.5
    source = (positions * scale.double() - 0.5).float().clamp_min(0)
    first = source.floor().clamp_max(in_size - 1)
    weight = (source - first).clamp(0, 1)
    first = first.long()
    second = (first + 1).clamp_max(in_size - 1)
    return to_device(first, device), to_device(second, device), to_device(weight, device)


# made (and copied to the device) once per sizes and device in eager mode
_cached_axis_taps = DeviceConstants(_axis_taps)


def bilinear_resize(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """
    `F.interpolate(logits, size, mode="bilinear", align_corners=False)` in float32 from only the rows and columns
    the taps read: the two source rows of every output row, then within them the two source columns of every output
    column, combined as F.interpolate's CPU kernel combines them (columns first, then rows). F.interpolate reads
    every input pixel: resizing PosSAM-B's 250 masks 256x256 -> 32x32 for mask pooling took it 40-60 ms on CPU,
    about 5 ms (docs/design.md). Same values up to float32 rounding.

    Args:
        logits: `(..., height, width)`, any float dtype.
        size: `(out_height, out_width)`.

    Returns:
        `(..., out_height, out_width)` float32.
    """
    if logits.dim() < 2 or not logits.is_floating_point() or min(logits.shape[-2:]) < 1:
        raise ValueError(
            f"bilinear_resize needs float logits of shape (..., height, width) with height, width >= 1; got dtype "
            f"{logits.dtype}, shape {tuple(logits.shape)}."
        )
    if len(size) != 2 or not all(isinstance(length, (int, torch.SymInt)) and length >= 1 for length in size):
        raise ValueError(f"bilinear_resize needs size = (out_height, out_width), two ints >= 1; got {size!r}.")
    height, width = logits.shape[-2:]
    row_0, row_1, row_weight = _cached_axis_taps(height, size[0], logits.device, like=logits)
    column_0, column_1, column_weight = _cached_axis_taps(width, size[1], logits.device, like=logits)

    def across_columns(rows: torch.Tensor) -> torch.Tensor:
        first, second = rows.index_select(-1, column_0).float(), rows.index_select(-1, column_1).float()
        return first * (1 - column_weight) + second * column_weight

    top, bottom = across_columns(logits.index_select(-2, row_0)), across_columns(logits.index_select(-2, row_1))
    return top * (1 - row_weight)[:, None] + bottom * row_weight[:, None]


def mask_pool(features: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """
    FC-CLIP / ODISE mask pooling: the mask logits are bilinearly resized to the feature map (`bilinear_resize`),
    binarized at logit 0 (sigmoid 0.5) without gradient, and the features are averaged inside each mask. An empty
    mask pools to zeros.

    Args:
        features: `(batch, channels, height, width)`.
        mask_logits: `(batch, num_queries, h, w)`, any resolution.

    Returns:
        `(batch, num_queries, channels)`.
    """
    with torch.no_grad():
        if mask_logits.shape[-2:] != features.shape[-2:]:
            mask_logits = bilinear_resize(mask_logits, (features.shape[-2], features.shape[-1]))
        masks = (mask_logits > 0).to(features.dtype)
        # FC-CLIP divides by `area + 1e-8`; for the integer areas here that is `area.clamp_min(1)` exactly (n + 1e-8
        # rounds to n for n >= 1 in every float type, and 0 / 1e-8 = 0 / 1). The ONNX exporter's graph optimizer
        # dropped the `+ 1e-8`, and onnxruntime then divided 0 by 0 for empty masks (NaN class logits).
        area = masks.sum(dim=(-2, -1)).unsqueeze(-1).clamp_min(1)
    # (B, Q, HW) @ (B, HW, C): one batched matmul instead of an einsum over a (B, Q, C, H, W) broadcast
    pooled = torch.bmm(masks.flatten(2), features.flatten(2).transpose(1, 2))
    return pooled / area
