"""
The pixel decoder's deformable-attention encoder (Mask2Former's), with an output layout that transformers' pixel
decoder reads fast, and its feed-forward ReLU in place.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderLayer,
    Mask2FormerPixelDecoderEncoderOnly,
)


__all__ = ["PosSAMPixelDecoderEncoder", "PosSAMPixelDecoderEncoderLayer"]


def relu_in_place(input: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """`F.relu`, in place unless asked otherwise (the signature of `F.relu`, which the layer's attribute holds)."""
    return F.relu(input, inplace=inplace)


class PosSAMPixelDecoderEncoderLayer(Mask2FormerPixelDecoderEncoderLayer):
    """
    `Mask2FormerPixelDecoderEncoderLayer` (same parameters, keys and math) whose feed-forward ReLU runs in place on
    `fc1`'s output, a tensor nothing else holds: at 1024x1024 input that is 21504 x 1024 floats (88 MB) per layer
    not allocated again, which on CPU costs page faults as much as the ReLU itself. Autograd allows it (ReLU's
    gradient reads its output; `fc1`'s does not read its own).
    """

    def __init__(self, config):
        super().__init__(config)
        self.activation_fn = relu_in_place


class PosSAMPixelDecoderEncoder(Mask2FormerPixelDecoderEncoderOnly):
    """
    `Mask2FormerPixelDecoderEncoderOnly` (same parameters, keys and values) returning `last_hidden_state`
    `(B, N, C)` stored channel-major (a transposed view of a contiguous `(B, C, N)` tensor). transformers' pixel
    decoder reads the encoder's levels back as `x.transpose(1, 2).view(B, C, h, w)` and resizes the 1/8 level
    bilinearly into its FPN: from token-major storage that map is channels-last, and PyTorch's CPU bilinear resize of
    a channels-last map is about 9x slower than of a channel-major one (float32, 128 -> 256 px: 244 vs 28 ms,
    docs/design.md). The transposing copy costs a few ms.
    """

    def forward(self, *args, **kwargs) -> BaseModelOutput:
        outputs = super().forward(*args, **kwargs)  # transformers returns a BaseModelOutput whatever return_dict says
        outputs.last_hidden_state = outputs.last_hidden_state.transpose(1, 2).contiguous().transpose(1, 2)
        return outputs
