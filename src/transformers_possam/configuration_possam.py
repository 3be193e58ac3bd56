"""PosSAM configuration."""

import copy
import math
import os
from typing import Any, TypeVar

from huggingface_hub.dataclasses import strict
from transformers import CLIPTextConfig, Mask2FormerConfig, PreTrainedConfig, SamVisionConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .remote_code_hooks import IS_INSTALLED_PACKAGE, export_code
from .vocabularies import load_vocabulary, split_synonyms


logger = logging.get_logger(__name__)


_SubConfigT = TypeVar("_SubConfigT", bound=PreTrainedConfig)

__all__ = [
    "PosSAMConfig",
    "SAM_VISION_VARIANTS",
    "CONVNEXT_LARGE_D_320_TEXT",
    "MASK2FORMER_FIELDS",
    "default_vocabulary_shape",
    "tiny_config",
]

# open_clip `convnext_large_d_320` text tower (model_configs json: width 768, heads 12, layers 16, embed_dim 768),
# written as a CLIPTextConfig. open_clip uses exact GELU, HF CLIP's default is quick_gelu.
CONVNEXT_LARGE_D_320_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# SAM ViT-B/L/H image encoders (segment-anything `build_sam.py`, transformers `convert_sam_to_hf.py`).
SAM_VISION_VARIANTS = {
    "vit-b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit-l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "vit-h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}

