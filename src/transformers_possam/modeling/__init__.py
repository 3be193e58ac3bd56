"""PosSAM building blocks, one paper box per file."""

from .classifier import PosSAMOpenVocabularyClassifier
from .clip import PosSAMCLIP
from .decoder_layer import PosSAMMaskedAttentionDecoderLayer
from .deformable_attention import PosSAMMultiscaleDeformableAttention, deformable_attention_embedding_bag
from .fpn import PosSAMFPN
from .iou_head import PosSAMIoUHead
from .ldp import LocalDiscriminativePooling
from .loss import PosSAMHungarianMatcher, PosSAMLoss, sample_binary_masks
from .mask_pooling import mask_pool
from .mask_predictor import PosSAMMaskPredictor
from .masked_cross_attention import PosSAMMaskedCrossAttention
from .sam_attention import PosSAMVisionAttention


__all__ = [
    "LocalDiscriminativePooling",
    "PosSAMCLIP",
    "PosSAMFPN",
    "PosSAMHungarianMatcher",
    "PosSAMIoUHead",
    "PosSAMLoss",
    "PosSAMMaskPredictor",
    "PosSAMMaskedAttentionDecoderLayer",
    "PosSAMMaskedCrossAttention",
    "PosSAMMultiscaleDeformableAttention",
    "PosSAMOpenVocabularyClassifier",
    "PosSAMVisionAttention",
    "deformable_attention_embedding_bag",
    "mask_pool",
    "sample_binary_masks",
]
