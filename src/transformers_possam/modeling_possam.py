"""PosSAM: Panoptic Open-vocabulary Segment Anything (Vibashan VS et al., 2024) as a transformers model.

Data flows one way: pixels -> frozen SAM ViT -> PosSAMFPN -> Mask2Former pixel decoder -> masked-attention decoder
-> class-agnostic masks + IoU head (`PosSAMModel`); then frozen CLIP -> Local Discriminative Pooling -> open-vocabulary
class logits against CLIP text embeddings (`PosSAMForPanopticSegmentation`).
"""

import difflib
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from timm.layers.grn import GlobalResponseNorm
from timm.models.convnext import ConvNeXtBlock
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerPredictionBlock,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)
from transformers.models.sam.modeling_sam import SamVisionEncoder
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple

from .configuration_possam import PosSAMConfig, default_vocabulary_shape
from .device_transfer import to_device
from .modeling import (
    LocalDiscriminativePooling,
    PosSAMCLIP,
    PosSAMFPN,
    PosSAMIoUHead,
    PosSAMLoss,
    PosSAMMaskedAttentionDecoderLayer,
    PosSAMMaskPredictor,
    PosSAMOpenVocabularyClassifier,
)
from .modeling.fast_paths import install_fast_paths, take_over
from .modeling.loss import LossNormalizers
from .modeling.mlp import install_mlp_fast_paths
from .value_checks import all_finite, require
from .vocabularies import Vocabulary


__all__ = [
    "PosSAMForPanopticSegmentation",
    "PosSAMForPanopticSegmentationOutput",
    "PosSAMModel",
    "PosSAMModelOutput",
    "PosSAMPreTrainedModel",
]

# Mask2Former modules whose initialization we take from Mask2FormerPreTrainedModel._init_weights.
_MASK2FORMER_INIT_TYPES = (
    Mask2FormerTransformerModule,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerPixelDecoder,
    Mask2FormerPredictionBlock,
)


# ----------------------------------------------------------------------------------------------------------------------
# Input validation: every user-facing input either passes or raises TypeError (not a tensor / not a bool / an unknown
# keyword) or ValueError (wrong shape, dtype or values) naming the argument and what was expected.
# ----------------------------------------------------------------------------------------------------------------------

# Keyword arguments transformers passes to any model's forward (Trainer's `num_items_in_batch`, the common tests'
# output flags): accepted and, where PosSAM has no use for them, ignored.
# Also accepted and ignored: what PosSAMProcessor returns besides the model inputs, so `model(**processor(...))` works
# (as with SamModel), and `use_cache`, which generic code passes to any model.
_TRANSFORMERS_KWARGS = frozenset(TransformersKwargs.__annotations__) | {
    "original_sizes",
    "reshaped_input_sizes",
    "use_cache",
}
# Names users bring from other segmentation models, with what PosSAM takes instead.
_KEYWORD_HINTS = {
    "labels": "PosSAM trains on mask_labels (per image a (num_segments, H, W) binary mask tensor) and class_labels "
    "(per image a (num_segments,) tensor of class indices), as PosSAMImageProcessor returns them",
}


# What the CLIP towers' `get_*_features` pass on: transformers' common kwargs only (the tower reads the output flags).
_FEATURE_KWARGS = frozenset(TransformersKwargs.__annotations__)


def _reject_unknown_kwargs(
    function: Callable, kwargs: Mapping[str, Any], allowed: frozenset[str] = _TRANSFORMERS_KWARGS
) -> None:
    """
    TypeError for a keyword that is neither an explicit parameter of `function` (those never reach its `**kwargs`)
    nor one of `allowed` (transformers' common model kwargs); the message suggests the closest parameter name.
    """
    unknown = [name for name in kwargs if name not in allowed]
    if not unknown:
        return
    name = unknown[0]
    signature = inspect.signature(function).parameters.values()
    parameters = [p.name for p in signature if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    hint = _KEYWORD_HINTS.get(name)
    if hint is None:
        close = difflib.get_close_matches(name, parameters, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(parameters)}"
    raise TypeError(f"{function.__qualname__}() got an unexpected keyword argument {name!r}: {hint}.")


def _checking_values() -> bool:
    """
    False while torch.compile / torch.export / TorchScript trace the model: checks that read tensor values (NaN, id
    ranges, 0/1 masks) are data-dependent branches that would break the graph, so only shape / dtype checks run then.
    Otherwise the value checks run through `value_checks.require`: a detailed ValueError at once on CPU, a
    `torch._assert_async` without host synchronization on CUDA (`value_checks.value_checks` chooses).
    """
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _check_flags(**flags) -> None:
    """TypeError unless every flag is True, False or None (a string "False" or a tensor would silently count as true)."""
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be True, False or None, got {value!r} ({type(value).__name__}).")


def _check_pixel_values(
    pixel_values, *, num_channels: int, dtype: torch.dtype, image_size: tuple[int, int] | None, min_size: int = 1
) -> None:
    """
    Structural checks of `(B, C, H, W)` pixels, O(1): type, rank, channels, size (`image_size`: exactly, else at least
    `min_size`), non-empty batch, floating dtype equal to the model's `dtype`. Finiteness is checked by the caller
    that consumes the pixels (one pass over them).
    """
    expected = f"(batch_size, {num_channels}, height, width)"
    if image_size is not None:
        expected = f"(batch_size, {num_channels}, {image_size[0]}, {image_size[1]})"
    if not torch.is_tensor(pixel_values):
        raise TypeError(
            f"pixel_values must be a torch.Tensor of shape {expected} (PosSAMImageProcessor with return_tensors='pt'), "
            f"got {type(pixel_values).__name__}."
        )
    shape = tuple(pixel_values.shape)
    if pixel_values.dim() != 4:
        single_image = " (one image: add the batch dimension, pixel_values[None])" if pixel_values.dim() == 3 else ""
        raise ValueError(f"pixel_values must have shape {expected}, got {shape}{single_image}.")
    if shape[1] != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} (RGB) channels, shape {expected}; got shape {shape}.")
    if image_size is not None and shape[2:] != tuple(image_size):
        raise ValueError(
            f"pixel_values must be padded to the SAM input size {tuple(image_size)}, shape {expected}; got shape "
            f"{shape}. PosSAMImageProcessor resizes and pads images to it."
        )
    if min(shape[2:]) < min_size:
        raise ValueError(
            f"pixel_values must be at least {min_size}x{min_size} pixels, shape {expected}; got shape {shape}."
        )
    if shape[0] == 0:
        raise ValueError(f"pixel_values holds no image: shape {expected} needs batch_size >= 1, got shape {shape}.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must hold normalized floating-point pixels (PosSAMImageProcessor's output), got dtype "
            f"{pixel_values.dtype}: raw 0-255 images have to go through the image processor first."
        )
    if pixel_values.dtype != dtype:
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype} but the model's weights are {dtype}: pass "
            f"pixel_values.to({dtype}) (or cast the model with model.to({pixel_values.dtype}))."
        )


def _check_finite(name: str, values: torch.Tensor) -> None:
    """ValueError if `values` holds NaN or +-inf (one pass): they would spread through every output silently."""
    if _checking_values():
        require(all_finite(values), f"{name} contains NaN or infinite values.")


def _check_binary_mask(name: str, mask, expected_shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """
    A mask tensor of exactly `expected_shape` (`layout` names its dimensions), bool or any real dtype holding only 0
    and 1; returned as bool. TypeError if it is not a tensor, ValueError otherwise.
    """
    if not torch.is_tensor(mask):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape {layout} = {expected_shape}, got {type(mask).__name__}."
        )
    if tuple(mask.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected_shape)}, got {tuple(mask.shape)}.")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got dtype {mask.dtype}.")
    if mask.numel() and _checking_values():

        def error() -> ValueError:
            other = mask[(mask != 0) & (mask != 1)].flatten()[:3].tolist()
            return ValueError(
                f"{name} must be bool or hold only 0 and 1, got dtype {mask.dtype} with values like {other}."
            )

        require(_is_binary(mask), f"{name} must be bool or hold only 0 and 1 (dtype {mask.dtype}).", error)
    return mask.bool()


def _is_binary(mask: torch.Tensor) -> torch.Tensor:
    """0-d bool on `mask`'s device: a non-empty real `mask` holds only 0 and 1 (NaN and 0.5 are neither)."""
    if mask.is_floating_point():
        return ((mask == 0) | (mask == 1)).all()
    low, high = torch.aminmax(mask)  # integers: the extremes decide, without a full-size temporary
    return (low >= 0) & (high <= 1)


