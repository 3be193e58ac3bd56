"""
PosSAM's fast paths: same-parameter replacements of transformers modules inside the mask generator, installed
together by `install_fast_paths` when `PosSAMConfig.use_fast_paths` is True (docs/design.md, "Performance
decisions"). Each replacement is a subclass with the original's parameters and state-dict keys and the same math; with
the flag False the model runs transformers' own modules, the reference `tests/test_fast_paths.py` compares against.
"""

from __future__ import annotations

from typing import TypeVar, cast

import torch
from torch import nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerAttention,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderLayer,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerPixelDecoderEncoderOnly,
    Mask2FormerSinePositionEmbedding,
    Mask2FormerTransformerModule,
)
from transformers.models.sam.modeling_sam import SamPatchEmbeddings, SamVisionEncoder, SamVisionSdpaAttention

from .decoder_self_attention import PosSAMDecoderSelfAttention
from .deformable_attention import PosSAMMultiscaleDeformableAttention
from .mask_predictor import PosSAMMaskPredictor
from .masked_cross_attention import PosSAMMaskedCrossAttention
from .mlp import install_mlp_fast_paths
from .patch_embeddings import PosSAMPatchEmbeddings
from .pixel_decoder import PosSAMPixelDecoder
from .pixel_decoder_encoder import PosSAMPixelDecoderEncoder, PosSAMPixelDecoderEncoderLayer
from .position_embedding import PosSAMSinePositionEmbedding
from .sam_attention import PosSAMVisionAttention


__all__ = ["install_fast_paths", "take_over"]

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def take_over(original: nn.Module, subclass: type[_ModuleT], *args, **kwargs) -> _ModuleT:
    """
    `subclass(*args, **kwargs)` holding `original`'s parameters and buffers (the same tensor objects: built on the
    meta device, so no random draws and no copy), for a subclass with the original's state-dict keys.
    """
    with torch.device("meta"):
        replacement = subclass(*args, **kwargs)
    replacement.load_state_dict(original.state_dict(), assign=True)
    replacement.train(original.training)
    return replacement


