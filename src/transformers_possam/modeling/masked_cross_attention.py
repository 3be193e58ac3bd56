"""The masked-attention decoder's cross-attention without the attention-weight tensor unless a caller asks for it."""

from __future__ import annotations

import torch
from torch import nn


__all__ = ["PosSAMMaskedCrossAttention"]


class PosSAMMaskedCrossAttention(nn.MultiheadAttention):
    """
    `nn.MultiheadAttention` as Mask2Former's decoder layer builds it (same parameters and keys, same math), with
    `need_weights=False` as the default of its call. Mask2Former's layer calls it without `need_weights`, which in
    `nn.MultiheadAttention` means True: PyTorch then materializes and softmaxes the full `(B * heads, Q, h*w)` weights
    on its slow path (about 400 MB at the 1/8-scale level of a 1024x1024 input), and the decoder drops them even
    with `output_attentions` (`Mask2FormerMaskedAttentionDecoder` returns each layer's self-attention weights only).
    Here that call runs PyTorch's scaled-dot-product path and returns None weights; a caller that wants the weights
    passes `need_weights=True`. The choice is an argument of each call: the module holds no per-call state.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return super().forward(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
