"""
The frozen encoders' MLPs (SAM's `SamMLPBlock`, the ConvNeXt blocks' timm `Mlp`) and the pixel decoder's
feed-forward network, computed in blocks of rows at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from timm.layers import Mlp
from torch import nn
from transformers.models.sam.modeling_sam import SamMLPBlock

from .activations import install_in_place_gelu


__all__ = [
    "PosSAMSamMLPBlock",
    "PosSAMTimmMlp",
    "install_mlp_fast_paths",
    "mlp_in_row_blocks",
    "runs_in_row_blocks",
]

# bytes of one block's hidden activations: a few MB, which stay in cache between the two matmuls
_HIDDEN_BLOCK_BYTES = 8 * 2**20
# fewer rows per matmul lose matmul efficiency (ConvNeXt-L's last stage, 1024 x 1536 -> 6144: 25% slower in 682-row
# blocks); an input of at most this many rows is one block
_MINIMUM_ROWS_PER_BLOCK = 1024


def runs_in_row_blocks(hidden_states: torch.Tensor, *layers: nn.Module) -> bool:
    """
    Whether `mlp_in_row_blocks` applies: eager inference on CPU, i.e. autograd tracks neither the input nor the
    layers' parameters (frozen encoders while training qualify) and no `torch.compile` / `torch.export` trace runs
    (the compiler fuses, and `out=` writes into views break its graph). On accelerators a whole-tensor matmul is
    what the hardware wants and fresh memory costs nothing, so they keep the module's own forward.
    """
    if hidden_states.device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if not torch.is_grad_enabled():
        return True
    return not hidden_states.requires_grad and not any(
        parameter.requires_grad for layer in layers for parameter in layer.parameters()
    )


def mlp_in_row_blocks(
    hidden_states: torch.Tensor,
    first: nn.Linear,
    activation: Callable[[torch.Tensor], torch.Tensor],
    second: nn.Linear,
    hidden_block_bytes: int = _HIDDEN_BLOCK_BYTES,
    minimum_rows_per_block: int = _MINIMUM_ROWS_PER_BLOCK,
) -> torch.Tensor:
    """
    `second(activation(first(hidden_states)))` over the last dimension, for blocks of rows (tokens) at a time: each
    block's hidden activations go from the first matmul through the activation into the second matmul while they
    are in cache, in one buffer reused by every block, and each block's result is written into the output. The
    whole-tensor form allocates the full hidden tensor (ConvNeXt-L's first stage at 1024x1024: 65536 x 768, 192 MB
    in float32), which glibc maps fresh from the kernel at every call; on this project's 2-core CPU the blocked form
    runs the narrow MLPs (192 to 384 channels, the pixel decoder's 256 -> 1024) 10-20% faster (docs/design.md). The
    same math row by row; only the matmul's blocking of the sums may differ. No autograd (`runs_in_row_blocks`).

    Args:
        hidden_states: `(..., in_features)`.
        first, second: `nn.Linear` `in -> hidden` and `hidden -> out` (bias or none).
        activation: applied to each `(rows, hidden)` block; it may work in place (`InPlaceGELU`, in-place ReLU).
        hidden_block_bytes: the most bytes of one block's hidden activations ...
        minimum_rows_per_block: ... but at least this many rows in a block.

    Returns:
        `(..., out_features)`, contiguous.
    """
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    num_rows = rows.shape[0]
    hidden_size = first.out_features
    rows_per_block = min(
        num_rows, max(minimum_rows_per_block, hidden_block_bytes // (hidden_size * rows.element_size()), 1)
    )
    hidden_buffer = rows.new_empty(rows_per_block, hidden_size)
    output = rows.new_empty(num_rows, second.out_features)
    first_weight, second_weight = first.weight.T, second.weight.T
    for first_row in range(0, num_rows, rows_per_block):
        block = slice(first_row, first_row + rows_per_block)
        hidden = hidden_buffer[: min(rows_per_block, num_rows - first_row)]
        if first.bias is None:
            torch.mm(rows[block], first_weight, out=hidden)
        else:
            torch.addmm(first.bias, rows[block], first_weight, out=hidden)
        hidden = activation(hidden)
        if second.bias is None:
            torch.mm(hidden, second_weight, out=output[block])
        else:
            torch.addmm(second.bias, hidden, second_weight, out=output[block])
    return output.view(*hidden_states.shape[:-1], second.out_features)


class PosSAMSamMLPBlock(SamMLPBlock):
    """transformers' `SamMLPBlock` (same parameters and keys, same math), in blocks of rows at inference."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if runs_in_row_blocks(hidden_states, self.lin1, self.lin2):
            return mlp_in_row_blocks(hidden_states, self.lin1, self.act, self.lin2)
        return super().forward(hidden_states)


class PosSAMTimmMlp(Mlp):
    """
    timm's `Mlp` with linear layers and no norm (same parameters and keys, same math), `fc1 -> act -> fc2` in blocks
    of rows at inference as long as its dropout is inactive.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.fc1, self.fc2
        dropout_active = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        if (
            isinstance(first, nn.Linear)
            and isinstance(second, nn.Linear)
            and not dropout_active
            and runs_in_row_blocks(x, self)
        ):
            return mlp_in_row_blocks(x, first, self.act, second)
        return super().forward(x)


def _row_blocked(mlp: nn.Module) -> nn.Module | None:
    """The row-blocked replacement of `mlp` (holding its parameters and activation), None if none applies."""
    # local import: fast_paths imports this module
    from .fast_paths import take_over

    replacement: nn.Module
    if type(mlp) is SamMLPBlock:
        # the three fields `SamMLPBlock.__init__` reads from its config; the activation is the original's (below)
        sizes = SimpleNamespace(hidden_size=mlp.lin1.in_features, mlp_dim=mlp.lin1.out_features, hidden_act="gelu")
        replacement = take_over(mlp, PosSAMSamMLPBlock, sizes)
    elif (
        type(mlp) is Mlp
        and isinstance(mlp.fc1, nn.Linear)
        and isinstance(mlp.fc2, nn.Linear)
        and isinstance(mlp.norm, nn.Identity)
    ):
        replacement = take_over(
            mlp,
            PosSAMTimmMlp,
            in_features=mlp.fc1.in_features,
            hidden_features=mlp.fc1.out_features,
            out_features=mlp.fc2.out_features,
            bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None),
            drop=(mlp.drop1.p, mlp.drop2.p),
        )
    else:
        return None
    replacement.act = mlp.act  # the same activation object, whatever its arguments
    return replacement


def install_mlp_fast_paths(module: nn.Module) -> None:
    """
    Under `module`: every transformers `SamMLPBlock` -> `PosSAMSamMLPBlock` and every timm `Mlp` with linear layers
    and no norm (ConvNeXt's) -> `PosSAMTimmMlp` (rows in blocks at inference), then their GELU -> `InPlaceGELU`
    (`install_in_place_gelu`), which the blocks' activation works in. Same parameters and state-dict keys; modules
    already replaced are left as they are, so a second call changes nothing.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            replacement = _row_blocked(child)
            if replacement is not None:
                setattr(parent, name, replacement)
    install_in_place_gelu(module)
