"""PosSAM building blocks, one paper box per file."""

from .activations import InPlaceGELU, install_in_place_gelu
from .classifier import PosSAMOpenVocabularyClassifier
from .clip import PosSAMCLIP
from .decoder_layer import PosSAMMaskedAttentionDecoderLayer
from .decoder_self_attention import PosSAMDecoderSelfAttention
from .deformable_attention import (
    PosSAMMultiscaleDeformableAttention,
    deformable_attention_embedding_bag,
    softmax_over_a_short_last_dimension,
)
from .fast_paths import install_fast_paths
from .fpn import PosSAMFPN
from .iou_head import PosSAMIoUHead
from .ldp import LocalDiscriminativePooling
from .loss import PosSAMHungarianMatcher, PosSAMLoss, sample_binary_masks
from .mask_pooling import bilinear_resize, mask_pool
from .mask_predictor import AttentionMaskFeatures, PosSAMMaskPredictor
from .masked_cross_attention import PosSAMMaskedCrossAttention
from .mlp import PosSAMSamMLPBlock, PosSAMTimmMlp, install_mlp_fast_paths, mlp_in_row_blocks
from .patch_embeddings import PosSAMPatchEmbeddings
from .pixel_decoder import PosSAMPixelDecoder
from .pixel_decoder_encoder import PosSAMPixelDecoderEncoder, PosSAMPixelDecoderEncoderLayer
from .position_embedding import PosSAMSinePositionEmbedding
from .sam_attention import PosSAMVisionAttention


__all__ = [
    "AttentionMaskFeatures",
    "InPlaceGELU",
    "LocalDiscriminativePooling",
    "PosSAMCLIP",
    "PosSAMDecoderSelfAttention",
    "PosSAMFPN",
    "PosSAMHungarianMatcher",
    "PosSAMIoUHead",
    "PosSAMLoss",
    "PosSAMMaskPredictor",
    "PosSAMMaskedAttentionDecoderLayer",
    "PosSAMMaskedCrossAttention",
    "PosSAMMultiscaleDeformableAttention",
    "PosSAMOpenVocabularyClassifier",
    "PosSAMPatchEmbeddings",
    "PosSAMSinePositionEmbedding",
    "PosSAMPixelDecoder",
    "PosSAMPixelDecoderEncoder",
    "PosSAMPixelDecoderEncoderLayer",
    "PosSAMSamMLPBlock",
    "PosSAMTimmMlp",
    "PosSAMVisionAttention",
    "bilinear_resize",
    "deformable_attention_embedding_bag",
    "install_fast_paths",
    "install_in_place_gelu",
    "install_mlp_fast_paths",
    "mask_pool",
    "mlp_in_row_blocks",
    "sample_binary_masks",
    "softmax_over_a_short_last_dimension",
]
