"""GELU in place for the frozen encoders' MLPs, whose activation input is a tensor nothing else holds."""

from __future__ import annotations

import torch
from timm.layers import GELU as TimmGELU
from timm.layers import GELUTanh as TimmGELUTanh
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F
from transformers.activations import GELUActivation
from transformers.models.sam.modeling_sam import SamMLPBlock


__all__ = ["InPlaceGELU", "install_in_place_gelu"]


class InPlaceGELU(nn.Module):
    """
    `F.gelu(x, approximate)` written over `x` when autograd does not track `x` (inference, frozen encoders), and
    out of place when it does (GELU's gradient reads its input). Only for an input no one else reads: the output of
    an MLP's first linear layer. The encoders' MLP activations are among the largest tensors of a forward (ConvNeXt-L
    at 1024x1024: 65536 x 768 floats in its first stage; SAM-B: 4096 x 3072 per layer); on CPU a fresh one costs
    page faults that take longer than the GELU itself (docs/design.md).
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return F.gelu(hidden_states, approximate=self.approximate)
        return torch.ops.aten.gelu_(hidden_states, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


def install_in_place_gelu(module: nn.Module) -> None:
    """
    Replaces the GELU of every MLP under `module` whose activation input is its first linear layer's fresh output:
    transformers' `SamMLPBlock` (`lin1 -> act -> lin2`, exact GELU) and timm's `Mlp` (`fc1 -> act -> drop -> norm
    -> fc2`, as in ConvNeXt blocks) with `InPlaceGELU` of the same approximation. Other activations are left alone.
    Parameter-free: weights, keys and values are unchanged.
    """
    for submodule in module.modules():
        activation = getattr(submodule, "act", None)
        if isinstance(submodule, SamMLPBlock) and type(activation) is GELUActivation:
            if activation.act is F.gelu:  # not the erf-in-Python variant
                submodule.act = InPlaceGELU()
        elif isinstance(submodule, Mlp):
            # timm builds `act_layer()`: its own GELU / GELUTanh (ConvNeXt's default) or torch's nn.GELU
            if type(activation) is TimmGELU:
                submodule.act = InPlaceGELU("none")
            elif type(activation) is TimmGELUTanh:
                submodule.act = InPlaceGELU("tanh")
            elif type(activation) is nn.GELU:
                submodule.act = InPlaceGELU(activation.approximate)
