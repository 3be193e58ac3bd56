"""transformers-possam: PosSAM (Panoptic Open-vocabulary Segment Anything) for Hugging Face Transformers.

Importing the package registers PosSAM with transformers' Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForUniversalSegmentation`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForUniversalSegmentation

from .configuration_possam import PosSAMConfig, tiny_config
from .modeling_possam import (
    PosSAMForPanopticSegmentation,
    PosSAMForPanopticSegmentationOutput,
    PosSAMModel,
    PosSAMModelOutput,
    PosSAMPreTrainedModel,
)
from .vocabularies import Vocabulary, load_vocabulary

__version__ = "0.1.0"

AutoConfig.register(PosSAMConfig.model_type, PosSAMConfig, exist_ok=True)
AutoModel.register(PosSAMConfig, PosSAMModel, exist_ok=True)
AutoModelForUniversalSegmentation.register(PosSAMConfig, PosSAMForPanopticSegmentation, exist_ok=True)

__all__ = [
    "PosSAMConfig",
    "PosSAMForPanopticSegmentation",
    "PosSAMForPanopticSegmentationOutput",
    "PosSAMModel",
    "PosSAMModelOutput",
    "PosSAMPreTrainedModel",
    "Vocabulary",
    "load_vocabulary",
    "tiny_config",
]
