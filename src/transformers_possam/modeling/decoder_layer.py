"""
The masked-attention decoder layer, with gradient checkpointing that also works in PyTorch's reentrant mode, and
attention weights asked of its self-attention only when they are returned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerMaskedAttentionDecoderLayer


__all__ = ["PosSAMMaskedAttentionDecoderLayer"]


class PosSAMMaskedAttentionDecoderLayer(Mask2FormerMaskedAttentionDecoderLayer):
    """
    `Mask2FormerMaskedAttentionDecoderLayer` (same parameters, state-dict keys and math) whose gradient checkpointing
    works with `use_reentrant=True` as well as without, and which asks its self-attention for attention weights only
    when it returns them (`forward_post`).

    Mask2Former's decoder hands every layer the features and position embeddings of all three levels as Python lists,
    and the layer indexes them with `level_index`. A reentrant checkpoint (`torch.utils.checkpoint` with
    `use_reentrant=True`) tracks only the tensors among its positional arguments: the level features inside a list
    were not inputs of the checkpointed function, so its backward replayed the pixel decoder's graph from inside each
    layer (the second layer's backward then failed with "Trying to backward through the graph a second time").

    Here a forward pre-hook, which runs before the checkpointed `forward`, takes this layer's level out of the lists:
    `forward` receives `position_embeddings` and `encoder_hidden_states` as the level's `(h*w, B, C)` tensors, which
    the checkpoint then sees as inputs. Called with tensors directly, the hook leaves the arguments as they are.
    """

    def __init__(self, config: Mask2FormerConfig):
        super().__init__(config)
        self.register_forward_pre_hook(self._take_level_out_of_lists, with_kwargs=True)

    @staticmethod
    def _take_level_out_of_lists(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        # Mask2Former's decoder calls layer(hidden_states, level_index, attention_mask, position_embeddings,
        # query_position_embeddings, encoder_hidden_states, encoder_attention_mask=..., output_attentions=...)
        if len(args) < 6 or not isinstance(args[5], (list, tuple)):
            return None
        hidden_states, level_index, attention_mask, position_embeddings, query_position_embeddings, features = args[:6]
        level_args = (
            hidden_states,
            level_index,
            attention_mask,
            position_embeddings[level_index],
            query_position_embeddings,
            features[level_index],
        )
        return level_args + tuple(args[6:]), kwargs

    def forward_post(
        self,
        hidden_states: torch.Tensor,
        level_index: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        query_position_embeddings: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
    ):
        """
        transformers' post-norm layer (masked cross-attention, self-attention, feed-forward, each with its residual
        sum and LayerNorm). In training or with `output_attentions`: transformers' `forward_post` itself. Otherwise
        its steps, dropout being inactive, with one difference that changes no value: transformers asks its
        self-attention for the attention weights in every call (`output_attentions=True`), even when nobody reads
        them, which keeps the self-attention from a fused kernel (`PosSAMDecoderSelfAttention`); here the weights
        are asked for only when they are returned.
        """
        if output_attentions or self.training:
            return super().forward_post(
                hidden_states,
                level_index=level_index,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                query_position_embeddings=query_position_embeddings,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                output_attentions=output_attentions,
            )
        # (the level lists are indexed as transformers indexes them; `forward` hands one-level lists)
        level_features = encoder_hidden_states[level_index]  # type: ignore[index]
        attended, _ = self.cross_attn(
            query=self.with_pos_embed(hidden_states, query_position_embeddings),
            key=self.with_pos_embed(level_features, position_embeddings[level_index]),  # type: ignore[index]
            value=level_features,
            attn_mask=encoder_attention_mask,
            key_padding_mask=None,
        )
        hidden_states = self.cross_attn_layer_norm(hidden_states + attended)
        attended, _ = self.self_attn(
            hidden_states=hidden_states,
            position_embeddings=query_position_embeddings,
            attention_mask=None,
            output_attentions=False,
        )
        hidden_states = self.self_attn_layer_norm(hidden_states + attended)
        feed_forward = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        return (self.final_layer_norm(hidden_states + feed_forward),)

    def forward(
        self,
        hidden_states: torch.Tensor,
        level_index: int | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: torch.Tensor | None = None,
        query_position_embeddings: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
    ):
        """
        Mask2Former's layer on one level: `hidden_states` `(Q, B, C)`, `position_embeddings` and
        `encoder_hidden_states` `(h*w, B, C)` of the level this layer attends to, `encoder_attention_mask`
        `(B * heads, Q, h*w)`. Returns `(hidden_states,)`, plus `(self_attention_weights, cross_attention_weights)`
        with `output_attentions`.
        """
        # Mask2Former's layer indexes these two by level (its annotations say tensors): one-level lists
        position_embeddings_by_level: Any = [position_embeddings]
        features_by_level: Any = [encoder_hidden_states]
        return super().forward(
            hidden_states,
            0,
            attention_mask,
            position_embeddings_by_level,
            query_position_embeddings,
            features_by_level,
            encoder_attention_mask=encoder_attention_mask,
            output_attentions=output_attentions,
        )
