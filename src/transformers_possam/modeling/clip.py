"""The frozen CLIP of PosSAM: a timm ConvNeXt image tower with its CLIP head and HF's CLIP text tower."""

from __future__ import annotations

import inspect
from typing import cast

import timm
import torch
from timm.models.convnext import ConvNeXt
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection


__all__ = ["PosSAMCLIP", "MAX_LOGIT_SCALE"]

# CLIP clamps exp(logit_scale) at 100; FC-CLIP (and PosSAMOpenVocabularyClassifier) clamp their learned temperature
# the same way.
MAX_LOGIT_SCALE = 100.0


class PosSAMCLIP(nn.Module):
    """
    open_clip's `convnext_large_d_320` (or any timm ConvNeXt CLIP) in library form:

    - `vision_model`: `timm.create_model(name, num_classes=embed_dim)`: trunk `stem`/`stages` and the CLIP head
      `head.norm` -> `head.pre_logits.fc` (MLP) -> `head.fc` (projection to the joint space);
    - `text_model`: `CLIPTextModelWithProjection`;
    - `logit_scale`: CLIP's learned log inverse temperature.

    Everything here is frozen in PosSAM.
    """

    # timm's ConvNeXt creates its layer scales (`ConvNeXtBlock.gamma`) filled with `ls_init_value` (1e-6 unless the
    # model kwargs say otherwise; ConvNeXt-V2 variants pass None and have none) and never re-initializes them.
    TIMM_LAYER_SCALE_INIT = inspect.signature(ConvNeXt).parameters["ls_init_value"].default

    def __init__(
        self,
        vision_model_name: str,
        vision_model_kwargs: dict,
        text_config: CLIPTextConfig,
        embed_dim: int,
        logit_scale_init: float,
    ):
        super().__init__()
        self.vision_model = cast(
            ConvNeXt,
            timm.create_model(vision_model_name, pretrained=False, num_classes=embed_dim, **vision_model_kwargs),
        )
        self.text_model = CLIPTextModelWithProjection(text_config)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        # what timm filled the layer scales with, so `_init_weights` can do the same on a model built on "meta"
        self.layer_scale_init_value: float | None = vision_model_kwargs.get(
            "ls_init_value", self.TIMM_LAYER_SCALE_INIT
        )

    @property
    def dense_feature_dim(self) -> int:
        return self.vision_model.num_features

    def dense_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized `(B, 3, H, W)` -> F_clip `(B, C, H/32, W/32)`: the last stage, before CLIP's head."""
        return self.vision_model.forward_features(pixel_values)

    def dense_features_and_hidden_states(
        self, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """
        `dense_features`, plus the hidden states: the stem's output and each stage's (`(B, C_i, H/s_i, W/s_i)`, as
        transformers' ConvNext counts them). timm's `forward_features` is stem -> stages -> norm_pre; this runs the
        same modules one stage at a time to keep each stage's output.
        """
        vision_model = self.vision_model
        hidden_states = [vision_model.stem(pixel_values)]
        for stage in vision_model.stages:
            hidden_states.append(stage(hidden_states[-1]))
        return vision_model.norm_pre(hidden_states[-1]), tuple(hidden_states)

    def embed_pooled_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """
        CLIP's own head on mask-pooled dense features (FC-CLIP's out-of-vocabulary branch): each `(..., C)` vector
        is treated as a 1x1 map, so the head's global average pool is the identity. Returns `(..., embed_dim)`.
        """
        leading = pooled.shape[:-1]
        flat = pooled.reshape(-1, pooled.shape[-1], 1, 1)
        return self.vision_model.forward_head(flat).reshape(*leading, -1)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalized pixels -> global CLIP image embeddings `(B, embed_dim)` (open_clip `encode_image`)."""
        return self.vision_model(pixel_values)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids `(N, L)` -> projected, unnormalized text embeddings `(N, embed_dim)` (open_clip `encode_text`)."""
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask).text_embeds

    def logit_scale_value(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
