"""
Mask2Former's sine position embedding, made once per shape, device and dtype: it depends on nothing else (no
parameters, no data without a mask), yet transformers rebuilds it in every forward, since its cache holds one entry
and each forward asks for six shapes in turn (three levels in the pixel decoder, three in the transformer module):
about 22 small operators per level, some 130 launches per forward (counted by `benchmarks/traffic.py`), on a GPU where PosSAM-B's forward at batch 1 is
bound by kernel launches (docs/design.md, "Fourteenth session").
"""

from __future__ import annotations

import inspect

import torch
from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

from ..device_transfer import DeviceConstants


__all__ = ["PosSAMSinePositionEmbedding"]


def _sine_position_embedding(
    shape: torch.Size,
    device: torch.device,
    dtype: torch.dtype,
    num_position_features: int,
    normalize: bool,
    scale: float,
    temperature: int,
    autocast: tuple[bool, torch.dtype],
) -> torch.Tensor:
    """transformers' `build_sine_position_embedding` without a mask (`autocast`: the device's autocast state, part
    of the key only: under CUDA autocast a bf16 request comes out float32), `(B, 2 * features, H, W)`, past its own
    one-entry cache (`inspect.unwrap`): that cache cannot tell fake tensors from real ones, so a shape-only run would
    leave a fake embedding for the next real call of the same shape."""
    build = inspect.unwrap(Mask2FormerSinePositionEmbedding.build_sine_position_embedding)
    return build(shape, device, dtype, num_position_features, normalize, scale, temperature, None)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """The device's autocast state (no autocast on devices without one, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except RuntimeError:
        return False, None


# one entry per shape (batch size included), device and dtype: a model meets a handful
_cached_sine_position_embedding = DeviceConstants(_sine_position_embedding)


class PosSAMSinePositionEmbedding(Mask2FormerSinePositionEmbedding):
    """
    `Mask2FormerSinePositionEmbedding` (no parameters; the same values, bitwise) whose embeddings without a mask are
    made once per shape, device and dtype (`DeviceConstants`: not in traced graphs or for fake tensors, which compute
    them each time). The result is shared between calls: its users only read it (transformers adds it out of place).
    With a mask, transformers' computation.
    """

    def forward(
        self,
        shape: torch.Size,
        device: torch.device | str,
        dtype: torch.dtype,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mask is not None:
            return super().forward(shape, device, dtype, mask)
        like = torch.empty(0, device="meta")  # the cache's tracing / fake-tensor test needs a tensor: a real one
        return _cached_sine_position_embedding(
            torch.Size(shape),
            torch.device(device),
            dtype,
            self.num_position_features,
            self.normalize,
            self.scale,
            self.temperature,
            _autocast_state(torch.device(device).type),
            like=like,
        )