# The Mask2Former hyper-parameters PosSAMConfig holds, flat, under Mask2FormerConfig's names: the single source of
# truth, from which `PosSAMConfig.mask2former_config` builds the Mask2FormerConfig the reused modules are given.
MASK2FORMER_FIELDS = (
    "feature_size",
    "mask_feature_size",
    "hidden_dim",
    "encoder_feedforward_dim",
    "activation_function",
    "encoder_layers",
    "decoder_layers",
    "num_attention_heads",
    "dropout",
    "dim_feedforward",
    "pre_norm",
    "enforce_input_projection",
    "common_stride",
    "num_queries",
    "feature_strides",
    "init_std",
    "init_xavier_std",
    "no_object_weight",
    "class_weight",
    "mask_weight",
    "dice_weight",
    "train_num_points",
    "oversample_ratio",
    "importance_sample_ratio",
    "use_auxiliary_loss",
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@strict
class PosSAMConfig(PreTrainedConfig):
    r"""
    Configuration of a PosSAM model. Defaults give PosSAM-B with the paper's decoder (Mask2Former/FC-CLIP sizes) and
    the frozen open_clip `convnext_large_d_320` CLIP.

    Args:
        vision_config (`dict` or `SamVisionConfig`): the frozen SAM ViT image encoder (default ViT-B). Its `neck`
            produces `vision_config.output_channels` (256) channels at stride `patch_size` (16).
        text_config (`dict` or `CLIPTextConfig`): the frozen CLIP text tower; missing keys of a dict fall back to
            open_clip `convnext_large_d_320` (hidden 768, 16 layers, 12 heads, projection 768), not to
            `CLIPTextConfig`'s own defaults.
        clip_vision_model_name (`str`): timm architecture of the frozen CLIP image tower (any timm ConvNeXt).
        clip_vision_model_kwargs (`dict`): extra kwargs for `timm.create_model` (e.g. `{"head_hidden_size": 320}`
            to give a tiny ConvNeXt CLIP's MLP head).
        clip_embed_dim (`int`): joint CLIP image/text embedding size (the image head's output, the text projection).
        clip_logit_scale_init (`float`): initial value of CLIP's own (frozen) log logit scale; converted weights
            overwrite it.
        sam_image_mean, sam_image_std, clip_image_mean, clip_image_std (`list[float]` or `float`): normalizations on
            the 0-1 scale, per channel (a float applies to every channel, as in transformers' image processors).
            Pixels arrive SAM-normalized; the model re-normalizes them for CLIP.
        fpn_out_channels (`list[int]`): channels of the FPN outputs at strides 4, 8, 16, 32.
        feature_size, mask_feature_size, hidden_dim, encoder_feedforward_dim, activation_function, encoder_layers,
        decoder_layers, num_attention_heads, dropout, dim_feedforward, pre_norm, enforce_input_projection,
        common_stride, num_queries, feature_strides, init_std, init_xavier_std: Mask2Former pixel decoder and
            masked-attention decoder, with `Mask2FormerConfig`'s meaning (`decoder_layers=10` is 9 transformer layers
            plus the prediction from the learnable queries). They are the only copy: the Mask2Former modules are built
            from `mask2former_config`, a `Mask2FormerConfig` derived from them (`MASK2FORMER_FIELDS`), never saved.
        iou_head_hidden_dim, iou_head_depth (`int`): the MLP of the IoU head.
        ldp_num_heads, ldp_num_layers (`int`): self-attention fusion of the Local Discriminative Pooling module
            (which works at `clip_embed_dim`).
        logit_scale_init (`float`): initial log of the learnable inverse temperature 1/tau of the LDP logits.
        no_object_weight, class_weight, mask_weight, dice_weight, iou_weight (`float`): loss weights (the first four
            are also the Hungarian matching costs).
        train_num_points, oversample_ratio, importance_sample_ratio: point-sampled mask losses (PointRend).
        use_auxiliary_loss (`bool`): deep supervision on every decoder layer.
        iou_loss_on_unmatched (`bool`): also train the IoU head to predict 0 for unmatched queries (the paper trains
            it on matched pairs only: default False).
        training_vocabulary (`list[str]`): class names (comma-separated synonyms) the model was trained on; used to
            derive the seen-class mask of a test vocabulary, and the model's default vocabulary (the classes of
            `id2label` / `label2id`, label k = the first synonym of class k, which forward and transformers'
            image-segmentation pipeline use when given no vocabulary). Default COCO panoptic 133; an `id2label` or
            `num_labels` given alone defines it instead.
        use_fast_paths (`bool`, defaults to True): run the model with PosSAM's same-parameter replacements of
            transformers modules (`modeling.fast_paths.install_fast_paths`: SAM attention in cache-sized blocks on
            CPU / all heads fused elsewhere, the pixel decoder's encoder with a channel-major output, in-place ReLU
            and its feed-forward network in row blocks at inference, an `embedding_bag` deformable-attention sampler
            on CPU, attention masks at attention resolution when the intermediate masks are not output, masked
            cross-attention without its unused weights; the SAM and ConvNeXt MLPs in row blocks at inference on CPU,
            GELU in place). False: transformers' and timm's own modules (`SamVisionSdpaAttention` /
            `SamVisionAttention`, `SamMLPBlock`, timm's `Mlp`, `Mask2FormerPixelDecoderEncoderOnly` and its layers,
            `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`, `Mask2FormerMaskPredictor`,
            `nn.MultiheadAttention`, the MLPs' GELU), the reference the fast paths are tested against. Same weights
            and state-dict keys either way, same outputs up to float rounding.
    """

    model_type = "possam"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(SamVisionConfig),
        "text_config": SubConfigSpec(CLIPTextConfig, init_kwargs=dict(CONVNEXT_LARGE_D_320_TEXT)),
    }

    # What may be passed in (as in CLIPConfig); `__post_init__` turns dicts and None into config objects, so read
    # them through `sam_vision_config` / `clip_text_config` where the static type matters.
    vision_config: dict | SamVisionConfig | None = None
    text_config: dict | CLIPTextConfig | None = None

    clip_vision_model_name: str = "convnext_large_mlp"
    clip_vision_model_kwargs: dict | None = None
    clip_embed_dim: int = 768
    clip_logit_scale_init: float = math.log(1 / 0.07)
    sam_image_mean: float | list[float] | tuple[float, ...] = tuple(IMAGENET_MEAN)
    sam_image_std: float | list[float] | tuple[float, ...] = tuple(IMAGENET_STD)
    clip_image_mean: float | list[float] | tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    clip_image_std: float | list[float] | tuple[float, ...] = tuple(OPENAI_CLIP_STD)

    fpn_out_channels: list[int] | tuple[int, ...] = (192, 384, 768, 1536)

    # Mask2Former pixel decoder + masked-attention decoder (field names read by the reused modules)
    feature_size: int = 256
    mask_feature_size: int = 256
    hidden_dim: int = 256
    encoder_feedforward_dim: int = 1024
    activation_function: str = "relu"
    encoder_layers: int = 6
    decoder_layers: int = 10
    num_attention_heads: int = 8
    dropout: float = 0.0
    dim_feedforward: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False
    common_stride: int = 4
    num_queries: int = 250
    feature_strides: list[int] | tuple[int, ...] = (4, 8, 16, 32)
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    initializer_range: float = 0.02

    iou_head_hidden_dim: int = 256
    iou_head_depth: int = 3

    ldp_num_heads: int = 8
    ldp_num_layers: int = 1
    logit_scale_init: float = math.log(1 / 0.07)

    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    iou_weight: float = 1.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    use_auxiliary_loss: bool = True
    iou_loss_on_unmatched: bool = False

    training_vocabulary: list[str] | None = None

    use_fast_paths: bool = True

    attribute_map = {"hidden_size": "hidden_dim", "num_hidden_layers": "decoder_layers"}

    def __post_init__(self, **kwargs):
        moved = {name: kwargs.pop(name) for name in ("mase_alpha", "mase_beta") if name in kwargs}
        if moved:
            # MASE's weights are post-processing settings, owned by the image processor (preprocessor_config.json);
            # configs written before that still load, with a warning that their values are not used
            logger.warning(
                "Ignoring %s in the model config: MASE's weights live in the image processor "
                "(PosSAMImageProcessor(mase_alpha=..., mase_beta=...), saved in preprocessor_config.json); set them "
                "there and remove them from config.json.",
                moved,
            )
        if isinstance(self.text_config, dict):
            # A partial dict means "convnext_large_d_320 with these changes", not "CLIPTextConfig defaults".
            self.text_config = {**CONVNEXT_LARGE_D_320_TEXT, **self.text_config}
        self._set_labels(kwargs.get("num_labels"))
        self.clip_vision_model_kwargs = dict(self.clip_vision_model_kwargs or {})
        for name in ("sam_image_mean", "sam_image_std", "clip_image_mean", "clip_image_std"):
            value = getattr(self, name)
            setattr(self, name, value if isinstance(value, (int, float)) else list(value))
        for name in ("fpn_out_channels", "feature_strides"):
            setattr(self, name, list(getattr(self, name)))
        super().__post_init__(**kwargs)

    def _set_labels(self, num_labels: int | None) -> None:
        """
        `training_vocabulary` and `id2label` / `label2id` are two views of one list, the model's default vocabulary:
        label k is the first synonym of `training_vocabulary[k]`. Either may be given (an `id2label` or `num_labels`
        alone defines the vocabulary, as for transformers' classifiers); both given must agree. Neither: COCO-133.
        """
        given_labels = None
        if self.id2label is not None:
            given_labels = {int(index): label for index, label in self.id2label.items()}
        if self.training_vocabulary is None:
            if given_labels is not None:
                self.training_vocabulary = [given_labels[index] for index in sorted(given_labels)]
            elif num_labels is not None:
                self.training_vocabulary = [f"LABEL_{index}" for index in range(num_labels)]
            else:
                self.training_vocabulary = list(load_vocabulary("coco_panoptic_133").names)
        labels = {index: split_synonyms(name)[0] for index, name in enumerate(self.training_vocabulary)}
        if given_labels is not None and given_labels != labels:
            raise ValueError(
                "PosSAMConfig: id2label must name the classes of training_vocabulary (label k = the first synonym of "
                f"training_vocabulary[k]); got id2label {_preview(given_labels)} for training vocabulary "
                f"{_preview(labels)}. Give one of the two, or both in agreement."
            )
        self.id2label = labels
        self.label2id = {label: index for index, label in labels.items()}

    def set_training_vocabulary(self, names: list[str]) -> None:
        """
        Records the classes a model was (fine-)tuned on: `training_vocabulary` (MASE's seen / unseen split reads it)
        and its views `id2label` / `label2id`, together. The model's default text embeddings follow with
        `PosSAMForPanopticSegmentation.set_default_vocabulary`.
        """
        self.training_vocabulary = list(names)
        self.id2label = None
        self._set_labels(None)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """
        `PreTrainedConfig.save_pretrained`, and the checkpoint's code for `trust_remote_code=True`: the package's
        modules, flattened (`remote_code.export_remote_code`), with `auto_map` and `custom_pipelines` in
        `config.json`. A model's `save_pretrained` / `push_to_hub` saves its config through here.
        """
        remote_code = export_code(save_directory)
        if remote_code is not None:
            self.auto_map = copy.deepcopy(remote_code.AUTO_MAP)
            self.__dict__["custom_pipelines"] = copy.deepcopy(remote_code.CUSTOM_PIPELINES)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def custom_pipelines(self) -> dict:
        """
        The pipelines `config.json` declares for remote code (transformers' `pipeline()` reads this attribute).
        Empty when this class is the installed package's: a declared task makes `pipeline()` demand
        `trust_remote_code=True` for it, while the installed package registers the task itself.
        """
        return {} if IS_INSTALLED_PACKAGE else self.__dict__.get("custom_pipelines", {})

    @custom_pipelines.setter
    def custom_pipelines(self, value: dict) -> None:
        # kept in __dict__, which `to_dict` (and so config.json) serializes
        self.__dict__["custom_pipelines"] = value

    @property
    def sam_vision_config(self) -> SamVisionConfig:
        """`vision_config`, typed: a `SamVisionConfig` once the config is built (the field also takes a dict)."""
        return _built_sub_config(self, "vision_config", SamVisionConfig)

    @property
    def clip_text_config(self) -> CLIPTextConfig:
        """`text_config`, typed: a `CLIPTextConfig` once the config is built (the field also takes a dict)."""
        return _built_sub_config(self, "text_config", CLIPTextConfig)

    @property
    def mask2former_config(self) -> Mask2FormerConfig:
        """
        The `Mask2FormerConfig` of the reused Mask2Former modules (pixel decoder, transformer module, their weight
        init, the criterion `PosSAMLoss`): the fields of `MASK2FORMER_FIELDS`, taken from this config each time it is
        read (a new object, never serialized: `config.json` keeps the flat fields, so there is one copy of each
        hyper-parameter). Its other
        fields (the Swin `backbone_config`, `num_labels`, output flags) are `Mask2FormerConfig`'s defaults, which the
        reused modules do not read (`PosSAMModel` passes their output flags explicitly).
        """
        return Mask2FormerConfig(**{name: getattr(self, name) for name in MASK2FORMER_FIELDS})

    def validate_architecture(self):
        """Checks that the sizes fit together; raises ValueError with what to change."""
        if len(self.fpn_out_channels) != 4 or len(self.feature_strides) != 4:
            raise ValueError("fpn_out_channels and feature_strides need 4 entries (strides 4, 8, 16, 32).")
        if list(self.feature_strides) != [4, 8, 16, 32]:
            raise ValueError(
                f"PosSAM's FPN produces strides (4, 8, 16, 32), got feature_strides={self.feature_strides}."
            )
        patch_size = self.sam_vision_config.patch_size
        if patch_size != 16:
            raise ValueError(
                f"The FPN expects SAM features at stride 16 (patch_size 16), got patch_size={patch_size}."
            )
        for name in ("feature_size", "mask_feature_size"):
            if getattr(self, name) % 32:
                raise ValueError(
                    f"{name}={getattr(self, name)} must be a multiple of 32 (Mask2Former's GroupNorm(32))."
                )
        if self.clip_text_config.projection_dim != self.clip_embed_dim:
            raise ValueError(
                f"text_config.projection_dim ({self.clip_text_config.projection_dim}) must equal clip_embed_dim "
                f"({self.clip_embed_dim}): image and text embeddings share one space."
            )
        if self.clip_embed_dim % self.ldp_num_heads:
            raise ValueError(
                f"clip_embed_dim={self.clip_embed_dim} must be divisible by ldp_num_heads={self.ldp_num_heads}."
            )
        if self.decoder_layers < 2:
            raise ValueError("decoder_layers counts the query prediction plus the transformer layers: use >= 2.")


