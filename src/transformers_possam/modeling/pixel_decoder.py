"""Mask2Former's pixel decoder with its feature levels' sizes kept on the host (no host-to-device copy)."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderOutput,
)

from ..device_transfer import DeviceConstants, to_device
from .deformable_attention import PosSAMMultiscaleDeformableAttention
from .pixel_decoder_encoder import unpadded_valid_ratios


__all__ = ["PosSAMPixelDecoder"]


def _level_start_index(sizes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """`(levels,)` int64: the first token of each level in the flattened sequence, copied without waiting."""
    starts = [0]
    for height, width in sizes[:-1]:
        starts.append(starts[-1] + height * width)
    return to_device(torch.tensor(starts, dtype=torch.long), device)


_level_start_indices = DeviceConstants(_level_start_index)


class PosSAMPixelDecoder(Mask2FormerPixelDecoder):
    """
    `Mask2FormerPixelDecoder` (same parameters, state-dict keys and math) for a GPU's sake: transformers' forward
    turns the levels' sizes into a device tensor with `torch.as_tensor(sizes, device=...)`, a blocking
    host-to-device copy that synchronizes the stream in every forward, only to derive `level_start_index`, which
    the deformable attention does not read (it takes the sizes as a list). Here that index is copied without
    waiting (`to_device`) once per sizes and device. transformers builds all-False padding masks (PosSAM's maps,
    like FC-CLIP's, have no padding) for two uses: each deformable layer masks its values with them, a pass over
    the values that changes nothing, and `get_valid_ratio` turns them into valid ratios of exactly 1. Here no mask
    is passed on and the valid ratios are `unpadded_valid_ratios`, ones made once (with the reference points made
    from them, `PosSAMPixelDecoderEncoder.get_reference_points`), in float32 at least where the deformable layers
    are PosSAM's (`_reference_dtype`). Every other step is transformers' own: 1x1 input
    projections of the three coarsest levels, sine position embeddings plus level embeddings, the
    deformable-attention encoder, its output split back into levels, then the FPN levels to stride `common_stride`
    and the mask projection.

    Args of `forward`: `features`, the FPN levels finest first, `(B, C_i, H_i, W_i)`; the other arguments as
    transformers' (`encoder_outputs` skips the encoder).
    """

    def _reference_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """
        The dtype of the valid ratios, and so of the reference points made from them: at least float32 where every
        deformable layer samples in float32 (PosSAM's, as FC-CLIP's: `valid_H.float() / H`), so that a bf16 model's
        points are not rounded (made in bf16 they were off by up to 0.19 pixel on a 100-pixel level, 1.3 on a
        200-pixel one; exact on 1024x1024 input's 32, 64 and 128, powers of 2), and a float64 model's stay float64.
        Else the model's own dtype, which transformers' deformable layers need (their `grid_sample` takes the
        values' dtype).
        """
        layers = self.encoder.layers
        samples_in_float32 = all(isinstance(layer.self_attn, PosSAMMultiscaleDeformableAttention) for layer in layers)
        return torch.promote_types(dtype, torch.float32) if samples_in_float32 else dtype

    def forward(
        self,
        features,
        encoder_outputs=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        coarsest_first = features[::-1][: self.num_feature_levels]
        projected = [projection(level) for projection, level in zip(self.input_projections, coarsest_first)]
        sizes = [(level.shape[2], level.shape[3]) for level in projected]

        def flat(tensor: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, H * W, C)
            return tensor.flatten(2).transpose(1, 2)

        positions = [
            flat(self.position_embedding(level.shape, level.device, level.dtype))
            + self.level_embed[index].view(1, 1, -1)
            for index, level in enumerate(coarsest_first)
        ]
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                inputs_embeds=torch.cat([flat(level) for level in projected], 1),
                # no padding mask: PosSAM's (FC-CLIP's) masks are all False by construction, and each deformable
                # layer would mask its values with it, a pass over them that changes nothing
                attention_mask=None,
                position_embeddings=torch.cat(positions, 1),
                spatial_shapes_list=sizes,
                level_start_index=_level_start_indices(tuple(sizes), projected[0].device, like=projected[0]),
                # the valid ratios of all-False padding masks (`get_valid_ratio`: all exactly 1), one row shared by
                # the batch, made once; `PosSAMPixelDecoderEncoder` knows this tensor and makes its reference points
                # once too, in its dtype
                valid_ratios=unpadded_valid_ratios(
                    len(sizes), self._reference_dtype(projected[0].dtype), projected[0].device, like=projected[0]
                ),
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
            )
        encoded = encoder_outputs.last_hidden_state
        split_sizes = [height * width for height, width in sizes[:-1]]
        split_sizes.append(encoded.shape[1] - sum(split_sizes))
        outputs = [
            part.transpose(1, 2).view(encoded.shape[0], -1, *size)
            for part, size in zip(torch.split(encoded, split_sizes, dim=1), sizes)
        ]
        # the finer FPN levels, coarse to fine: lateral 1x1 plus the upsampled coarser output, then a 3x3
        for index, level in enumerate(features[: self.num_fpn_levels][::-1]):
            lateral = self.lateral_convolutions[index](level)
            upsampled = F.interpolate(outputs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            outputs.append(self.output_convolutions[index](lateral + upsampled))
        return Mask2FormerPixelDecoderOutput(
            mask_features=self.mask_projection(outputs[-1]),
            # transformers annotates a 1-tuple; it holds one tensor per level, as here
            multi_scale_features=tuple(outputs[: self.num_feature_levels]),  # type: ignore[arg-type]
            attentions=encoder_outputs.attentions,
        )
