"""
PosSAMConfig checks its fields at run time (huggingface_hub's `@strict`, as transformers' own configs), and the typed
sub-config accessors refuse a sub-config replaced after construction.

Each case: what a careless user passes -> the expected outcome.
"""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import CLIPTextConfig, SamVisionConfig

from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation, tiny_config


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_queries", "250"),  # a number as a string -> refused, naming the field
        ("hidden_dim", 2.5),  # a float where an int belongs -> refused
        ("fpn_out_channels", "256"),  # a string where a list of ints belongs -> refused
        ("sam_image_std", "0.2"),  # a string where floats belong -> refused
        ("use_auxiliary_loss", "yes"),  # a string where a bool belongs -> refused
    ],
)
def test_field_of_the_wrong_type_is_refused_naming_it(field, value):
    with pytest.raises(StrictDataclassFieldValidationError, match=field):
        PosSAMConfig(**{field: value})


def test_assignment_is_checked_too():
    config = tiny_config()
    with pytest.raises(StrictDataclassFieldValidationError, match="num_queries"):
        config.num_queries = "8"  # -> refused: transformers' strict configs validate assignments


def test_scalar_normalization_applies_to_every_channel():
    """A float mean / std means the same value per channel, as in transformers' image processors."""
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config(sam_image_std=0.25, clip_image_mean=0.5))
    reference = PosSAMForPanopticSegmentation(tiny_config(sam_image_std=[0.25] * 3, clip_image_mean=[0.5] * 3))
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model.to_clip_pixels(pixels), reference.to_clip_pixels(pixels), rtol=0, atol=0)
    # the formula itself: SAM-normalized -> 0-1 -> CLIP-normalized
    config = reference.config
    expected = (pixels * 0.25 + torch.tensor(config.sam_image_mean).view(1, 3, 1, 1) - 0.5) / torch.tensor(
        config.clip_image_std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(model.to_clip_pixels(pixels), expected)


def test_sub_configs_are_built_and_typed():
    config = PosSAMConfig(
        vision_config={"hidden_size": 64, "num_attention_heads": 2},
        text_config={"hidden_size": 64, "num_attention_heads": 2},
    )
    assert isinstance(config.sam_vision_config, SamVisionConfig) and config.sam_vision_config.hidden_size == 64
    # a partial text dict means "convnext_large_d_320 with these changes" (16 layers), not CLIPTextConfig's defaults
    assert isinstance(config.clip_text_config, CLIPTextConfig)
    assert (config.clip_text_config.hidden_size, config.clip_text_config.num_hidden_layers) == (64, 16)


def test_sub_config_replaced_by_a_dict_after_construction_is_refused_by_the_accessor():
    config = tiny_config()
    config.vision_config = {"hidden_size": 32}  # -> allowed by the field's type (construction takes dicts) ...
    with pytest.raises(TypeError, match=r"vision_config must be a SamVisionConfig.*pass a dict to PosSAMConfig"):
        config.sam_vision_config  # ... but the typed accessor says how to do it instead


def test_config_dict_written_before_the_fast_path_switch_loads_with_fast_paths_on():
    """
    A config dict as saved before issue 15 item 3 (no `use_fast_paths`, the Mask2Former fields flat) loads with the
    fast paths on (what it ran then), and its Mask2Former fields reach a real `Mask2FormerConfig`.
    """
    from transformers import Mask2FormerConfig

    old = tiny_config(num_queries=5, dim_feedforward=48, init_xavier_std=0.5).to_dict()
    del old["use_fast_paths"]
    config = PosSAMConfig.from_dict(old)
    assert config.use_fast_paths is True
    derived = config.mask2former_config
    assert type(derived) is Mask2FormerConfig
    assert (derived.num_queries, derived.dim_feedforward, derived.init_xavier_std) == (5, 48, 0.5)
    assert (derived.hidden_dim, derived.decoder_layers, derived.feature_size) == (32, 3, 32)
    # saved again: the flat fields and the flag, no second copy of the Mask2Former fields
    saved = config.to_dict()
    assert "mask2former_config" not in saved and saved["use_fast_paths"] is True
    assert {key: saved[key] for key in old if key != "transformers_version"} == {
        key: value for key, value in old.items() if key != "transformers_version"
    }
