"""The masked-attention decoder's cross-attention without the attention-weight tensor unless it is asked for."""

from __future__ import annotations

from torch import nn


__all__ = ["PosSAMMaskedCrossAttention"]


class PosSAMMaskedCrossAttention(nn.MultiheadAttention):
    """
    `nn.MultiheadAttention` as Mask2Former's decoder layer builds it (same parameters and keys). The layer calls it
    with the default `need_weights=True`, which makes PyTorch materialize and softmax the full `(B * heads, Q, h*w)`
    weights on its slow path (about 400 MB at the 1/8-scale level of a 1024x1024 input) only to drop them unless
    `output_attentions`. Here weights are computed only when `return_attention_weights` is True (set by `PosSAMModel`
    for `output_attentions=True`); otherwise PyTorch's scaled-dot-product path runs and the weights are None.
    """

    return_attention_weights = False

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        need_weights = need_weights and self.return_attention_weights
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
