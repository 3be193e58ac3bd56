"""transformers-possam: PosSAM (Panoptic Open-vocabulary Segment Anything) for Hugging Face Transformers.

Importing the package registers PosSAM with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForUniversalSegmentation`, `AutoModelForImageSegmentation`, `AutoImageProcessor`, `AutoProcessor`) and its
pipeline task ("open-vocabulary-panoptic-segmentation").
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageSegmentation,
    AutoModelForUniversalSegmentation,
    AutoProcessor,
)

from .configuration_possam import PosSAMConfig, tiny_config
from .image_processing_possam import PosSAMImageProcessor, PosSAMImageProcessorPil
from .mase import mask_aware_selective_ensemble
from .modeling_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMForPanopticSegmentationOutput,
    PosSAMModel,
    PosSAMModelOutput,
    PosSAMPreTrainedModel,
)
from .pipeline_possam import OpenVocabularyPanopticSegmentationPipeline, register_pipeline
from .processing_possam import VILD_TEMPLATES, PosSAMProcessor
from .tokenization import clip_tokenizer_from_bpe
from .value_checks import value_checks
from .visualization import draw_segmentation, side_by_side
from .vocabularies import Vocabulary, load_vocabulary


__version__ = "0.1.0"

AutoConfig.register(PosSAMConfig.model_type, PosSAMConfig, exist_ok=True)
AutoModel.register(PosSAMConfig, PosSAMModel, exist_ok=True)
AutoModelForUniversalSegmentation.register(PosSAMConfig, PosSAMForPanopticSegmentation, exist_ok=True)
# transformers' image-segmentation pipeline loads its model with AutoModelForImageSegmentation
AutoModelForImageSegmentation.register(PosSAMConfig, PosSAMForPanopticSegmentation, exist_ok=True)
AutoImageProcessor.register(
    PosSAMConfig,
    image_processor_classes={"torchvision": PosSAMImageProcessor, "pil": PosSAMImageProcessorPil},
    exist_ok=True,
)
AutoProcessor.register(PosSAMConfig, PosSAMProcessor, exist_ok=True)
register_pipeline()

__all__ = [
    "OpenVocabularyPanopticSegmentationPipeline",
    "PosSAMImageProcessor",
    "PosSAMImageProcessorPil",
    "PosSAMProcessor",
    "VILD_TEMPLATES",
    "clip_tokenizer_from_bpe",
    "draw_segmentation",
    "mask_aware_selective_ensemble",
    "PosSAMConfig",
    "PosSAMForPanopticSegmentation",
    "PosSAMForPanopticSegmentationOutput",
    "PosSAMModel",
    "PosSAMModelOutput",
    "PosSAMPreTrainedModel",
    "Vocabulary",
    "load_vocabulary",
    "side_by_side",
    "tiny_config",
    "value_checks",
]
