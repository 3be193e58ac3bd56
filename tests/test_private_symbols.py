"""
Every transformers symbol this project takes from outside transformers' public top-level API (Mask2Former's and
SAM's modules, internal helpers, underscore names), in one place, each checked to be the kind of object we use:
a class or function accepting the parameters we pass, with the methods we call or override. An upgrade of
transformers that moves or changes one of them fails here, naming the symbol and the range setup.cfg pins.

`test_every_internal_import_is_listed` scans src/, training/, benchmarks/ and conversion/ so the list stays complete:
a new `from transformers.models... import X` must be added to `INTERNALS` below.
"""

from __future__ import annotations

import ast
import configparser
import enum
import importlib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version


REPOSITORY = Path(__file__).resolve().parents[1]
SCANNED_FOLDERS = ("src", "training", "benchmarks", "conversion")


def pinned_requirement(name: str) -> Requirement:
    """The requirement on `name` in setup.cfg's install_requires."""
    setup = configparser.ConfigParser()
    setup.read(REPOSITORY / "setup.cfg", encoding="utf-8")
    lines = [line.strip() for line in setup["options"]["install_requires"].splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    matching = [requirement for requirement in requirements if requirement.name == name]
    assert len(matching) == 1, f"setup.cfg should require {name} exactly once, found {matching}"
    return matching[0]


TRANSFORMERS = pinned_requirement("transformers")


@dataclass(frozen=True)
class Expected:
    """
    What we rely on. `kind`: "class", "function", "typeddict", "enum", "special form" or an instance's type name.
    `parameters`: the leading parameters, in order, of the function or the class' `__init__` (`self` left out);
    `keywords`: further parameters we pass by name; `methods`: method name -> its leading parameters.
    """

    kind: str
    parameters: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)


MASK2FORMER = "transformers.models.mask2former.modeling_mask2former"
SAM = "transformers.models.sam.modeling_sam"
MASK_LOGITS_AND_LABELS = ("masks_queries_logits", "class_queries_logits", "mask_labels", "class_labels")