def install_fast_paths(mask_generator: nn.Module) -> None:
    """
    Replaces, in place, the transformers modules of the mask generator (`PosSAMModel`: its `vision_encoder`,
    `pixel_decoder` and `transformer_module`) that PosSAM runs faster or leaner:

    1. SAM's `SamVisionSdpaAttention` -> `PosSAMVisionAttention`: the decomposed relative-position bias in
       cache-sized blocks of scores on CPU (no `(tokens, tokens)` tensor), all heads in one fused attention call
       elsewhere. `SamVisionAttention` (the eager implementation, `attn_implementation="eager"`) is left as it is.
       Its `SamMLPBlock`s -> `PosSAMSamMLPBlock` (rows in cache-sized blocks at inference) with their GELU ->
       `InPlaceGELU` (`install_mlp_fast_paths`); `PosSAMForPanopticSegmentation` does the same to the ConvNeXt
       blocks' MLPs in the CLIP image tower. Its `SamPatchEmbeddings` -> `PosSAMPatchEmbeddings`: the tokens stored
       token-major, so that the encoder's `LayerNorm`s and residual sums read contiguous rows.
    2. `Mask2FormerPixelDecoder` -> `PosSAMPixelDecoder`: the levels' start index copied to the device without
       waiting (transformers' forward makes a blocking host-to-device copy, a stream synchronization on a GPU), no
       all-False padding masks, and the valid ratios (all 1) and reference points made once (in float32 at least,
       as FC-CLIP's, where the deformable layers are PosSAM's).
       Its `Mask2FormerPixelDecoderEncoderOnly` -> `PosSAMPixelDecoderEncoder` (its output stored
       channel-major, which the pixel decoder's FPN resizes 9x faster on CPU), each of its
       `Mask2FormerPixelDecoderEncoderLayer`s -> `PosSAMPixelDecoderEncoderLayer` (at inference the feed-forward
       network in blocks of rows, ReLU in place), and their
       `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention` -> `PosSAMMultiscaleDeformableAttention`: an
       `embedding_bag` sampler on CPU, a Triton kernel on CUDA.
    3. The decoder's `Mask2FormerMaskPredictor` -> `PosSAMMaskPredictor`: given `AttentionMaskFeatures` (what
       `PosSAMModel` passes when the intermediate layers' masks are not output), attention masks at attention
       resolution, without the 1/4-resolution masks (for one image, one mask shared by the heads); with F_mask
       itself, the parent's computation.
    4. Each decoder layer's cross-attention `nn.MultiheadAttention` -> `PosSAMMaskedCrossAttention`: no attention
       weights unless a caller asks (the decoder never returns them).
    5. The pixel decoder's and the transformer module's `Mask2FormerSinePositionEmbedding` ->
       `PosSAMSinePositionEmbedding`: made once per shape, device and dtype instead of in every forward.
    6. Each decoder layer's self-attention `Mask2FormerAttention` -> `PosSAMDecoderSelfAttention`: one
       `scaled_dot_product_attention` call where no attention weights are asked for (about 6 fewer kernels per
       layer).

    Each replacement holds the original's tensors (`take_over`): parameters, state-dict keys and the random draws of
    construction are those of transformers' modules. Modules already replaced are left as they are, so a second call
    changes nothing.
    """
    vision_encoder = cast(SamVisionEncoder, mask_generator.vision_encoder)
    transformer_module = cast(Mask2FormerTransformerModule, mask_generator.transformer_module)
    pixel_decoder = cast(Mask2FormerPixelDecoder, mask_generator.pixel_decoder)
    if type(pixel_decoder) is Mask2FormerPixelDecoder:
        pixel_decoder = mask_generator.pixel_decoder = take_over(
            pixel_decoder, PosSAMPixelDecoder, pixel_decoder.config, feature_channels=pixel_decoder.feature_channels
        )
    install_mlp_fast_paths(vision_encoder)
    if type(vision_encoder.patch_embed) is SamPatchEmbeddings:
        vision_encoder.patch_embed = take_over(
            vision_encoder.patch_embed, PosSAMPatchEmbeddings, vision_encoder.config
        )
    for vision_layer in vision_encoder.layers:
        # exactly the SDPA class: the eager `SamVisionAttention`, or a module already replaced, stays
        if type(vision_layer.attn) is SamVisionSdpaAttention:
            vision_layer.attn = take_over(
                vision_layer.attn, PosSAMVisionAttention, vision_encoder.config, window_size=vision_layer.window_size
            )
    if type(pixel_decoder.encoder) is Mask2FormerPixelDecoderEncoderOnly:
        pixel_decoder.encoder = take_over(pixel_decoder.encoder, PosSAMPixelDecoderEncoder, pixel_decoder.config)
    encoder_layers = pixel_decoder.encoder.layers
    for index, encoder_layer in enumerate(encoder_layers):
        if type(encoder_layer) is Mask2FormerPixelDecoderEncoderLayer:
            encoder_layer = encoder_layers[index] = take_over(
                encoder_layer, PosSAMPixelDecoderEncoderLayer, pixel_decoder.config
            )
        attention = encoder_layer.self_attn
        if isinstance(attention, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention) and not isinstance(
            attention, PosSAMMultiscaleDeformableAttention
        ):
            encoder_layer.self_attn = take_over(
                attention,
                PosSAMMultiscaleDeformableAttention,
                embed_dim=attention.d_model,
                num_heads=attention.n_heads,
                n_levels=attention.n_levels,
                n_points=attention.n_points,
            )
    transformer_decoder = transformer_module.decoder
    predictor = transformer_decoder.mask_predictor
    if not isinstance(predictor, PosSAMMaskPredictor):
        transformer_decoder.mask_predictor = take_over(
            predictor,
            PosSAMMaskPredictor,
            hidden_size=predictor.hidden_size,
            num_heads=predictor.num_heads,
            mask_feature_size=transformer_decoder.mask_feature_size,
        )
    for owner, name in ((pixel_decoder, "position_embedding"), (transformer_module, "position_embedder")):
        embedding = getattr(owner, name)
        if type(embedding) is Mask2FormerSinePositionEmbedding:
            setattr(
                owner,
                name,
                take_over(
                    embedding,
                    PosSAMSinePositionEmbedding,
                    num_position_features=embedding.num_position_features,
                    temperature=embedding.temperature,
                    normalize=embedding.normalize,
                    scale=embedding.scale,
                ),
            )
    for decoder_layer in transformer_decoder.layers:
        self_attention = decoder_layer.self_attn
        if type(self_attention) is Mask2FormerAttention:
            decoder_layer.self_attn = take_over(
                self_attention,
                PosSAMDecoderSelfAttention,
                embed_dim=self_attention.embed_dim,
                num_heads=self_attention.num_heads,
                dropout=self_attention.dropout,
                bias=self_attention.q_proj.bias is not None,
            )
        cross_attention = decoder_layer.cross_attn
        if isinstance(cross_attention, nn.MultiheadAttention) and not isinstance(
            cross_attention, PosSAMMaskedCrossAttention
        ):
            decoder_layer.cross_attn = take_over(
                cross_attention,
                PosSAMMaskedCrossAttention,
                cross_attention.embed_dim,
                cross_attention.num_heads,
                cross_attention.dropout,
            )
