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

from ..device_transfer import DeviceConstants
from .mlp import mlp_in_row_blocks, runs_in_row_blocks


__all__ = ["PosSAMPixelDecoderEncoder", "PosSAMPixelDecoderEncoderLayer", "unpadded_valid_ratios"]


def _unpadded_valid_ratios(num_levels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """
    `(1, levels, 2)` ones: the valid ratios of feature maps without padding, what transformers' `get_valid_ratio`
    gives for all-False padding masks (valid rows / rows = 1 exactly), one row for the whole batch.
    """
    return torch.ones(1, num_levels, 2, dtype=dtype, device=device)


# PosSAM's (FC-CLIP's) pixel decoder has no padding: its valid ratios, and the reference points made from them, are
# constants of the levels' sizes, made once in eager mode; transformers makes them in every forward from all-False
# masks (about 55 small kernels, launches that bound a GPU's batch-1 forward)
unpadded_valid_ratios = DeviceConstants(_unpadded_valid_ratios)


def _unpadded_reference_points(
    spatial_shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """`(1, N, levels, 2)`: transformers' `get_reference_points` with `unpadded_valid_ratios`, bitwise its values."""
    return Mask2FormerPixelDecoderEncoderOnly.get_reference_points(
        list(spatial_shapes), _unpadded_valid_ratios(len(spatial_shapes), dtype, device), device
    )


_cached_unpadded_reference_points = DeviceConstants(_unpadded_reference_points)


def relu_in_place(input: torch.Tensor, inplace: bool = True) -> torch.Tensor:
    """`F.relu`, in place unless asked otherwise (the signature of `F.relu`, which the layer's attribute holds)."""
    return F.relu(input, inplace=inplace)


class PosSAMPixelDecoderEncoderLayer(Mask2FormerPixelDecoderEncoderLayer):
    """
    `Mask2FormerPixelDecoderEncoderLayer` (same parameters, keys and math) whose feed-forward ReLU runs in place on
    `fc1`'s output, a tensor nothing else holds: at 1024x1024 input that is 21504 x 1024 floats (88 MB) per layer
    not allocated again, which on CPU costs page faults as much as the ReLU itself. Autograd allows it (ReLU's
    gradient reads its output; `fc1`'s does not read its own). At inference on CPU (`runs_in_row_blocks`: not
    training, no autograd, not traced) the feed-forward network runs in blocks of rows (`mlp_in_row_blocks`, 20%
    faster at 21504 x 256 -> 1024) and the residual sums are written over the fresh sublayer outputs; dropout is
    inactive there, so the layer is residual, norm, feed-forward, residual, norm as in transformers. In training it
    makes no host read (`_training_tail`).
    """

    def __init__(self, config):
        super().__init__(config)
        self.activation_fn = relu_in_place

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        position_embeddings: torch.Tensor | None = None,
        reference_points=None,
        spatial_shapes_list=None,
        level_start_index=None,
        output_attentions: bool = False,
    ):
        row_blocks = not self.training and not output_attentions and runs_in_row_blocks(hidden_states, self)
        if output_attentions or not (self.training or row_blocks):
            return super().forward(
                hidden_states,
                attention_mask,
                position_embeddings=position_embeddings,
                reference_points=reference_points,
                spatial_shapes_list=spatial_shapes_list,
                level_start_index=level_start_index,
                output_attentions=output_attentions,
            )
        attended, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            encoder_hidden_states=hidden_states,
            encoder_attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            reference_points=reference_points,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
            output_attentions=False,
        )
        if self.training:
            return (self._training_tail(hidden_states, attended),)
        # `residual + sublayer(x)` as transformers sums it (addition commutes exactly), into the sublayer's output
        hidden_states = self.self_attn_layer_norm(attended.add_(hidden_states))
        feed_forward = mlp_in_row_blocks(hidden_states, self.fc1, self.activation_fn, self.fc2)
        return (self.final_layer_norm(feed_forward.add_(hidden_states)),)

    def _training_tail(self, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """
        transformers' training forward after the attention (the same operations and dropout draws, in the same
        order) without its host read: transformers clamps the output to +-(largest float - 1000) only when a value
        is not finite, which it checks with `if not torch.isfinite(x).all()`, a GPU synchronization in every layer
        and step. The clamp changes no finite value (1000 is far below the spacing of floats near the largest one,
        so the bound is the largest float itself), so clamping always gives the same values and gradients without
        reading anything.
        """
        attended = F.dropout(attended, p=self.dropout, training=True)
        hidden_states = self.self_attn_layer_norm(hidden_states + attended)
        feed_forward = F.dropout(self.activation_fn(self.fc1(hidden_states)), p=self.activation_dropout, training=True)
        feed_forward = F.dropout(self.fc2(feed_forward), p=self.dropout, training=True)
        hidden_states = self.final_layer_norm(hidden_states + feed_forward)
        bound = torch.finfo(hidden_states.dtype).max - 1000
        return hidden_states.clamp(min=-bound, max=bound)


class PosSAMPixelDecoderEncoder(Mask2FormerPixelDecoderEncoderOnly):
    """
    `Mask2FormerPixelDecoderEncoderOnly` (same parameters, keys and values) returning `last_hidden_state`
    `(B, N, C)` stored channel-major (a transposed view of a contiguous `(B, C, N)` tensor). transformers' pixel
    decoder reads the encoder's levels back as `x.transpose(1, 2).view(B, C, h, w)` and resizes the 1/8 level
    bilinearly into its FPN: from token-major storage that map is channels-last, and PyTorch's CPU bilinear resize of
    a channels-last map is about 9x slower than of a channel-major one (float32, 128 -> 256 px: 244 vs 28 ms,
    docs/design.md). The transposing copy costs a few ms.
    """

    @staticmethod
    def get_reference_points(spatial_shapes_list, valid_ratios, device):
        """
        transformers' `get_reference_points` (the same values), made once per sizes, dtype and device when
        `valid_ratios` is `unpadded_valid_ratios`'s own cached tensor (what `PosSAMPixelDecoder` passes): recognized
        by identity, so nothing is read from the device. Then the points are `(1, N, levels, 2)`, shared by the
        batch (the deformable layers broadcast them). Any other valid ratios: transformers' computation.
        """
        unpadded = unpadded_valid_ratios(
            len(spatial_shapes_list), valid_ratios.dtype, valid_ratios.device, like=valid_ratios
        )
        if valid_ratios is not unpadded:
            return Mask2FormerPixelDecoderEncoderOnly.get_reference_points(spatial_shapes_list, valid_ratios, device)
        return _cached_unpadded_reference_points(
            tuple((int(height), int(width)) for height, width in spatial_shapes_list),
            valid_ratios.dtype,
            torch.device(device),
            like=valid_ratios,
        )

    def forward(self, *args, **kwargs) -> BaseModelOutput:
        outputs = super().forward(*args, **kwargs)  # transformers returns a BaseModelOutput whatever return_dict says
        outputs.last_hidden_state = outputs.last_hidden_state.transpose(1, 2).contiguous().transpose(1, 2)
        return outputs