# (module, name) -> what we rely on. Keys are the imports found in the code (see the module docstring); entries
# marked "reached through" are used via another listed symbol.
INTERNALS: dict[tuple[str, str], Expected] = {
    # modeling/loss.py
    (MASK2FORMER, "Mask2FormerHungarianMatcher"): Expected(
        "class",
        ("cost_class", "cost_mask", "cost_dice", "num_points"),
        methods={"forward": MASK_LOGITS_AND_LABELS},
    ),
    (MASK2FORMER, "Mask2FormerLoss"): Expected(
        "class",
        ("config", "weight_dict"),
        methods={
            "forward": (*MASK_LOGITS_AND_LABELS, "auxiliary_predictions"),
            "loss_labels": ("class_queries_logits", "class_labels", "indices"),
            "get_num_masks": ("class_labels", "device"),
            "sample_points_using_uncertainty": (
                "logits",
                "uncertainty_function",
                "num_points",
                "oversample_ratio",
                "importance_sample_ratio",
            ),
            "calculate_uncertainty": ("logits",),
            "_get_predictions_permutation_indices": ("indices",),
        },
    ),
    (MASK2FORMER, "dice_loss"): Expected("function", ("inputs", "labels", "num_masks")),
    (MASK2FORMER, "sigmoid_cross_entropy_loss"): Expected("function", ("inputs", "labels", "num_masks")),
    (MASK2FORMER, "pair_wise_dice_loss"): Expected("function", ("inputs", "labels")),
    (MASK2FORMER, "pair_wise_sigmoid_cross_entropy_loss"): Expected("function", ("inputs", "labels")),
    (MASK2FORMER, "sample_point"): Expected("function", ("input_features", "point_coordinates", "add_dim")),
    # modeling/iou_head.py
    (MASK2FORMER, "Mask2FormerMLPPredictionHead"): Expected(
        "class", ("input_dim", "hidden_dim", "output_dim", "num_layers")
    ),
    # modeling/mask_predictor.py
    (MASK2FORMER, "Mask2FormerMaskPredictor"): Expected(
        "class",
        ("hidden_size", "num_heads", "mask_feature_size"),
        methods={"forward": ("outputs", "pixel_embeddings", "attention_mask_target_size")},
    ),
    # modeling/deformable_attention.py
    (MASK2FORMER, "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention"): Expected(
        "class",
        ("embed_dim", "num_heads", "n_levels", "n_points"),
        methods={
            "forward": (
                "hidden_states",
                "attention_mask",
                "encoder_hidden_states",
                "encoder_attention_mask",
                "position_embeddings",
                "reference_points",
                "spatial_shapes_list",
                "level_start_index",
                "output_attentions",
            )
        },
    ),
    # modeling/pixel_decoder_encoder.py (the encoder's output: a BaseModelOutput whose last_hidden_state is replaced)
    (MASK2FORMER, "Mask2FormerPixelDecoderEncoderOnly"): Expected(
        "class",
        ("config",),
        methods={
            "forward": (
                "inputs_embeds",
                "attention_mask",
                "position_embeddings",
                "spatial_shapes_list",
                "level_start_index",
                "valid_ratios",
            ),
            # modeling/pixel_decoder_encoder.py (a staticmethod)
            "get_reference_points": ("spatial_shapes_list", "valid_ratios", "device"),
        },
    ),
    (MASK2FORMER, "Mask2FormerPixelDecoderEncoderLayer"): Expected("class", ("config",)),
    ("transformers.modeling_outputs", "BaseModelOutput"): Expected("class"),
    (MASK2FORMER, "multi_scale_deformable_attention"): Expected(
        "function", ("value", "value_spatial_shapes", "sampling_locations", "attention_weights")
    ),
    # modeling_possam.py
    (MASK2FORMER, "Mask2FormerPixelDecoder"): Expected(
        "class",
        ("config", "feature_channels"),
        methods={
            "forward": ("features", "encoder_outputs", "output_attentions", "output_hidden_states"),
        },
    ),
    # modeling/pixel_decoder.py: the output it builds
    (MASK2FORMER, "Mask2FormerPixelDecoderOutput"): Expected("class"),
    (MASK2FORMER, "Mask2FormerTransformerModule"): Expected(
        "class",
        ("in_features", "config"),
        methods={"forward": ("multi_scale_features", "mask_features", "output_hidden_states", "output_attentions")},
    ),
    # modeling/decoder_layer.py: its forward_post overridden (inference without weights) and called
    (MASK2FORMER, "Mask2FormerMaskedAttentionDecoderLayer"): Expected(
        "class",
        ("config",),
        methods={
            "forward_post": (
                "hidden_states",
                "level_index",
                "attention_mask",
                "position_embeddings",
                "query_position_embeddings",
                "encoder_hidden_states",
                "encoder_attention_mask",
                "output_attentions",
            ),
            "with_pos_embed": ("tensor", "pos"),
        },
    ),
    # modeling/decoder_self_attention.py (and fast_paths.py, which builds it from the original's sizes)
    (MASK2FORMER, "Mask2FormerAttention"): Expected(
        "class",
        ("embed_dim", "num_heads", "dropout", "is_decoder", "bias"),
        methods={
            "forward": (
                "hidden_states",
                "attention_mask",
                "position_embeddings",
                "key_value_states",
                "key_value_position_embeddings",
                "output_attentions",
            )
        },
    ),
    # modeling/position_embedding.py: made once per shape through its build function (past that function's cache)
    (MASK2FORMER, "Mask2FormerSinePositionEmbedding"): Expected(
        "class",
        ("num_position_features", "temperature", "normalize", "scale"),
        methods={
            "forward": ("shape", "device", "dtype", "mask"),
            "build_sine_position_embedding": (
                "shape",
                "device",
                "dtype",
                "num_position_features",
                "normalize",
                "scale",
                "temperature",
                "mask",
            ),
        },
    ),
    (MASK2FORMER, "Mask2FormerPredictionBlock"): Expected("class", ("in_dim", "out_dim", "activation")),
    # its `_init_weights` is called unbound on our modules
    (MASK2FORMER, "Mask2FormerPreTrainedModel"): Expected(
        "class", ("config",), methods={"_init_weights": ("module",)}
    ),
    (SAM, "SamVisionEncoder"): Expected("class", ("config",), methods={"forward": ("pixel_values",)}),
    # modeling/activations.py: SAM's MLP `lin1 -> act -> lin2`, its `act` a GELUActivation holding `act` = F.gelu
    (SAM, "SamMLPBlock"): Expected("class", ("config",)),
    ("transformers.activations", "GELUActivation"): Expected("class", ("use_gelu_python",)),
    # modeling/sam_attention.py
    (SAM, "SamVisionSdpaAttention"): Expected(
        "class",
        ("config", "window_size"),
        methods={
            "forward": ("hidden_states", "output_attentions"),
            "get_decomposed_rel_pos": ("query", "rel_pos_h", "rel_pos_w", "q_size", "k_size"),
        },
    ),
    # modeling/patch_embeddings.py: its forward returns the convolution's output permuted to (B, H, W, C)
    (SAM, "SamPatchEmbeddings"): Expected("class", ("config",), methods={"forward": ("pixel_values",)}),
    ("transformers.processing_utils", "Unpack"): Expected("special form"),
    ("transformers.utils", "ModelOutput"): Expected("class"),
    ("transformers.utils", "TransformersKwargs"): Expected("typeddict"),
    ("transformers.utils", "cached_file"): Expected("function", ("path_or_repo_id", "filename")),
    ("transformers.dynamic_module_utils", "custom_object_save"): Expected("function", ("obj", "folder")),
    # reached through cached_file(..., _raise_exceptions_for_missing_entries=False, cache_dir=..., ...)
    ("transformers.utils.hub", "cached_files"): Expected(
        "function",
        ("path_or_repo_id", "filenames"),
        keywords=("_raise_exceptions_for_missing_entries", "cache_dir", "revision", "subfolder", "token"),
    ),
    # image_processing_possam.py (`_get_preprocess_shape` is overridden and called through super())
    ("transformers.models.sam.image_processing_sam", "SamImageProcessor"): Expected(
        "class", methods={"_get_preprocess_shape": ("old_shape", "longest_edge")}
    ),
    ("transformers.models.sam.image_processing_pil_sam", "SamImageProcessorPil"): Expected(
        "class", methods={"_get_preprocess_shape": ("old_shape", "longest_edge")}
    ),
    ("transformers.models.sam.image_processing_sam", "SamImageProcessorKwargs"): Expected("typeddict"),
    ("transformers.image_utils", "ChannelDimension"): Expected("enum"),
    # pipeline_possam.py
    ("transformers.image_utils", "load_image"): Expected("function", ("image", "timeout")),
    ("transformers.pipelines", "PIPELINE_REGISTRY"): Expected(
        "PipelineRegistry", methods={"register_pipeline": ("task", "pipeline_class", "pt_model")}
    ),
    # configuration_possam.py
    ("transformers.configuration_utils", "SubConfigSpec"): Expected("class", ("config_class",), ("init_kwargs",)),
    # tokenization.py
    ("transformers.convert_slow_tokenizer", "bytes_to_unicode"): Expected("function"),
    # modeling_possam.py: old checkpoints' classifier keys renamed on load
    ("transformers.conversion_mapping", "register_checkpoint_conversion_mapping"): Expected(
        "function", ("model_type_or_class_name", "mapping", "overwrite")
    ),
    ("transformers.core_model_loading", "WeightRenaming"): Expected("class", ("source_patterns", "target_patterns")),
    # modeling_possam.py: get_text_features / get_image_features return CLIPModel's output type
    ("transformers.modeling_outputs", "BaseModelOutputWithPooling"): Expected("class"),
    ("transformers.utils", "can_return_tuple"): Expected("function", ("func",)),
    # postprocessing.py
    ("transformers.image_processing_outputs", "SemanticSegmentationPostProcessorOutput"): Expected("class"),
    # postprocessing.py, image_processing_possam.py: what SAM's image processors store as pad_size (read by attribute)
    ("transformers.image_utils", "SizeDict"): Expected("class", ("height", "width")),
    # vocabulary / data / evaluation: panoptic PNG colours <-> segment ids
    ("transformers.image_transforms", "rgb_to_id"): Expected("function", ("color",)),
    ("transformers.image_transforms", "id_to_rgb"): Expected("function", ("id_map",)),
    # processing_possam.py: tokenization options of text_kwargs
    ("transformers.tokenization_utils_base", "PaddingStrategy"): Expected("enum"),
    ("transformers.tokenization_utils_base", "TruncationStrategy"): Expected("enum"),
}


