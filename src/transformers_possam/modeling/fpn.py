"""PosSAMFPN: SAM's single stride-16 map -> a 4-level pyramid (paper §3.3, "FPN")."""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn


__all__ = ["PosSAMFPN"]


class _FPNLevel(nn.Sequential):
    """Resample, then 1x1 conv + LayerNorm and 3x3 conv + LayerNorm to the level's width (ViTDet's output block)."""

    def __init__(self, resample: list[nn.Module], in_channels: int, out_channels: int):
        super().__init__(
            *resample,
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            LayerNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_channels),
        )


class PosSAMFPN(nn.Module):
    """
    "we design an FPN network, with a combination of convolutions and deconvolution layers, and feed F_sam through it
    to generate feature maps F_ms at different scales of 1/32, 1/16, 1/8, and 1/4" (paper §3.3, citing ViTDet [43]).

    ViTDet's simple feature pyramid on SAM's 256-channel neck output (stride 16):
    stride 4 = two 2x deconvolutions, stride 8 = one 2x deconvolution, stride 16 = identity, stride 32 = 2x max-pool;
    each level then gets a 1x1 and a 3x3 convolution with LayerNorm to `out_channels[i]`. Starting from the neck
    (256 channels for ViT-B/L/H alike) keeps the trainable part identical across the three variants, as in the paper.

    Args:
        in_channels: channels of F_sam (SAM's `output_channels`, 256).
        out_channels: widths of the levels at strides (4, 8, 16, 32).
    """

    def __init__(self, in_channels: int, out_channels: list[int] | tuple[int, ...]):
        super().__init__()
        half, quarter = in_channels // 2, in_channels // 4
        self.levels = nn.ModuleList(
            [
                _FPNLevel(
                    [
                        nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2),
                        LayerNorm2d(half),
                        nn.GELU(),
                        nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2),
                    ],
                    quarter,
                    out_channels[0],
                ),
                _FPNLevel([nn.ConvTranspose2d(in_channels, half, kernel_size=2, stride=2)], half, out_channels[1]),
                _FPNLevel([], in_channels, out_channels[2]),
                _FPNLevel([nn.MaxPool2d(kernel_size=2, stride=2)], in_channels, out_channels[3]),
            ]
        )

    def forward(self, image_embeddings: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            image_embeddings: F_sam, `(batch, in_channels, H/16, W/16)`.

        Returns:
            F_ms: 4 maps `(batch, out_channels[i], H/s, W/s)` for s = 4, 8, 16, 32 (high to low resolution, the order
            Mask2Former's pixel decoder takes).
        """
        return [level(image_embeddings) for level in self.levels]