def _preview(labels: dict[int, str], count: int = 4) -> str:
    shown = ", ".join(f"{index}: {label!r}" for index, label in list(labels.items())[:count])
    return f"{{{shown}{', ...' if len(labels) > count else ''}}} ({len(labels)} labels)"


def default_vocabulary_shape(config: PosSAMConfig) -> tuple[int, int]:
    """(classes, synonym slots) of the default vocabulary `config.training_vocabulary`, as the processor splits it."""
    synonyms = [split_synonyms(name) for name in config.training_vocabulary or ()]
    return len(synonyms), max((len(names) for names in synonyms), default=0)


def _built_sub_config(config: PosSAMConfig, name: str, config_class: type[_SubConfigT]) -> _SubConfigT:
    """`config.<name>` as built by `__post_init__`; TypeError if it was replaced by something else afterwards."""
    sub_config = getattr(config, name)
    if not isinstance(sub_config, config_class):
        raise TypeError(
            f"PosSAMConfig.{name} must be a {config_class.__name__} once the config is built, got "
            f"{type(sub_config).__name__}: pass a dict to PosSAMConfig({name}=...) instead of assigning one later."
        )
    return sub_config


def tiny_config(**overrides: Any) -> PosSAMConfig:
    """
    A PosSAM small enough for CPU tests and the demo (128x128 input, ~5M parameters): a 2-layer SAM ViT, timm
    `convnext_atto` CLIP with an MLP head, a 2-layer text tower, 1 deformable encoder layer, 2 decoder layers, 8 queries.
    `SamVisionConfig`'s default `initializer_range=1e-10` would make a random SAM encoder output a constant, so the
    tiny encoder uses 0.02.
    """
    defaults: dict[str, Any] = {
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": 128,
            "patch_size": 16,
            "output_channels": 32,
            "window_size": 4,
            "global_attn_indexes": [1],
            "initializer_range": 0.02,
        },
        "text_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
        },
        "clip_vision_model_name": "convnext_atto",
        "clip_vision_model_kwargs": {"head_hidden_size": 320},
        "clip_embed_dim": 32,
        "fpn_out_channels": [32, 32, 64, 64],
        "feature_size": 32,
        "mask_feature_size": 32,
        "hidden_dim": 32,
        "encoder_feedforward_dim": 64,
        "encoder_layers": 1,
        "decoder_layers": 3,
        "num_attention_heads": 2,
        "dim_feedforward": 64,
        "num_queries": 8,
        "iou_head_hidden_dim": 32,
        "ldp_num_heads": 2,
        "train_num_points": 256,
    }
    defaults.update(overrides)
    return PosSAMConfig(**defaults)