def _check_image_targets(index: int, masks: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """
    The value checks of one image's training targets: `masks` bool or only 0 and 1 (0/255 masks would silently give a
    near-zero dice loss, NaN a NaN loss), `labels` (int64) within the `num_classes` classes. Run after the forward,
    just before the loss: eager (the detailed errors) on every device by default, since the matching reads the
    device right after (`synchronizes_anyway`); `torch._assert_async` under `value_checks("async")`.
    """
    if masks.dtype != torch.bool and masks.numel():

        def mask_error() -> ValueError:
            bad = masks[(masks != 0) & (masks != 1)]  # NaN too
            return ValueError(
                f"Image {index}: mask_labels must be bool or hold only 0 and 1, got {bad.numel()} other values "
                f"(e.g. {bad.flatten()[:3].tolist()}); divide 0/255 masks by 255, binarize soft or resized masks."
            )

        require(
            _is_binary(masks),
            f"Image {index}: mask_labels must be bool or hold only 0 and 1; divide 0/255 masks by 255, binarize soft "
            "or resized masks.",
            mask_error,
            synchronizes_anyway=True,
        )
    if labels.numel():
        low, high = torch.aminmax(labels)

        def label_error() -> ValueError:
            return ValueError(
                f"Image {index}: class_labels must index the {num_classes} classes of the vocabulary, got values in "
                f"[{int(low)}, {int(high)}]."
            )

        require(
            (low >= 0) & (high < num_classes),
            f"Image {index}: class_labels must index the {num_classes} classes of the vocabulary.",
            label_error,
            synchronizes_anyway=True,
        )


def _require_config_file(pretrained_model_name_or_path, kwargs: dict) -> None:
    """
    Without `config.json`, transformers would build a *default* (full-size, random) configuration and spend seconds
    constructing that model before failing on mismatched weights: refuse at once, naming the folder or repo.
    """
    from transformers.utils import CONFIG_NAME, cached_file

    options = {
        key: kwargs[key]
        for key in ("cache_dir", "revision", "subfolder", "token", "local_files_only")
        if key in kwargs
    }
    try:
        found = cached_file(
            pretrained_model_name_or_path, CONFIG_NAME, _raise_exceptions_for_missing_entries=False, **options
        )
    except OSError:
        return  # not reachable (offline, no such repo): transformers' own loading reports that
    if found is None:
        raise OSError(
            f"{pretrained_model_name_or_path} has no {CONFIG_NAME}: a PosSAM checkpoint needs its configuration next to "
            "its weights (save_pretrained writes both), or pass config=PosSAMConfig(...) explicitly."
        )


@dataclass
class PosSAMModelOutput(ModelOutput):
    r"""
    Output of [`PosSAMModel`]. Q = `num_queries`, L = `decoder_layers` (the prediction from the learnable queries
    plus one per transformer layer), input `(B, 3, H, W)`.

    image_embeddings (`torch.FloatTensor` of shape `(B, 256, H/16, W/16)`): F_sam, the frozen SAM encoder's output.
    fpn_features (`tuple(torch.FloatTensor)`): F_ms, 4 maps at strides 4, 8, 16, 32 (`fpn_out_channels` wide).
    multi_scale_features (`tuple(torch.FloatTensor)`): the pixel decoder's 3 maps `(B, feature_size, H/s, W/s)`,
        s = 32, 16, 8.
    mask_features (`torch.FloatTensor` of shape `(B, mask_feature_size, H/4, W/4)`): per-pixel mask features
        (F_masked's spatial part).
    masks_queries_logits (`tuple(torch.FloatTensor)`): L tensors `(B, Q, H/4, W/4)`, mask logits per layer, last = final
        (with `output_auxiliary_masks=False` only the last is computed; the others are None).
    query_states (`tuple(torch.FloatTensor)`): L tensors `(B, Q, hidden_dim)`, layer-normed decoder query states.
    iou_logits (`tuple(torch.FloatTensor)`): L tensors `(B, Q)`, IoU head logits (sigmoid = predicted IoU) per layer,
        last = final (with `output_auxiliary_masks=False` only the last is computed; the others are None).

    With `output_hidden_states` / `output_attentions` (or the config's flags), the states named as in SAM
    (`vision_hidden_states`) and Mask2Former (the others):

    vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*): SAM ViT states `(B, H/16, W/16, hidden_size)`,
        the patch embeddings and each layer's output (`vision_config.num_hidden_layers + 1`).
    encoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the multi-scale backbone maps the pixel decoder
        reads (Mask2Former's backbone features): here the FPN's 4 maps, strides 4, 8, 16, 32 (= `fpn_features`).
    pixel_decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the pixel decoder's 3 maps
        `(B, feature_size, H/s, W/s)`, s = 32, 16, 8 (= `multi_scale_features`, as in Mask2Former).
    transformer_decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): raw decoder states
        `(Q, B, hidden_dim)`: the learnable queries and each transformer layer's output (`decoder_layers` tensors).
    attentions (`tuple(torch.FloatTensor)`, *optional*): per transformer layer, its self-attention weights
        `(B, num_attention_heads, Q, Q)` (Mask2Former's decoder keeps those; `decoder_layers - 1` tensors).
    """

    image_embeddings: torch.Tensor | None = None
    fpn_features: tuple[torch.Tensor, ...] | None = None
    multi_scale_features: tuple[torch.Tensor, ...] | None = None
    mask_features: torch.Tensor | None = None
    masks_queries_logits: tuple[torch.Tensor | None, ...] | None = None
    query_states: tuple[torch.Tensor, ...] | None = None
    iou_logits: tuple[torch.Tensor | None, ...] | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class PosSAMForPanopticSegmentationOutput(ModelOutput):
    r"""
    Output of [`PosSAMForPanopticSegmentation`]. Q queries, K classes of the vocabulary (S synonym slots each), D the
    CLIP embedding size, input `(B, 3, H, W)`.

    loss (`torch.FloatTensor`, *optional*): weighted total loss, when `mask_labels` and `class_labels` are given.
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*): the unweighted parts (`loss_cross_entropy`, `loss_mask`,
        `loss_dice`, `loss_iou`, and `_{i}` copies per auxiliary layer).
    class_queries_logits (`torch.FloatTensor` of shape `(B, Q, K + 1)`): in-vocabulary (LDP) logits, void last.
    clip_class_logits (`torch.FloatTensor` of shape `(B, Q, K)`, *optional*): out-of-vocabulary logits of the frozen
        CLIP on mask-pooled dense features (computed in eval mode, or with `return_clip_logits=True`).
    masks_queries_logits (`torch.FloatTensor` of shape `(B, Q, H/4, W/4)`): final mask logits.
    iou_scores (`torch.FloatTensor` of shape `(B, Q)`): predicted IoU of each mask, in [0, 1].
    auxiliary_logits (`list[dict]`, *optional*): per earlier decoder layer, `class_queries_logits`,
        `masks_queries_logits` and `iou_logits` (for deep supervision).
    ldp_embeddings (`torch.FloatTensor` of shape `(B, Q, D)`): G_ldp.
    clip_embeddings (`torch.FloatTensor` of shape `(B, Q, D)`, *optional*): G_clip (with `clip_class_logits`).
    class_embeddings (`torch.FloatTensor` of shape `(K, S, D)`): the L2-normalized text embeddings used (slots that
        the input `synonym_mask` marks as padding are not used). The synonym mask itself is an input, not returned.
    image_embeddings (`torch.FloatTensor` of shape `(B, 256, H/16, W/16)`): F_sam.
    mask_features (`torch.FloatTensor` of shape `(B, mask_feature_size, H/4, W/4)`): per-pixel mask features.
    clip_features (`torch.FloatTensor` of shape `(B, C_clip, H/32, W/32)`): F_clip, CLIP's dense features.
    vision_hidden_states, encoder_hidden_states, pixel_decoder_hidden_states, transformer_decoder_hidden_states,
    attentions (*optional*): the mask generator's states with `output_hidden_states` / `output_attentions`, as in
        [`PosSAMModelOutput`] (Mask2Former's names; SAM's for the ViT).
    """

    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None
    class_queries_logits: torch.Tensor | None = None
    clip_class_logits: torch.Tensor | None = None
    masks_queries_logits: torch.Tensor | None = None
    iou_scores: torch.Tensor | None = None
    auxiliary_logits: list[dict[str, torch.Tensor]] | None = None
    ldp_embeddings: torch.Tensor | None = None
    clip_embeddings: torch.Tensor | None = None
    class_embeddings: torch.Tensor | None = None
    image_embeddings: torch.Tensor | None = None
    mask_features: torch.Tensor | None = None
    clip_features: torch.Tensor | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    encoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    pixel_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    transformer_decoder_hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class PosSAMPreTrainedModel(PreTrainedModel):
    config: PosSAMConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    # a tuple, as Mask2Former's, SAM's and CLIP's models declare it (the base class annotates `str | list[str]`,
    # narrower than transformers' own models and its readers, which only test membership)
    input_modalities = ("image",)  # type: ignore[assignment]
    _no_split_modules = ["SamVisionLayer", "Mask2FormerMaskedAttentionDecoderLayer", "CLIPEncoderLayer"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    @classmethod
    def is_custom_code(cls) -> bool:
        """
        False: transformers takes every model defined outside its package for remote code, and then (at weight
        initialization) skips every module without parameters of its own, assuming remote code may write weights
        without transformers' guarded init functions. That skipped exactly the modules whose `_init_weights` sets
        their children: Mask2Former's deformable attention (its sampling-offset grid), decoder layers and transformer
        module, CLIP's attention and MLP blocks, leaving them at a generic init. PosSAM's `_init_weights`, and the
        Mask2Former / CLIP / SAM ones it dispatches to, use only the guarded functions (`transformers.initialization`).
        """
        return False

    def _init_weights(self, module: nn.Module):
        if isinstance(module, _MASK2FORMER_INIT_TYPES):
            # Mask2Former's own init scheme for the Mask2Former modules we reuse, by a Mask2FormerPreTrainedModel of
            # the config they were built from (a parameterless module: building it costs well under a millisecond)
            Mask2FormerPreTrainedModel(self.config.mask2former_config)._init_weights(module)
            if isinstance(module, Mask2FormerTransformerModule):
                # The original keeps nn.Embedding's N(0, 1) init for queries and level embeddings.
                for embedding in (module.queries_embedder, module.queries_features, module.level_embed):
                    init.normal_(embedding.weight, mean=0.0, std=1.0)
        elif isinstance(module, PosSAMCLIP):
            init.constant_(module.logit_scale, self.config.clip_logit_scale_init)
            # the CLIP text tower is a transformers CLIP model: its own `_init_weights` (CLIP's scheme) covers it
        elif isinstance(module, ConvNeXtBlock):
            # timm fills the layer scale at construction only (`ls_init_value`), never in its init functions; a block
            # has one exactly when the CLIP image tower was built with a layer-scale value
            layer_scale_init_value = cast(PosSAMCLIP, self.clip).layer_scale_init_value
            if module.gamma is not None and layer_scale_init_value is not None:
                init.constant_(module.gamma, layer_scale_init_value)
        elif isinstance(module, GlobalResponseNorm):  # ConvNeXt-V2 towers: timm creates it as zeros (an identity)
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LocalDiscriminativePooling):
            init.normal_(module.stream_embeddings.weight, std=self.config.init_std)
        elif isinstance(module, PosSAMForPanopticSegmentation):
            # the default vocabulary's embeddings are computed from text (set_default_vocabulary), never initialized:
            # zeros mark them as not computed
            init.zeros_(module.default_class_embeddings)
        elif isinstance(module, PosSAMOpenVocabularyClassifier):
            init.constant_(module.logit_scale, self.config.logit_scale_init)
            init.normal_(module.void_embedding.weight, std=self.config.init_std)
        else:
            super()._init_weights(module)

    def _frozen_submodules(self) -> list[nn.Module]:
        return []

    def freeze_frozen_parts(self) -> None:
        """`requires_grad=False` on the paper's frozen set: the SAM encoder and the whole CLIP."""
        for module in self._frozen_submodules():
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            _require_config_file(pretrained_model_name_or_path, kwargs)
        # Loading swaps in new Parameter objects (requires_grad=True): re-apply the frozen set afterwards.
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_frozen_parts()
        return loaded

    def train(self, mode: bool = True):
        """Like `nn.Module.train`, but fully frozen parts (SAM encoder, CLIP) always stay in eval mode."""
        super().train(mode)
        self._set_frozen_parts_mode()
        return self

    def _set_frozen_parts_mode(self) -> None:
        """
        Each part of the frozen set runs in eval mode while all its parameters are frozen (a frozen CLIP must not
        apply dropout or stochastic depth), in the model's mode otherwise. Decided by `train()` and again at every
        forward, so a part unfrozen after `model.train()` trains (and is gradient-checkpointed) without another call.
        """
        for module in self._frozen_submodules():
            mode = self.training and any(parameter.requires_grad for parameter in module.parameters())
            if module.training != mode:
                module.train(mode)


class PosSAMModel(PosSAMPreTrainedModel):
    """
    The class-agnostic mask generator of PosSAM (paper §3.3): frozen SAM ViT encoder -> `PosSAMFPN` -> Mask2Former
    pixel decoder (multi-scale deformable attention) -> masked-attention transformer decoder -> per-query masks at
    every decoder layer, plus `PosSAMIoUHead` scoring each mask.
    """

    def __init__(self, config: PosSAMConfig):
        super().__init__(config)
        config.validate_architecture()
        vision_config = config.sam_vision_config
        self.vision_encoder = SamVisionEncoder(vision_config)
        self.fpn = PosSAMFPN(vision_config.output_channels, config.fpn_out_channels)
        # Mask2Former's modules get a real Mask2FormerConfig, derived from PosSAMConfig's fields (the only copy)
        mask2former_config = config.mask2former_config
        self.pixel_decoder = Mask2FormerPixelDecoder(
            mask2former_config, feature_channels=list(config.fpn_out_channels)
        )
        # transformers allocates `level_embed` with the legacy `torch.Tensor(...)` constructor, which ignores a
        # `with torch.device(...)` context: a model built under `torch.device("cuda")` kept this one parameter on
        # the CPU (and `from_pretrained`'s meta-device build allocated it). Same shape and dtype, no random draw
        # either way; `_init_weights` initializes it.
        self.pixel_decoder.level_embed = nn.Parameter(
            torch.empty(tuple(self.pixel_decoder.level_embed.shape), dtype=self.pixel_decoder.level_embed.dtype)
        )
        self.transformer_module = Mask2FormerTransformerModule(
            in_features=mask2former_config.feature_size, config=mask2former_config
        )
        decoder = self.transformer_module.decoder
        for index, layer in enumerate(decoder.layers):
            # gradient checkpointing in PyTorch's reentrant mode too: the layer's level reaches it as tensors (a
            # correctness fix, not a fast path: installed whatever `use_fast_paths` says)
            decoder.layers[index] = take_over(layer, PosSAMMaskedAttentionDecoderLayer, mask2former_config)
        if config.use_fast_paths:
            # same-parameter replacements of four library modules, faster or leaner (docs/design.md, "Performance
            # decisions"); each takes over the original's tensors, so construction draws the same random numbers
            # as with transformers' own modules
            install_fast_paths(self)
        self.iou_head = PosSAMIoUHead(config.hidden_dim, config.iou_head_hidden_dim, config.iou_head_depth)
        self.post_init()
        self.freeze_frozen_parts()

    def _frozen_submodules(self) -> list[nn.Module]:
        return [self.vision_encoder]

    def get_input_embeddings(self):
        return self.vision_encoder.get_input_embeddings()

    def _check_pixel_inputs(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> None:
        """
        Raises TypeError / ValueError naming the argument unless `pixel_values` is a floating `(B, C, S, S)` tensor
        (C = `vision_config.num_channels`, S = `vision_config.image_size`, B >= 1) of the SAM encoder's dtype and
        `pixel_mask` is None or a `(B, S, S)` bool / 0-1 tensor. Shape and dtype checks only (O(1)) for `pixel_values`:
        its finiteness is checked where the pixels are consumed.
        """
        vision_config = self.config.sam_vision_config
        # an int: SamVisionConfig itself computes `image_size // patch_size`, which a list or tuple would not survive
        size = cast(int, vision_config.image_size)
        _check_pixel_values(
            pixel_values,
            num_channels=vision_config.num_channels,
            dtype=self.vision_encoder.patch_embed.projection.weight.dtype,
            image_size=(size, size),
        )
        if pixel_mask is not None:
            batch_size, _, height, width = pixel_values.shape
            _check_binary_mask(
                "pixel_mask", pixel_mask, (batch_size, height, width), "(batch_size, height, width) of pixel_values"
            )

    def get_image_embeddings(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """
        F_sam: the SAM encoder output `(B, output_channels, H/16, W/16)`, as `SamModel.get_image_embeddings`.
        `pixel_values` as in `forward` (TypeError / ValueError otherwise).
        """
        _reject_unknown_kwargs(PosSAMModel.get_image_embeddings, kwargs)
        self._check_pixel_inputs(pixel_values)
        _check_finite("pixel_values", pixel_values)
        return self.vision_encoder(pixel_values, **kwargs).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        output_auxiliary_masks: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PosSAMModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): SAM-normalized, padded to SAM's input size
                S = `config.vision_config.image_size` (`PosSAMImageProcessor`), in the model's dtype, finite.
            pixel_mask (`torch.LongTensor` of shape `(B, S, S)`, *optional*): 1 on real pixels, 0 on padding (bool or
                any 0/1 tensor). SAM sees padding as image content (as in SAM and FC-CLIP), so the mask generator does
                not use it.
            output_auxiliary_masks (`bool`, defaults to True): compute every decoder layer's 1/4-resolution masks
                (needed by the auxiliary losses). With False only the last layer's are computed, the intermediate
                layers build their attention masks at attention resolution (`PosSAMMaskPredictor`), and the earlier
                entries of `masks_queries_logits` and `iou_logits` are None (the IoU head scores the last layer
                only). The final masks and scores are the same either way. With
                `config.use_fast_paths=False` (transformers' mask predictor) every layer's masks are still computed
                and the intermediate ones dropped: the same outputs, without the saving.
            kwargs: transformers' common model kwargs (`TransformersKwargs`, e.g. `num_items_in_batch`), accepted and
                unused.

        Raises:
            TypeError: `pixel_values` / `pixel_mask` not a tensor, a flag not a bool (or None), or an unknown keyword
                argument.
            ValueError: `pixel_values` of another rank, channel count, size, dtype than described, an empty batch,
                NaN / inf values; `pixel_mask` of another shape than `(B, S, S)` or with values other than 0 and 1.
            RuntimeError: on CUDA, the value checks (NaN / inf, 0/1 masks) are asynchronous device asserts by default
                (no host synchronization): a failing one surfaces later as a device-side assert, without the message.
                Run under `transformers_possam.value_checks("eager")` for the ValueError above (`value_checks.py`).
        """
        _reject_unknown_kwargs(PosSAMModel.forward, kwargs)
        _check_flags(
            output_hidden_states=output_hidden_states, output_attentions=output_attentions, return_dict=return_dict
        )
        if not isinstance(output_auxiliary_masks, bool):
            raise TypeError(f"output_auxiliary_masks must be True or False, got {output_auxiliary_masks!r}.")
        self._check_pixel_inputs(pixel_values, pixel_mask)
        _check_finite("pixel_values", pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        self._set_frozen_parts_mode()
        vision_outputs = self.vision_encoder(pixel_values, output_hidden_states=output_hidden_states)
        image_embeddings = vision_outputs.last_hidden_state
        fpn_features = self.fpn(image_embeddings)
        # the pixel decoder's own attentions and states are not outputs of PosSAM: not computed
        pixel_decoder_output = self.pixel_decoder(
            fpn_features, output_attentions=False, output_hidden_states=False, return_dict=True
        )
        mask_features = pixel_decoder_output.mask_features
        multi_scale_features = pixel_decoder_output.multi_scale_features
        predictor = self.transformer_module.decoder.mask_predictor
        # Without auxiliary masks, PosSAM's predictor (a fast path) builds the intermediate layers' attention masks
        # from features resized once per attention size: the request is the argument itself (the decoder hands its
        # mask-feature argument to the predictor only), no module is told anything.
        attention_masks_only = not output_auxiliary_masks and isinstance(predictor, PosSAMMaskPredictor)
        decoder_output = self.transformer_module(
            multi_scale_features=multi_scale_features,
            mask_features=(
                PosSAMMaskPredictor.attention_mask_features(
                    mask_features, [features.shape[-2:] for features in multi_scale_features]
                )
                if attention_masks_only
                else mask_features
            ),
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        masks_queries_logits = decoder_output.masks_queries_logits
        if attention_masks_only:
            final_masks = cast(PosSAMMaskPredictor, predictor).predict_masks(
                decoder_output.intermediate_hidden_states[-1], mask_features
            )
            masks_queries_logits = masks_queries_logits[:-1] + (final_masks,)
        elif not output_auxiliary_masks:
            # transformers' predictor (use_fast_paths=False) computed every layer's masks: the same outputs as the
            # fast path, the intermediate ones left out
            masks_queries_logits = (None,) * (len(masks_queries_logits) - 1) + masks_queries_logits[-1:]
        query_states = tuple(states.transpose(0, 1) for states in decoder_output.intermediate_hidden_states)
        if output_auxiliary_masks:
            iou_logits: tuple[torch.Tensor | None, ...] = tuple(self.iou_head(states) for states in query_states)
        else:
            # as the masks: only the last layer's scores are read without the auxiliary outputs (MASE, the
            # outputs), and the head on the others would be about 45 kernel launches of a GPU forward at batch 1,
            # which the host's launch rate bounds
            iou_logits = (None,) * (len(query_states) - 1) + (self.iou_head(query_states[-1]),)

        output = PosSAMModelOutput(
            image_embeddings=image_embeddings,
            fpn_features=tuple(fpn_features),
            multi_scale_features=pixel_decoder_output.multi_scale_features,
            mask_features=pixel_decoder_output.mask_features,
            masks_queries_logits=masks_queries_logits,
            query_states=query_states,
            iou_logits=iou_logits,
            vision_hidden_states=vision_outputs.hidden_states if output_hidden_states else None,
            encoder_hidden_states=tuple(fpn_features) if output_hidden_states else None,
            pixel_decoder_hidden_states=pixel_decoder_output.multi_scale_features if output_hidden_states else None,
            transformer_decoder_hidden_states=decoder_output.hidden_states,
            attentions=decoder_output.attentions,
        )
        return output if return_dict else output.to_tuple()


class PosSAMForPanopticSegmentation(PosSAMPreTrainedModel):
    """
    PosSAM for open-vocabulary panoptic / instance / semantic segmentation (paper §3.2-3.5).

    On top of [`PosSAMModel`]: the frozen CLIP (timm ConvNeXt image tower with its CLIP head, HF
    `CLIPTextModelWithProjection` text tower), `LocalDiscriminativePooling` producing G_ldp, and
    `PosSAMOpenVocabularyClassifier`: in-vocabulary logits `cos(G_ldp, G_text) / tau` (learnable tau, learned void
    embedding, max over synonyms) and, at inference, the out-of-vocabulary CLIP logits of mask-pooled dense CLIP
    features through CLIP's own head. MASE (paper Algorithm 1) combines the two in post-processing. The loss follows
    `Mask2FormerForUniversalSegmentation`: `get_auxiliary_logits`, `get_loss_dict`, `get_loss`.

    The vocabulary is an input: tokenized prompts (`input_ids` of shape `(K, S, T, L)`: K classes, S synonym slots,
    T prompt templates, L tokens, with `synonym_mask` `(K, S)`; or `(K, L)` for one prompt per class) or precomputed
    `class_embeddings` `(K, S, D)` / `(K, D)` from [`~PosSAMForPanopticSegmentation.get_class_embeddings`], so a
    vocabulary is encoded once and reused across images.
    """

    # buffer (registered in __init__): the default vocabulary's embeddings (K, S, D), zero at padding slots
    default_class_embeddings: torch.Tensor
    # checkpoints saved before the default vocabulary existed load without it (forward then asks for a vocabulary)
    _keys_to_ignore_on_load_missing = [r"^default_class_embeddings$"]

    def __init__(self, config: PosSAMConfig):
        super().__init__(config)
        self.model = PosSAMModel(config)
        self.clip = PosSAMCLIP(
            config.clip_vision_model_name,
            config.clip_vision_model_kwargs or {},  # always a dict after PosSAMConfig.__post_init__
            config.clip_text_config,
            config.clip_embed_dim,
            config.clip_logit_scale_init,
        )
        if config.use_fast_paths:
            # the ConvNeXt blocks' MLPs in row blocks with GELU in place, as SAM's (`install_fast_paths`); same
            # parameters
            install_mlp_fast_paths(self.clip.vision_model)
        self.ldp = LocalDiscriminativePooling(
            mask_feature_dim=config.mask_feature_size,
            clip_feature_dim=self.clip.dense_feature_dim,
            embed_dim=config.clip_embed_dim,
            num_heads=config.ldp_num_heads,
            num_layers=config.ldp_num_layers,
            dropout=config.dropout,
        )
        self.classifier = PosSAMOpenVocabularyClassifier(config.clip_embed_dim, config.logit_scale_init)
        # The default vocabulary (config.training_vocabulary, whose names are config.id2label): its text embeddings,
        # used when forward gets no vocabulary (transformers' image-segmentation pipeline, the Hub widget). Zeros
        # until `set_default_vocabulary` computes them; saved with the weights. Slots past a class's synonyms stay
        # zero, which is how the synonym mask is read back (a real text embedding is never the zero vector).
        num_classes, num_synonyms = default_vocabulary_shape(config)
        self.register_buffer(
            "default_class_embeddings", torch.zeros(num_classes, num_synonyms, config.clip_embed_dim), persistent=True
        )
        self.criterion = PosSAMLoss.from_possam_config(config)
        self.post_init()
        self.freeze_frozen_parts()

    def _frozen_submodules(self) -> list[nn.Module]:
        return [self.model.vision_encoder, self.clip]

    # ----------------------------------------------------------------------------------------------------------------
    # Public helpers with transformers' names
    # ----------------------------------------------------------------------------------------------------------------
    def get_image_embeddings(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """F_sam `(B, 256, H/16, W/16)`, as `SamModel.get_image_embeddings` (checks as `PosSAMModel.get_image_embeddings`)."""
        return self.model.get_image_embeddings(pixel_values, **kwargs)

    def _check_prompt_ids(self, input_ids: torch.Tensor) -> None:
        """
        ValueError unless the token ids `(..., L)` of the prompts the text tower will encode are integer ids (any
        integer dtype; callers convert to int64) of the tokenizer's vocabulary, at most `max_position_embeddings`
        long, each with CLIP's end-of-text token (the text tower pools there: without it, it would silently pool the
        first token).
        """
        text_config = self.config.clip_text_config
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(
                f"input_ids must hold integer token ids (PosSAMProcessor gives int64), got dtype {input_ids.dtype}."
            )
        if input_ids.shape[-1] > text_config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[-1]} tokens per prompt, more than the text tower's "
                f"max_position_embeddings={text_config.max_position_embeddings}."
            )
        if input_ids.numel() == 0 or not _checking_values():
            return
        low, high = torch.aminmax(input_ids)
        if low < 0 or high >= text_config.vocab_size:
            raise ValueError(
                f"input_ids must be token ids in [0, {text_config.vocab_size - 1}] (text_config.vocab_size="
                f"{text_config.vocab_size}), got values in [{int(low)}, {int(high)}]."
            )
        # one id: CLIP's text tower pools where `input_ids == eos_token_id` (CLIPTextConfig's annotation also allows
        # a list, which that comparison could not use)
        eos_token_id = cast(int, text_config.eos_token_id)
        # eos_token_id == 2 is transformers' legacy CLIP config, which pools at the largest id instead
        if eos_token_id != 2 and not bool((input_ids == eos_token_id).any(-1).all()):
            raise ValueError(
                f"Every prompt in input_ids needs the end-of-text token {eos_token_id}: CLIP's text tower "
                "pools at it. Tokenize with PosSAMProcessor / the CLIP tokenizer (which append it)."
            )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """
        The CLIP text tower on token ids `(N, L)`, with transformers' convention for `get_text_features` (as
        `CLIPModel`): a `BaseModelOutputWithPooling` whose `pooler_output` `(N, D)` holds the projected, unnormalized
        text embeddings (open_clip's `encode_text`), `last_hidden_state` `(N, L, hidden_size)` the final-layer-normed
        token states; `hidden_states` / `attentions` with `output_hidden_states` / `output_attentions` (or the text
        config's flags). `return_dict=False` gives the tuple.

        Raises:
            TypeError: `input_ids` or `attention_mask` is not a tensor, or an unknown keyword argument.
            ValueError: `input_ids` not `(N, L)` with N, L >= 1, not integer ids of the vocabulary, longer than
                `max_position_embeddings`, or a prompt without the end-of-text token; `attention_mask` not of
                `input_ids`' shape or not 0/1.
        """
        _reject_unknown_kwargs(PosSAMForPanopticSegmentation.get_text_features, kwargs, allowed=_FEATURE_KWARGS)
        if not torch.is_tensor(input_ids):
            raise TypeError(
                f"input_ids must be a torch.Tensor of token ids (num_prompts, seq_len), got {type(input_ids).__name__}."
            )
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(
                f"input_ids must have shape (num_prompts, seq_len) with both >= 1, got {tuple(input_ids.shape)}."
            )
        if attention_mask is not None:
            _check_binary_mask(
                "attention_mask", attention_mask, tuple(input_ids.shape), "(num_prompts, seq_len) of input_ids"
            )
        self._check_prompt_ids(input_ids)
        text_outputs = self.clip.text_model(
            input_ids=input_ids.long(),  # the embedding lookup takes int64 / int32
            attention_mask=attention_mask,
            return_dict=True,
            **kwargs,
        )
        return BaseModelOutputWithPooling(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=text_outputs.text_embeds,
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling | tuple:
        """
        The CLIP image tower on SAM-normalized pixels `(B, 3, H, W)` (the processor's output; any size of at least
        CLIP's stride, 32), with transformers' convention for `get_image_features` (as `CLIPModel`): a
        `BaseModelOutputWithPooling` whose `pooler_output` `(B, D)` holds the global CLIP image embeddings (the model
        converts the pixels to CLIP's normalization first, so this equals open_clip's `encode_image` on the
        CLIP-normalized image) and `last_hidden_state` the dense features F_clip `(B, C, H/32, W/32)`. With
        `output_hidden_states` (or `config.output_hidden_states`): the stem's and each stage's output.
        `pixel_mask` `(B, H, W)`, 0 on padding, optional. `return_dict=False` gives the tuple.

        Raises:
            TypeError: `pixel_values` / `pixel_mask` not a tensor, a flag not a bool (or None), or an unknown keyword
                argument.
            ValueError: `pixel_values` not `(B, 3, H, W)` floating point of the CLIP's dtype, empty, smaller than the
                stride or not finite; `pixel_mask` not `(B, H, W)` or not 0/1; `output_attentions=True` (the
                ConvNeXt tower has no attention layers).
        """
        _reject_unknown_kwargs(PosSAMForPanopticSegmentation.get_image_features, kwargs, allowed=_FEATURE_KWARGS)
        output_hidden_states = kwargs.get("output_hidden_states")
        output_attentions = kwargs.get("output_attentions")
        _check_flags(output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if output_attentions:
            raise ValueError(
                "output_attentions=True: the CLIP image tower is a ConvNeXt, it has no attention layers (its stage "
                "outputs come with output_hidden_states=True)."
            )
        vision_model = self.clip.vision_model
        feature_info = getattr(vision_model, "feature_info", None)
        stride = feature_info[-1]["reduction"] if feature_info else 1
        _check_pixel_values(
            pixel_values,
            num_channels=self.config.sam_vision_config.num_channels,
            dtype=next(vision_model.parameters()).dtype,
            image_size=None,
            min_size=stride,
        )
        if pixel_mask is not None:
            batch_size, _, height, width = pixel_values.shape
            _check_binary_mask(
                "pixel_mask", pixel_mask, (batch_size, height, width), "(batch_size, height, width) of pixel_values"
            )
        _check_finite("pixel_values", pixel_values)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        clip_pixels = self.to_clip_pixels(pixel_values, pixel_mask)
        hidden_states = None
        if output_hidden_states:
            dense_features, hidden_states = self.clip.dense_features_and_hidden_states(clip_pixels)
        else:
            dense_features = self.clip.dense_features(clip_pixels)
        return BaseModelOutputWithPooling(
            last_hidden_state=dense_features,
            pooler_output=vision_model.forward_head(dense_features),
            hidden_states=hidden_states,
        )

    def to_clip_pixels(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """SAM-normalized -> CLIP-normalized pixels; padding (pixel_mask == 0) becomes 0, as FC-CLIP pads CLIP input."""

        config = self.config
        statistics = (config.sam_image_mean, config.sam_image_std, config.clip_image_mean, config.clip_image_std)
        # the four statistics (per channel, or one value for every channel) in one copy: (4, 1, C or 1, 1, 1)
        host = torch.stack(
            torch.broadcast_tensors(*(torch.tensor(value, dtype=torch.float32) for value in statistics))
        )
        channels = to_device(host.view(4, 1, -1, 1, 1), pixel_values.device)
        sam_mean, sam_std, clip_mean, clip_std = channels.unbind(0)
        clip_pixels = (pixel_values.float() * sam_std + sam_mean - clip_mean) / clip_std
        if pixel_mask is not None:
            clip_pixels = clip_pixels * pixel_mask[:, None].to(clip_pixels.dtype)
        return clip_pixels.to(pixel_values.dtype)

    @torch.no_grad()
    def get_class_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        synonym_mask: torch.Tensor | None = None,
        text_batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Encode a tokenized vocabulary into classifier weights (FC-CLIP's text classifier): every prompt is encoded
        and L2-normalized, the T templates of a synonym are averaged, and the mean is L2-normalized again.

        Only real synonym slots are encoded (padding slots of `synonym_mask` are never used by the classifier), and
        token columns that are padding in every prompt are dropped first (exact: CLIP's text attention is causal
        and pools at the end-of-text token).

        Args:
            input_ids: `(K, S, T, L)` (K classes, S synonym slots, T templates, L tokens) or `(K, L)` (one prompt per
                class).
            attention_mask: same shape as `input_ids`, optional.
            synonym_mask: `(K, S)` bool, True on real synonyms (padding slots are ignored); default all True.
            text_batch_size: prompts per text-tower call; default None encodes the whole vocabulary in one batched
                pass. Set it to bound memory (a full-size text tower needs about 0.3 MB per prompt token).

        Returns:
            `class_embeddings` `(K, S, D)` L2-normalized (padding slots hold the class's first synonym) and
            `synonym_mask` `(K, S)`.

        Raises:
            TypeError: `input_ids`, `attention_mask` or `synonym_mask` is not a tensor; `text_batch_size` is not an
                integer (Python or numpy int; bool, float and str are rejected).
            ValueError: `input_ids` of another rank or with an empty dimension, with ids outside the tokenizer's
                vocabulary, of a float dtype, longer than `max_position_embeddings`, or a real prompt without the
                end-of-text token; `attention_mask` not of `input_ids`' shape, `synonym_mask` not `(K, S)`, either not
                0/1; a class without synonym; `text_batch_size` < 1.
        """
        if not torch.is_tensor(input_ids):
            raise TypeError(
                "input_ids must be a torch.Tensor of token ids (num_classes, num_synonyms, num_templates, seq_len) or "
                f"(num_classes, seq_len) (PosSAMProcessor.encode_vocabulary), got {type(input_ids).__name__}."
            )
        if input_ids.dim() not in (2, 4) or 0 in input_ids.shape:
            raise ValueError(
                f"input_ids must be (num_classes, num_synonyms, num_templates, seq_len) or (num_classes, seq_len), every "
                f"size >= 1; got shape {tuple(input_ids.shape)}. PosSAMProcessor builds the 4-D layout from a list of "
                "class names."
            )
        if attention_mask is not None:
            layout = (
                "(num_classes, num_synonyms, num_templates, seq_len)"
                if input_ids.dim() == 4
                else "(num_classes, seq_len)"
            )
            _check_binary_mask("attention_mask", attention_mask, tuple(input_ids.shape), f"{layout} of input_ids")
        if text_batch_size is not None and (
            isinstance(text_batch_size, bool) or not isinstance(text_batch_size, numbers.Integral)
        ):
            raise TypeError(f"text_batch_size must be an int number of prompts or None, got {text_batch_size!r}.")
        if text_batch_size is not None and text_batch_size < 1:
            raise ValueError(f"text_batch_size must be a positive number of prompts or None, got {text_batch_size}.")
        if input_ids.dim() == 2:
            input_ids = input_ids[:, None, None]
            attention_mask = attention_mask[:, None, None] if attention_mask is not None else None
        num_classes, num_synonyms, num_templates, seq_len = input_ids.shape
        synonym_mask = self._check_synonym_mask(synonym_mask, num_classes, num_synonyms, input_ids.device)
        real = synonym_mask.flatten()
        prompt_ids = input_ids.reshape(-1, num_templates, seq_len)[real].reshape(-1, seq_len)
        prompt_mask = (
            attention_mask.reshape(-1, num_templates, seq_len)[real].reshape(-1, seq_len)
            if attention_mask is not None
            else None
        )
        if prompt_mask is not None and prompt_mask.any():
            length = int(torch.nonzero(prompt_mask.any(0)).max()) + 1
            prompt_ids, prompt_mask = prompt_ids[:, :length], prompt_mask[:, :length]
        # checked once here, on exactly the prompts the text tower encodes (padding synonym slots may hold anything)
        self._check_prompt_ids(prompt_ids)
        prompt_ids = prompt_ids.long()
        batch = int(text_batch_size or prompt_ids.shape[0])
        chunks = [
            self.clip.text_embeddings(
                prompt_ids[start : start + batch],
                prompt_mask[start : start + batch] if prompt_mask is not None else None,
            ).float()
            for start in range(0, prompt_ids.shape[0], batch)
        ]
        prompt_embeddings = nn.functional.normalize(torch.cat(chunks), dim=-1)
        synonym_embeddings = nn.functional.normalize(
            prompt_embeddings.view(-1, num_templates, prompt_embeddings.shape[-1]).mean(1), dim=-1
        )
        class_embeddings = synonym_embeddings.new_zeros(num_classes * num_synonyms, synonym_embeddings.shape[-1])
        class_embeddings[real] = synonym_embeddings
        class_embeddings = class_embeddings.view(num_classes, num_synonyms, -1)
        first_synonym = class_embeddings[torch.arange(num_classes), synonym_mask.int().argmax(1)]
        class_embeddings = torch.where(synonym_mask[..., None], class_embeddings, first_synonym[:, None])
        return class_embeddings, synonym_mask

    @staticmethod
    def _check_synonym_mask(synonym_mask, num_classes: int, num_synonyms: int, device: torch.device) -> torch.Tensor:
        """
        The `(K, S)` bool synonym mask on `device` (all True when None). TypeError if it is not a tensor; ValueError
        for another shape, values other than 0/1 (a soft 0.5 would silently count as a synonym), or a class without
        any synonym.
        """
        if synonym_mask is None:
            return torch.ones(num_classes, num_synonyms, dtype=torch.bool, device=device)
        synonym_mask = _check_binary_mask(
            "synonym_mask", synonym_mask, (num_classes, num_synonyms), "(num_classes, num_synonyms)"
        )
        synonym_mask = to_device(synonym_mask, device)
        if _checking_values():
            has_synonym = synonym_mask.any(dim=1)

            def error() -> ValueError:
                empty = torch.nonzero(~has_synonym).flatten().tolist()
                return ValueError(
                    f"Classes {empty} have no synonym in synonym_mask: every class needs at least one name."
                )

            require(
                has_synonym.all(),
                "A class has no synonym in synonym_mask: every class needs at least one name.",
                error,
            )
        return synonym_mask

    def _resolve_vocabulary(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        synonym_mask: torch.Tensor | None,
        class_embeddings: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `(class_embeddings (K, S, D) L2-normalized float32, synonym_mask (K, S) bool)` from exactly one of a tokenized
        vocabulary (`input_ids`, checked by `get_class_embeddings`) or precomputed `class_embeddings` `(K, S, D)` /
        `(K, D)`: a finite floating tensor, K >= 1, D = `clip_embed_dim`, no all-zero vector at a real synonym slot.
        TypeError for a non-tensor, ValueError otherwise.
        """
        if class_embeddings is not None:
            if input_ids is not None:
                raise ValueError("Pass either input_ids (a tokenized vocabulary) or class_embeddings, not both.")
            if attention_mask is not None:
                raise ValueError("attention_mask belongs to input_ids; with class_embeddings, leave it out.")
            embed_dim = self.config.clip_embed_dim
            expected = f"(num_classes, num_synonyms, {embed_dim}) or (num_classes, {embed_dim})"
            if not torch.is_tensor(class_embeddings):
                raise TypeError(
                    f"class_embeddings must be a torch.Tensor {expected}, got {type(class_embeddings).__name__}."
                )
            if not class_embeddings.is_floating_point():
                raise ValueError(
                    f"class_embeddings must be floating-point text embeddings {expected} (get_class_embeddings), got dtype "
                    f"{class_embeddings.dtype}; token ids go in input_ids."
                )
            given_shape = tuple(class_embeddings.shape)
            if class_embeddings.dim() == 2:
                class_embeddings = class_embeddings[:, None]
            if class_embeddings.dim() != 3 or class_embeddings.shape[-1] != embed_dim:
                raise ValueError(f"class_embeddings must be {expected}; got shape {given_shape}.")
            if class_embeddings.shape[0] == 0:
                raise ValueError(
                    f"class_embeddings holds no class: {expected} needs num_classes >= 1, got shape {given_shape}."
                )
            num_classes, num_synonyms = class_embeddings.shape[:2]
            synonym_mask = self._check_synonym_mask(synonym_mask, num_classes, num_synonyms, class_embeddings.device)
            norms = class_embeddings.float().norm(dim=-1)
            # finite and non-zero at every real slot, decided at once (this runs on every forward): one host sync in
            # eager checks, none in asynchronous ones (fixed shapes: padding slots count as non-zero)
            if _checking_values():
                given = class_embeddings

                def error() -> ValueError:
                    _check_finite("class_embeddings", given)
                    zero = torch.nonzero(synonym_mask & (norms == 0)).tolist()
                    return ValueError(
                        f"class_embeddings has all-zero vectors at real synonym slots (class, synonym) {zero[:5]}: "
                        "they have no direction to classify against."
                    )

                require(
                    torch.isfinite(class_embeddings).all() & torch.where(synonym_mask, norms > 0, True).all(),
                    "class_embeddings contains NaN or infinite values, or an all-zero vector at a real synonym slot.",
                    error,
                )
            class_embeddings = nn.functional.normalize(class_embeddings.float(), dim=-1)
            return class_embeddings, synonym_mask
        if input_ids is None:
            if attention_mask is not None or synonym_mask is not None:
                raise ValueError(
                    "attention_mask / synonym_mask were given without input_ids: pass the tokenized vocabulary "
                    "(input_ids) with them, or none of them to use the default vocabulary."
                )
            return self.default_vocabulary()
        return self.get_class_embeddings(input_ids, attention_mask, synonym_mask)

    def default_vocabulary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `(class_embeddings (K, S, D) float32, synonym_mask (K, S) bool)` of the default vocabulary,
        `config.training_vocabulary` (class k is `config.id2label[k]`), stored by `set_default_vocabulary`.

        Raises:
            ValueError: the embeddings were never computed (a checkpoint saved without them).
        """
        embeddings = self.default_class_embeddings.float()
        synonym_mask = embeddings.norm(dim=-1) > 0
        if _checking_values():
            require(
                synonym_mask.any(dim=1).all(),
                "PosSAM classifies masks against a vocabulary: pass input_ids (from PosSAMProcessor) or "
                "class_embeddings (from get_class_embeddings). This model has no default vocabulary to use instead "
                "(its default_class_embeddings were never computed): compute the embeddings of "
                "config.training_vocabulary once with `model.set_default_vocabulary(PosSAMProcessor.from_pretrained("
                "path))` and save the model (`model.save_pretrained(path)`).",
            )
        # padding slots hold the class's first synonym, as get_class_embeddings returns them
        first_synonym = embeddings[:, 0]
        return torch.where(synonym_mask[..., None], embeddings, first_synonym[:, None]), synonym_mask

    @torch.no_grad()
    def set_default_vocabulary(self, processor, text_batch_size: int | None = None) -> None:
        """
        Computes and stores the text embeddings of `config.training_vocabulary` (prompts from `processor`, a
        `PosSAMProcessor`, with its templates and tokenizer), the vocabulary forward uses when it is given none.
        `save_pretrained` then saves them with the weights (`default_class_embeddings`, re-shaped here when the
        training vocabulary changed; call it before wrapping the model for distributed training).
        """
        names = tuple(self.config.training_vocabulary or ())
        num_classes, num_synonyms = default_vocabulary_shape(self.config)
        if self.default_class_embeddings.shape[:2] != (num_classes, num_synonyms):
            # the training vocabulary changed (`config.set_training_vocabulary`): a buffer of its shape
            buffer = self.default_class_embeddings
            self.default_class_embeddings = buffer.new_zeros(num_classes, num_synonyms, buffer.shape[-1])
        # thing/stuff flags do not change the text embeddings
        vocabulary = Vocabulary(names=names, is_thing=(True,) * len(names))
        tokens = processor.encode_vocabulary(vocabulary)
        device = self.default_class_embeddings.device
        embeddings, synonym_mask = self.get_class_embeddings(
            tokens["input_ids"].to(device),
            tokens["attention_mask"].to(device),
            tokens["synonym_mask"].to(device),
            text_batch_size=text_batch_size,
        )
        if embeddings.shape != self.default_class_embeddings.shape:
            raise ValueError(
                f"The processor encodes config.training_vocabulary as {tuple(embeddings.shape)} embeddings, but the "
                f"model holds {tuple(self.default_class_embeddings.shape)} (classes, synonyms, dimension): the "
                "processor does not split the class names into synonyms as the config does."
            )
        if not bool(synonym_mask[:, 0].all()):
            raise ValueError("Every class of config.training_vocabulary needs its first synonym in slot 0.")
        embeddings = embeddings * synonym_mask[..., None]
        self.default_class_embeddings.copy_(embeddings.to(self.default_class_embeddings.dtype))

    # ----------------------------------------------------------------------------------------------------------------
    # Training: Mask2FormerForUniversalSegmentation's split (loss parts, total, per-layer predictions)
    # ----------------------------------------------------------------------------------------------------------------
    def get_loss_dict(
        self,
        masks_queries_logits: torch.Tensor,
        class_queries_logits: torch.Tensor,
        mask_labels: list[torch.Tensor],
        class_labels: list[torch.Tensor],
        auxiliary_predictions: list[dict[str, torch.Tensor]] | None,
        iou_logits: torch.Tensor,
        loss_normalizers: LossNormalizers | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        The unweighted loss parts (`PosSAMLoss`): `loss_cross_entropy`, `loss_mask`, `loss_dice`, `loss_iou` of the
        final layer and `_{i}` copies per entry of `auxiliary_predictions`. Unlike Mask2Former's, the parts are not
        weighted in place: `outputs.loss_dict` reports them raw and `get_loss` weights them.

        Args:
            masks_queries_logits: `(B, Q, H/4, W/4)` final mask logits.
            class_queries_logits: `(B, Q, K + 1)` final in-vocabulary logits, void last.
            mask_labels, class_labels: per image `(N_i, H', W')` binary masks and `(N_i,)` class indices.
            auxiliary_predictions: `get_auxiliary_logits`' list, or None for no deep supervision.
            iou_logits: `(B, Q)` final IoU head logits.
            loss_normalizers: the denominators of the averages (see `forward`); default: this batch's own.
        """
        # matcher and losses in float32 with autocast off, whatever the model's dtype (docs/design.md, "Losses")
        with torch.autocast(device_type=masks_queries_logits.device.type, enabled=False):
            return self.criterion(
                masks_queries_logits=masks_queries_logits.float(),
                class_queries_logits=class_queries_logits.float(),
                mask_labels=mask_labels,
                class_labels=class_labels,
                auxiliary_predictions=auxiliary_predictions,
                iou_logits=iou_logits.float(),
                loss_normalizers=loss_normalizers,
            )

    def get_loss(self, loss_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: `get_loss_dict`'s parts, each times its weight in `config` (0-dim tensor)."""
        return self.criterion.weighted_total(loss_dict)

    @staticmethod
    def get_auxiliary_logits(
        class_queries_logits: Sequence[torch.Tensor],
        masks_queries_logits: Sequence[torch.Tensor],
        iou_logits: Sequence[torch.Tensor],
    ) -> list[dict[str, torch.Tensor]]:
        """
        Per decoder layer but the last (which gives the main outputs), its `class_queries_logits` `(B, Q, K + 1)`,
        `masks_queries_logits` `(B, Q, H/4, W/4)` and `iou_logits` `(B, Q)`: the predictions of deep supervision.
        Each argument holds one entry per layer (the learnable queries' prediction first).
        """
        return [
            {"class_queries_logits": classes, "masks_queries_logits": masks, "iou_logits": iou}
            for classes, masks, iou in zip(class_queries_logits[:-1], masks_queries_logits[:-1], iou_logits[:-1])
        ]

    @staticmethod
    def _check_labels(
        mask_labels, class_labels, pixel_values, num_classes
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """
        Validates the training targets and returns them with `class_labels` as int64 (any integer dtype is accepted).
        Masks must be bool or hold only 0 and 1: 0/255 masks would silently give a near-zero dice loss, NaN a NaN loss.
        """
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("Training needs both mask_labels and class_labels (or neither, for inference).")
        if not isinstance(mask_labels, (list, tuple)) or not isinstance(class_labels, (list, tuple)):
            raise ValueError(
                "mask_labels and class_labels must be lists with one tensor per image (their segment counts differ), got "
                f"{type(mask_labels).__name__} and {type(class_labels).__name__}."
            )
        batch_size = pixel_values.shape[0]
        if len(mask_labels) != batch_size or len(class_labels) != batch_size:
            raise ValueError(
                f"mask_labels and class_labels need one entry per image: batch of {batch_size}, got "
                f"{len(mask_labels)} and {len(class_labels)}."
            )
        height, width = pixel_values.shape[-2:]
        checked_labels = []
        for index, (masks, labels) in enumerate(zip(mask_labels, class_labels)):
            if not torch.is_tensor(masks) or not torch.is_tensor(labels):
                raise ValueError(
                    f"Image {index}: mask_labels and class_labels entries must be torch tensors, got "
                    f"{type(masks).__name__} and {type(labels).__name__}."
                )
            if masks.dim() != 3 or labels.dim() != 1 or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"Image {index}: mask_labels must be (num_segments, height, width) and class_labels (num_segments,); "
                    f"got {tuple(masks.shape)} and {tuple(labels.shape)}."
                )
            if masks.shape[1] * width != masks.shape[2] * height:
                raise ValueError(
                    f"Image {index}: mask_labels of size {tuple(masks.shape[1:])} do not cover the padded input "
                    f"{(height, width)}; pad labels like the pixels (PosSAMImageProcessor does)."
                )
            if masks.dtype != torch.bool and masks.is_complex():
                raise ValueError(f"Image {index}: mask_labels must be bool or 0/1 values, got dtype {masks.dtype}.")
            if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
                raise ValueError(
                    f"Image {index}: class_labels must be integer class indices, got dtype {labels.dtype}."
                )
            if masks.device != pixel_values.device:
                raise ValueError(
                    f"Image {index}: mask_labels are on {masks.device}, pixel_values on {pixel_values.device}: move "
                    "the targets to the model's device (`[masks.to(device) for masks in mask_labels]`)."
                )
            # class ids may come from the host, as Mask2Former accepts them: the matching's indices are on the device
            checked_labels.append(to_device(labels.long(), pixel_values.device))
        return list(mask_labels), checked_labels

    @staticmethod
    def _check_label_values(mask_labels: list[torch.Tensor], class_labels: list[torch.Tensor], num_classes) -> None:
        """
        The targets' value checks (`_check_image_targets` per image), run just before the loss: the forward never
        reads the targets, so a check that reads the device waits only for work the matching would wait for anyway.
        """
        if _checking_values():
            for index, (masks, labels) in enumerate(zip(mask_labels, class_labels)):
                _check_image_targets(index, masks, labels, num_classes)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        synonym_mask: torch.Tensor | None = None,
        class_embeddings: torch.Tensor | None = None,
        mask_labels: list[torch.Tensor] | None = None,
        class_labels: list[torch.Tensor] | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_auxiliary_logits: bool | None = None,
        return_clip_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        loss_normalizers: LossNormalizers | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> PosSAMForPanopticSegmentationOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, S, S)`): SAM-normalized pixels padded to SAM's input
                size S = `config.vision_config.image_size` (`PosSAMImageProcessor`), in the model's dtype, finite.
                Any memory layout (channels-last, strided views) gives the same result.
            input_ids, attention_mask (`torch.LongTensor` of shape `(K, S, T, L)` or `(K, L)`): tokenized vocabulary
                (see `get_class_embeddings` for what is checked).
            synonym_mask (`torch.BoolTensor` of shape `(K, S)`, *optional*): real synonym slots (bool or 0/1).
            class_embeddings (`torch.FloatTensor` of shape `(K, S, D)` or `(K, D)`): precomputed vocabulary instead
                (D = `clip_embed_dim`, K >= 1, finite).
            mask_labels (`list[torch.Tensor]`, *optional*): per image `(N_i, H', W')` binary masks (uint8/bool
                preferred), covering the padded input.
            class_labels (`list[torch.LongTensor]`, *optional*): per image `(N_i,)` class indices into the vocabulary.
            pixel_mask (`torch.LongTensor` of shape `(B, S, S)`, *optional*): 1 on real pixels (bool or 0/1); padding
                is zeroed in the CLIP input.
            output_auxiliary_logits (`bool`, *optional*): return per-layer predictions (always computed for the loss).
            return_clip_logits (`bool`, *optional*): compute the CLIP branch; default: in eval mode only.
            loss_normalizers (`LossNormalizers`, *optional*): the denominators of the loss's averages (number of
                masks, class-weight sum, images x queries) for a whole gradient-accumulation window, from
                `transformers_possam.modeling.accumulation_loss_normalizers`, so that G accumulated micro-batches give
                the gradients of one batch of all their images (training/train.py passes them). Default: this
                batch's own, as Mask2Former.
            kwargs: transformers' common model kwargs (`TransformersKwargs`, e.g. `num_items_in_batch` from
                `Trainer`), accepted and unused. There is no `labels`: pass `mask_labels` and `class_labels`.

        Raises:
            TypeError: an unknown keyword argument (`labels`, typos), a flag that is not a bool (or None), or
                `pixel_values`, `pixel_mask`, `input_ids`, `attention_mask`, `synonym_mask`, `class_embeddings` that is
                not a tensor.
            ValueError: any input of another shape, dtype or value range than described above (each message names
                the argument and what was expected), neither or both of `input_ids` / `class_embeddings`, NaN / inf in
                `pixel_values` or `class_embeddings`, and invalid training labels.
            RuntimeError: on CUDA, the value checks are asynchronous device asserts by default (no host
                synchronization), surfacing later without the message; `value_checks("eager")` gives the ValueError.
        """
        _reject_unknown_kwargs(PosSAMForPanopticSegmentation.forward, kwargs)
        _check_flags(
            output_auxiliary_logits=output_auxiliary_logits,
            return_clip_logits=return_clip_logits,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=return_dict,
        )
        # shapes and dtypes before any work; finiteness is checked once, where the mask generator consumes the pixels
        self.model._check_pixel_inputs(pixel_values, pixel_mask)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return_clip_logits = (not self.training) if return_clip_logits is None else return_clip_logits
        class_embeddings, synonym_mask = self._resolve_vocabulary(
            input_ids, attention_mask, synonym_mask, class_embeddings
        )
        num_classes = class_embeddings.shape[0]
        has_labels = mask_labels is not None or class_labels is not None
        if has_labels:
            mask_labels, class_labels = self._check_labels(mask_labels, class_labels, pixel_values, num_classes)
        if loss_normalizers is not None:
            if not isinstance(loss_normalizers, LossNormalizers):
                raise TypeError(
                    "loss_normalizers must be a LossNormalizers (from "
                    f"transformers_possam.modeling.accumulation_loss_normalizers), got {type(loss_normalizers).__name__}."
                )
            if not has_labels:
                raise ValueError(
                    "loss_normalizers only apply to the loss: pass them with mask_labels and class_labels, or leave "
                    "them out."
                )

        want_auxiliary = bool(output_auxiliary_logits) or (has_labels and bool(self.config.use_auxiliary_loss))
        self._set_frozen_parts_mode()
        # CLIP first: its large early-stage activations are freed before the mask generator's outputs exist
        clip_features = self.clip.dense_features(self.to_clip_pixels(pixel_values, pixel_mask))
        outputs: PosSAMModelOutput = self.model(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            output_auxiliary_masks=want_auxiliary,
        )

        # PosSAMModel fills both (ModelOutput fields are optional by convention only); the masks read below are
        # tensors: every layer's with output_auxiliary_masks=want_auxiliary, else the last one, the only one read
        per_layer_masks = cast(tuple[torch.Tensor, ...], outputs.masks_queries_logits)
        per_layer_iou_logits = cast(tuple[torch.Tensor, ...], outputs.iou_logits)
        layers = range(len(per_layer_masks)) if want_auxiliary else [len(per_layer_masks) - 1]
        ldp_embeddings, class_logits = {}, {}
        for layer in layers:
            ldp_embeddings[layer] = self.ldp(outputs.mask_features, clip_features, per_layer_masks[layer])
            class_logits[layer] = self.classifier(ldp_embeddings[layer], class_embeddings, synonym_mask)
        last = len(per_layer_masks) - 1
        auxiliary_logits = None
        if want_auxiliary:
            auxiliary_logits = self.get_auxiliary_logits(
                [class_logits[layer] for layer in range(last + 1)], per_layer_masks, per_layer_iou_logits
            )

        clip_embeddings = clip_logits = None
        if return_clip_logits:
            clip_embeddings, clip_logits = self.classifier.out_of_vocabulary_logits(
                self.clip, clip_features, per_layer_masks[last], class_embeddings, synonym_mask
            )

        loss = loss_dict = None
        if mask_labels is not None and class_labels is not None:  # == has_labels, once _check_labels passed
            self._check_label_values(mask_labels, class_labels, num_classes)
            loss_dict = self.get_loss_dict(
                masks_queries_logits=per_layer_masks[last],
                class_queries_logits=class_logits[last],
                mask_labels=mask_labels,
                class_labels=class_labels,
                auxiliary_predictions=auxiliary_logits if self.config.use_auxiliary_loss else None,
                iou_logits=per_layer_iou_logits[last],
                loss_normalizers=loss_normalizers,
            )
            loss = self.get_loss(loss_dict)

        output = PosSAMForPanopticSegmentationOutput(
            loss=loss,
            loss_dict=loss_dict,
            class_queries_logits=class_logits[last],
            clip_class_logits=clip_logits,
            masks_queries_logits=per_layer_masks[last],
            iou_scores=per_layer_iou_logits[last].sigmoid(),
            auxiliary_logits=auxiliary_logits if (output_auxiliary_logits or has_labels) else None,
            ldp_embeddings=ldp_embeddings[last],
            clip_embeddings=clip_embeddings,
            class_embeddings=class_embeddings,
            image_embeddings=outputs.image_embeddings,
            mask_features=outputs.mask_features,
            clip_features=clip_features,
            vision_hidden_states=outputs.vision_hidden_states,
            encoder_hidden_states=outputs.encoder_hidden_states,
            pixel_decoder_hidden_states=outputs.pixel_decoder_hidden_states,
            transformer_decoder_hidden_states=outputs.transformer_decoder_hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


# Checkpoints saved before the classifier became its own module hold its two parameters at the top level. transformers'
# loader renames them on `from_pretrained` (anchored: CLIP's own `clip.logit_scale` stays as it is) and, like for its own
# models, `save_pretrained` writes this original layout unless called with `save_original_format=False`; both layouts
# load. Registered by class name: transformers applies no mapping to custom code unless it was registered explicitly.
PRE_CLASSIFIER_KEY_RENAMINGS: list[WeightConverter | WeightRenaming] = [
    WeightRenaming(source_patterns=r"^void_embedding\.", target_patterns="classifier.void_embedding."),
    WeightRenaming(source_patterns=r"^logit_scale", target_patterns="classifier.logit_scale"),
]
register_checkpoint_conversion_mapping(
    PosSAMForPanopticSegmentation.__name__, PRE_CLASSIFIER_KEY_RENAMINGS, overwrite=True
)