def upgrade_hint(symbol: str, problem: str) -> str:
    return (
        f"transformers {transformers.__version__}: {symbol} {problem}. transformers_possam relies on it and is tested "
        f"with {TRANSFORMERS} (setup.cfg): install a version in that range, or adapt the code using {symbol} and "
        "this test's INTERNALS entry together."
    )


def is_internal(module: str, name: str) -> bool:
    """Taken from a model's modules, an underscore name, or anything transformers does not export at its top level."""
    return (
        module.startswith("transformers.models.") or name.startswith("_") or not hasattr(transformers, name)
    ) and name != "*"


def internal_imports() -> dict[tuple[str, str], list[str]]:
    """(module, name) of every internal `from transformers.x import name` in the scanned folders -> files."""
    found: dict[tuple[str, str], list[str]] = {}
    for folder in SCANNED_FOLDERS:
        for path in sorted((REPOSITORY / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers."):
                    for alias in node.names:
                        if is_internal(node.module, alias.name):
                            found.setdefault((node.module, alias.name), []).append(str(path.relative_to(REPOSITORY)))
    return found


def test_installed_transformers_is_in_the_pinned_range():
    assert TRANSFORMERS.specifier.contains(transformers.__version__, prereleases=True), (
        f"transformers {transformers.__version__} is installed; transformers_possam is tested with {TRANSFORMERS}."
    )
    # a pin to one minor release: the internals below may change in any minor release
    installed = Version(transformers.__version__)
    next_minor = f"{installed.major}.{installed.minor + 1}.0"
    assert not TRANSFORMERS.specifier.contains(next_minor), f"{TRANSFORMERS} admits {next_minor}, an untested release"


def test_every_internal_import_is_listed():
    imports = internal_imports()
    assert imports, "the scan finds the Mask2Former imports, so it is looking in the right place"
    unlisted = sorted(
        f"{module}.{name} ({', '.join(files)})"
        for (module, name), files in imports.items()
        if (module, name) not in INTERNALS
    )
    assert not unlisted, f"add these transformers internals to INTERNALS in {Path(__file__).name}: {unlisted}"
    reached_through = {("transformers.utils.hub", "cached_files")}
    stale = set(INTERNALS) - set(imports) - reached_through
    assert not stale, f"no longer imported anywhere: remove from INTERNALS: {sorted(stale)}"


def kind_of(value: object) -> str:
    if typing.is_typeddict(value):
        return "typeddict"
    if inspect.isclass(value):
        return "enum" if issubclass(value, enum.Enum) else "class"
    if inspect.isfunction(value):
        return "function"
    if value is typing.Unpack or type(value).__name__ == "_SpecialForm":
        return "special form"
    return type(value).__name__


def parameter_names(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def check_parameters(symbol: str, function, leading: tuple[str, ...], keywords: tuple[str, ...] = ()) -> None:
    names = parameter_names(function)
    if tuple(names[: len(leading)]) != leading:
        pytest.fail(upgrade_hint(symbol, f"takes ({', '.join(names)}), we pass ({', '.join(leading)}) in this order"))
    missing = [keyword for keyword in keywords if keyword not in names]
    if missing:
        pytest.fail(upgrade_hint(symbol, f"takes no parameter {missing} any more (it takes {names})"))


@pytest.mark.parametrize(("module", "name"), sorted(INTERNALS), ids=lambda value: value.rsplit(".", 1)[-1])
def test_internal_symbol_is_what_we_rely_on(module, name):
    symbol = f"{module}.{name}"
    expected = INTERNALS[module, name]
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        pytest.fail(upgrade_hint(symbol, f"cannot be imported ({error})"))
    if kind_of(value) != expected.kind:
        pytest.fail(upgrade_hint(symbol, f"is a {kind_of(value)}, not a {expected.kind}"))
    if expected.parameters or expected.keywords:
        check_parameters(
            symbol, value.__init__ if inspect.isclass(value) else value, expected.parameters, expected.keywords
        )
    for method, leading in expected.methods.items():
        function = getattr(value, method, None)
        if not callable(function):
            pytest.fail(upgrade_hint(symbol, f"has no method {method}"))
        check_parameters(f"{symbol}.{method}", function, leading)


def test_a_changed_symbol_fails_with_the_pinned_range(monkeypatch):
    """The failure an upgrade would give: the symbol, the installed version and setup.cfg's range."""
    monkeypatch.setitem(INTERNALS, (MASK2FORMER, "dice_loss"), Expected("function", ("inputs", "targets")))
    with pytest.raises(pytest.fail.Exception) as failure:
        test_internal_symbol_is_what_we_rely_on(MASK2FORMER, "dice_loss")
    message = str(failure.value)
    assert f"{MASK2FORMER}.dice_loss takes (inputs, labels, num_masks)" in message
    assert (
        f"transformers {transformers.__version__}" in message and f"tested with {TRANSFORMERS} (setup.cfg)" in message
    )
