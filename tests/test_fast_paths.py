"""
The fast paths behind one switch (issue 15, item 3): `PosSAMConfig.use_fast_paths` installs PosSAM's same-parameter
replacements (SAM attention, the pixel decoder's encoder, its layers and deformable attention, mask predictor, masked
cross-attention) through
`install_fast_paths`; False runs transformers' own modules, the independent reference here. Also: the state of a
forward is passed as arguments (no module changes during a forward), and the reused Mask2Former modules are built from
a real `Mask2FormerConfig` derived from PosSAMConfig's flat fields, which old `config.json` files still hold.

Tolerances (float32): outputs within `rtol=1e-5` (atol 1e-5 for values near 0, e.g. logits crossing zero). The fast
paths change the order of float operations only (an `embedding_bag` sum instead of `grid_sample`, SAM attention in
blocks, resize-then-project for attention masks), so the differences are rounding, about 1e-6 relative. Gradients: `rtol=1e-4`
and `atol=1e-6` times the largest gradient (measured: 5e-6 relative, 2e-7 of the largest gradient at most).
"""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerAttention,
    Mask2FormerMaskPredictor,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderLayer,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerPixelDecoderEncoderOnly,
    Mask2FormerSinePositionEmbedding,
    Mask2FormerTransformerModule,
)
from transformers.models.sam.modeling_sam import (
    SamMLPBlock,
    SamPatchEmbeddings,
    SamVisionAttention,
    SamVisionSdpaAttention,
)

from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation, PosSAMModel, tiny_config
from transformers_possam.modeling import (
    InPlaceGELU,
    PosSAMDecoderSelfAttention,
    PosSAMMaskedCrossAttention,
    PosSAMMaskPredictor,
    PosSAMMultiscaleDeformableAttention,
    PosSAMPatchEmbeddings,
    PosSAMPixelDecoder,
    PosSAMPixelDecoderEncoder,
    PosSAMPixelDecoderEncoderLayer,
    PosSAMSamMLPBlock,
    PosSAMSinePositionEmbedding,
    PosSAMTimmMlp,
    PosSAMVisionAttention,
    install_fast_paths,
    install_in_place_gelu,
    install_mlp_fast_paths,
    mlp_in_row_blocks,
    softmax_over_a_short_last_dimension,
)


REPOSITORY = Path(__file__).resolve().parents[1]
MODEL_CARDS = REPOSITORY / "model_cards"
OUTPUT_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
GRADIENT_RTOL, GRADIENT_ATOL = 1e-4, 1e-6

# the tiny config, and one with several windowed and global SAM layers (window 3 on an 8 x 8 token grid: padded
# windows) and three levels of decoder layers
CONFIGS = {
    "tiny": {},
    "windowed_and_global": {
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "mlp_dim": 64,
            "image_size": 128,
            "patch_size": 16,
            "output_channels": 32,
            "window_size": 3,
            "global_attn_indexes": [1, 3],
            "initializer_range": 0.02,
        },
        "decoder_layers": 5,
        "num_queries": 6,
    },
}


def model_pair(model_class, name: str, **overrides):
    """The same weights with fast paths on and off (the second loads the first's state dict)."""
    torch.manual_seed(0)
    fast = model_class(tiny_config(**CONFIGS[name], **overrides))
    reference = model_class(tiny_config(**CONFIGS[name], **overrides, use_fast_paths=False))
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def pixels(config, batch_size=2, seed=1):
    size = config.vision_config.image_size
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def class_embeddings(config, num_classes=5, seed=2):
    embeddings = torch.randn(num_classes, config.clip_embed_dim, generator=torch.Generator().manual_seed(seed))
    return nn.functional.normalize(embeddings, dim=-1)


def module_types(model) -> set[type]:
    return {type(module) for module in model.modules()}


# ----------------------------------------------------------------------------------------------------------------------
# One switch
# ----------------------------------------------------------------------------------------------------------------------
def test_the_flag_installs_all_four_replacements_or_none():
    fast, reference = model_pair(PosSAMModel, "tiny")
    ours = {
        PosSAMPatchEmbeddings,
        PosSAMVisionAttention,
        PosSAMSamMLPBlock,
        InPlaceGELU,
        PosSAMPixelDecoder,
        PosSAMPixelDecoderEncoder,
        PosSAMPixelDecoderEncoderLayer,
        PosSAMMultiscaleDeformableAttention,
        PosSAMMaskPredictor,
        PosSAMMaskedCrossAttention,
        PosSAMSinePositionEmbedding,
        PosSAMDecoderSelfAttention,
    }
    assert ours <= module_types(fast)
    assert not ours & module_types(reference)
    # transformers' own modules, exactly (not subclasses of them)
    stock = module_types(reference)
    for module_class in (
        SamPatchEmbeddings,
        SamVisionSdpaAttention,
        SamMLPBlock,
        Mask2FormerPixelDecoder,
        Mask2FormerPixelDecoderEncoderOnly,
        Mask2FormerPixelDecoderEncoderLayer,
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
        Mask2FormerMaskPredictor,
        nn.MultiheadAttention,
        Mask2FormerSinePositionEmbedding,
        Mask2FormerAttention,
    ):
        assert module_class in stock
    assert SamVisionSdpaAttention not in module_types(fast)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_decoder_self_attention_equals_transformers(batch_size):
    """`PosSAMDecoderSelfAttention` against transformers' `Mask2FormerAttention` holding the same weights: without
    attention weights the fused call, to float32 rounding; with them, with a mask, or as cross-attention,
    transformers' forward itself, bitwise."""
    torch.manual_seed(0)
    reference = Mask2FormerAttention(embed_dim=32, num_heads=4).eval()
    ours = PosSAMDecoderSelfAttention(embed_dim=32, num_heads=4).eval()
    ours.load_state_dict(reference.state_dict())
    hidden, positions = torch.randn(7, batch_size, 32), torch.randn(7, batch_size, 32)
    with torch.no_grad():
        expected, expected_weights = reference(hidden, position_embeddings=positions, output_attentions=True)
        found, no_weights = ours(hidden, position_embeddings=positions)
        found_without_positions, _ = ours(hidden)
        with_weights = ours(hidden, position_embeddings=positions, output_attentions=True)
        mask = torch.randn(batch_size * 4, 7, 7)
        masked = ours(hidden, attention_mask=mask, position_embeddings=positions)
        keys = torch.randn(5, batch_size, 32)
        cross = ours(hidden, key_value_states=keys, key_value_position_embeddings=positions[:5])
        assert torch.equal(masked[0], reference(hidden, attention_mask=mask, position_embeddings=positions)[0])
        expected_cross = reference(hidden, key_value_states=keys, key_value_position_embeddings=positions[:5])
        assert torch.equal(cross[0], expected_cross[0])
        # (transformers' own needs position embeddings: zeros add nothing)
        expected_without_positions, _ = reference(hidden, position_embeddings=torch.zeros_like(positions))
    assert no_weights is None and found.shape == expected.shape == (7, batch_size, 32)
    torch.testing.assert_close(found, expected, **OUTPUT_TOLERANCE)
    torch.testing.assert_close(found_without_positions, expected_without_positions, **OUTPUT_TOLERANCE)
    assert torch.equal(with_weights[0], expected) and torch.equal(with_weights[1], expected_weights)
    # the positions reach the queries and keys only: a model where they reached the values would differ
    assert not torch.allclose(found, found_without_positions, rtol=1e-3, atol=1e-3)


def test_decoder_layers_ask_for_self_attention_weights_only_when_returned():
    """transformers' decoder layer asks its self-attention for weights in every call; PosSAM's layer asks only with
    `output_attentions` (or in training, transformers' own forward), so the fused self-attention runs at inference;
    the decoder's attentions are still returned when asked for."""
    fast, _ = model_pair(PosSAMModel, "tiny")
    asked = _keyword_seen(fast, PosSAMDecoderSelfAttention, "output_attentions")
    pixel_values = pixels(fast.config)
    layers = fast.config.decoder_layers - 1  # Mask2Former counts the prediction from the learned queries as one
    with torch.no_grad():
        fast.eval()(pixel_values)
        assert asked == [False] * layers
        asked.clear()
        with_attentions = fast(pixel_values, output_attentions=True)
        assert asked == [True] * layers and all(weights is not None for weights in with_attentions.attentions)
        asked.clear()
        fast.train()(pixel_values)
        assert asked == [True] * layers  # transformers' training forward


def test_install_fast_paths_on_a_stock_model_and_twice():
    """The function alone turns the stock model into the fast one; a second call replaces nothing."""
    fast, reference = model_pair(PosSAMModel, "tiny")
    install_fast_paths(reference)
    assert [type(module) for module in reference.modules()] == [type(module) for module in fast.modules()]
    modules = list(fast.modules())
    install_fast_paths(fast)
    assert all(after is before for after, before in zip(fast.modules(), modules))
    pixel_values = pixels(fast.config)
    with torch.no_grad():
        torch.testing.assert_close(
            reference.eval()(pixel_values).masks_queries_logits[-1],
            fast.eval()(pixel_values).masks_queries_logits[-1],
            rtol=0,
            atol=0,
        )


def test_eager_sam_attention_stays_eager_with_fast_paths():
    """`attn_implementation="eager"` asks for transformers' eager attention: the fast path replaces only SDPA's."""
    model = PosSAMModel._from_config(tiny_config(), attn_implementation="eager")
    attention_types = {type(layer.attn) for layer in model.vision_encoder.layers}
    assert attention_types == {SamVisionAttention}
    assert PosSAMMaskPredictor in module_types(model)  # the other three are installed


def test_the_flag_is_a_validated_config_field():
    assert PosSAMConfig().use_fast_paths is True
    with pytest.raises(StrictDataclassFieldValidationError, match="use_fast_paths"):
        PosSAMConfig(use_fast_paths="no")  # a string would count as true: refused by the strict config
    assert tiny_config(use_fast_paths=False).to_dict()["use_fast_paths"] is False


def test_same_state_dict_keys_and_checkpoints_load_either_way(tmp_path):
    fast, reference = model_pair(PosSAMForPanopticSegmentation, "tiny")
    assert list(fast.state_dict()) == list(reference.state_dict())
    assert {k: v.shape for k, v in fast.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    # saved with fast paths, loaded without (and back), nothing missing or unexpected, the same tensors
    fast.save_pretrained(tmp_path / "fast")
    loaded, info = PosSAMForPanopticSegmentation.from_pretrained(
        tmp_path / "fast", use_fast_paths=False, output_loading_info=True
    )
    assert not loaded.config.use_fast_paths and PosSAMMaskPredictor not in module_types(loaded)
    assert not any(info.values()), info
    reference.save_pretrained(tmp_path / "reference")
    back, info = PosSAMForPanopticSegmentation.from_pretrained(
        tmp_path / "reference", use_fast_paths=True, output_loading_info=True
    )
    assert PosSAMMaskPredictor in module_types(back) and not any(info.values()), info
    for key, tensor in fast.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
        assert torch.equal(back.state_dict()[key], tensor), key


# ----------------------------------------------------------------------------------------------------------------------
# Whole model: fast paths on vs off
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_model_outputs_equal_with_fast_paths_on_and_off(name):
    fast, reference = model_pair(PosSAMForPanopticSegmentation, name)
    fast.eval(), reference.eval()
    inputs = {"pixel_values": pixels(fast.config), "class_embeddings": class_embeddings(fast.config)}
    with torch.no_grad():
        found = fast(**inputs, output_auxiliary_logits=True)
        expected = reference(**inputs, output_auxiliary_logits=True)
    for output in ("masks_queries_logits", "class_queries_logits", "clip_class_logits", "iou_scores"):
        torch.testing.assert_close(getattr(found, output), getattr(expected, output), **OUTPUT_TOLERANCE, msg=output)
    assert len(found.auxiliary_logits) == fast.config.decoder_layers - 1
    for found_layer, expected_layer in zip(found.auxiliary_logits, expected.auxiliary_logits):
        for output, value in expected_layer.items():
            torch.testing.assert_close(found_layer[output], value, **OUTPUT_TOLERANCE, msg=output)


@pytest.mark.parametrize("batch_size", [1, 2])  # one image: the attention masks are (Q, h * w), shared by the heads
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mask_generator_equal_without_auxiliary_masks_and_with_attentions(name, batch_size):
    fast, reference = model_pair(PosSAMModel, name)
    fast.eval(), reference.eval()
    pixel_values = pixels(fast.config, batch_size=batch_size)
    with torch.no_grad():
        found = fast(pixel_values, output_auxiliary_masks=False, output_attentions=True)
        expected = reference(pixel_values, output_auxiliary_masks=False, output_attentions=True)
        full = reference(pixel_values)
    # the same contract either way: only the final masks, the intermediate entries None
    for outputs in (found, expected):
        assert all(masks is None for masks in outputs.masks_queries_logits[:-1])
    torch.testing.assert_close(found.masks_queries_logits[-1], expected.masks_queries_logits[-1], **OUTPUT_TOLERANCE)
    torch.testing.assert_close(expected.masks_queries_logits[-1], full.masks_queries_logits[-1], rtol=0, atol=0)
    # the IoU head scores the last layer only, either way
    for outputs in (found, expected):
        assert all(scores is None for scores in outputs.iou_logits[:-1])
    torch.testing.assert_close(found.iou_logits[-1], expected.iou_logits[-1], **OUTPUT_TOLERANCE)
    for output in ("query_states", "attentions"):
        assert len(getattr(found, output)) == len(getattr(expected, output)) > 0
        for found_value, expected_value in zip(getattr(found, output), getattr(expected, output)):
            torch.testing.assert_close(found_value, expected_value, **OUTPUT_TOLERANCE, msg=output)
    # Mask2Former's decoder returns each transformer layer's self-attention weights (B, heads, Q, Q)
    config = fast.config
    assert found.attentions[0].shape == (
        batch_size,
        config.num_attention_heads,
        config.num_queries,
        config.num_queries,
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_equal_with_fast_paths_on_and_off(name):
    """
    Training mode with targets: the loss and the gradient of every trainable parameter, in float64. The fast paths
    change the rounding (another memory layout, another summation order), and the training forward has thresholds:
    masks binarized at logit 0 for pooling, the matching, PointRend's most uncertain points. In float32 a rounding
    difference of 1e-7 flipped one of them for the "windowed_and_global" model once SAM's tokens were stored
    token-major (gradients 0.5% apart in 44 tensors, the loss 8e-6 apart); in float64 they agree to 3e-16 of the
    largest.
    """
    fast, reference = model_pair(PosSAMForPanopticSegmentation, name)
    fast.double(), reference.double()
    # Mask2Former's init puts every deformable sample exactly on a pixel centre (integer offsets, zero weights), where
    # bilinear interpolation has no derivative: grid_sample and the embedding_bag sampler then take one-sided
    # derivatives that may differ by rounding which side of the kink a location lands. Trained offsets are off the
    # grid: move them there, by the same amount in both models.
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter_name, parameter in fast.named_parameters():
            if ".sampling_offsets." in parameter_name:
                parameter.add_(torch.rand(parameter.shape, generator=generator) * 0.2 + 0.1)
    reference.load_state_dict(fast.state_dict())
    fast.train(), reference.train()
    config = fast.config
    size = config.vision_config.image_size
    left = torch.zeros(size, size, dtype=torch.uint8)
    left[:, : size // 3] = 1
    labels = {
        "mask_labels": [torch.stack([left, 1 - left]), torch.stack([left.T.contiguous()])],
        "class_labels": [torch.tensor([0, 3]), torch.tensor([2])],
    }
    inputs = {
        "pixel_values": pixels(config).double(),
        "class_embeddings": class_embeddings(config).double(),
        **labels,
    }
    losses = {}
    for model in (fast, reference):
        torch.manual_seed(3)  # the loss samples its points at random (PointRend): the same points for both
        losses[model] = model(**inputs).loss
        losses[model].backward()
    torch.testing.assert_close(losses[fast], losses[reference], **OUTPUT_TOLERANCE)
    trainable = [(n, p) for n, p in fast.named_parameters() if p.requires_grad]
    reference_parameters = dict(reference.named_parameters())
    assert trainable and all(reference_parameters[n].requires_grad for n, _ in trainable)
    # gradients that are 0 in exact arithmetic (a bias before a GroupNorm, a key bias under softmax) come out as
    # rounding noise of either sign: absolute tolerance relative to the largest gradient
    scale = max(float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None)
    with_gradient = 0
    for parameter_name, parameter in trainable:
        expected = reference_parameters[parameter_name].grad
        assert (parameter.grad is None) == (expected is None), parameter_name
        if expected is not None:
            torch.testing.assert_close(
                parameter.grad, expected, rtol=GRADIENT_RTOL, atol=GRADIENT_ATOL * scale, msg=parameter_name
            )
            with_gradient += 1
    # the pixel decoder's deformable attention and the decoder's cross-attention are among them
    names = [n for n, p in trainable if p.grad is not None]
    assert any(".self_attn.sampling_offsets." in n for n in names) and any(".cross_attn." in n for n in names)
    assert with_gradient > 0.9 * len(trainable)


# ----------------------------------------------------------------------------------------------------------------------
# State passed explicitly
# ----------------------------------------------------------------------------------------------------------------------
def module_state(model) -> dict[str, dict[str, object]]:
    """
    Every module's attributes (`vars`); a dict-valued one (`_parameters`, `_buffers`, `_modules`, the hook tables)
    copied one level down, so an entry added, removed or replaced in it shows too.
    """
    return {
        name: {key: dict(value) if isinstance(value, dict) else value for key, value in vars(module).items()}
        for name, module in model.named_modules()
    }


def same(found, expected) -> bool:
    """The same object, or an equal plain value; dicts entry by entry."""
    if isinstance(expected, dict):
        return (
            isinstance(found, dict)
            and found.keys() == expected.keys()
            and all(same(found[key], value) for key, value in expected.items())
        )
    return found is expected or (not torch.is_tensor(expected) and found == expected)


@pytest.mark.parametrize("use_fast_paths", [True, False])
def test_a_forward_leaves_every_module_as_it_was(use_fast_paths):
    """
    Before issue 15 item 3, `PosSAMModel.forward` set `return_attention_weights` on each decoder layer's
    cross-attention and never reset it: after one forward with `output_attentions=True`, every later forward computed
    the attention weights. Now what a forward asks for is passed as arguments: no module attribute changes.
    """
    torch.manual_seed(0)
    model = PosSAMModel(tiny_config(use_fast_paths=use_fast_paths)).eval()
    pixel_values = pixels(model.config)
    snapshot = module_state(model)
    with torch.no_grad():
        model(pixel_values, output_attentions=True, output_auxiliary_masks=False)
        model(pixel_values, output_attentions=True)
    after = module_state(model)
    assert after.keys() == snapshot.keys()
    for name, attributes in snapshot.items():
        assert after[name].keys() == attributes.keys(), name
        for attribute, value in attributes.items():
            assert same(after[name][attribute], value), f"{name}.{attribute}"


def test_cross_attention_weights_only_when_a_caller_asks():
    """The fast cross-attention computes no weights by default (the decoder drops them), and does when asked."""
    torch.manual_seed(0)
    attention = PosSAMMaskedCrossAttention(16, 2).eval()
    reference = nn.MultiheadAttention(16, 2).eval()
    reference.load_state_dict(attention.state_dict())
    query, key = torch.randn(3, 2, 16), torch.randn(5, 2, 16)
    mask = torch.zeros(4, 3, 5, dtype=torch.bool)
    mask[:, :, 0] = True
    output, weights = attention(query, key, key, attn_mask=mask)
    expected, expected_weights = reference(
        query, key, key, attn_mask=mask
    )  # nn.MultiheadAttention: weights by default
    assert weights is None
    torch.testing.assert_close(output, expected)
    output, weights = attention(query, key, key, attn_mask=mask, need_weights=True)
    torch.testing.assert_close(weights, expected_weights)


# ----------------------------------------------------------------------------------------------------------------------
# A real Mask2FormerConfig, derived from the flat fields old config.json files hold
# ----------------------------------------------------------------------------------------------------------------------
# FC-CLIP / Mask2Former's decoder as PosSAM-B/L/H use it (paper §4.1, FC-CLIP's config), written out independently of
# PosSAMConfig's defaults
PAPER_DECODER = {
    "feature_size": 256,
    "mask_feature_size": 256,
    "hidden_dim": 256,
    "encoder_feedforward_dim": 1024,
    "encoder_layers": 6,
    "decoder_layers": 10,
    "num_attention_heads": 8,
    "dim_feedforward": 2048,
    "num_queries": 250,
    "dropout": 0.0,
    "pre_norm": False,
}


@pytest.mark.parametrize("variant", ["possam-vit-b", "possam-vit-l", "possam-vit-h"])
def test_old_config_json_loads_unchanged_and_gives_a_real_mask2former_config(variant):
    """The model cards' config.json files were written before this change (no `use_fast_paths`, flat fields)."""
    saved = json.loads((MODEL_CARDS / variant / "config.json").read_text())
    assert "use_fast_paths" not in saved and "mask2former_config" not in saved
    config = PosSAMConfig.from_pretrained(MODEL_CARDS / variant)
    assert config.use_fast_paths is True
    mask2former_config = config.mask2former_config
    assert type(mask2former_config) is Mask2FormerConfig
    for field, value in PAPER_DECODER.items():
        assert getattr(mask2former_config, field) == saved[field] == value, field
    # one copy of each hyper-parameter: the derived config is not saved, the flat fields are, as before
    round_trip = config.to_dict()
    assert "mask2former_config" not in round_trip
    assert {key: round_trip[key] for key in PAPER_DECODER} == {key: saved[key] for key in PAPER_DECODER}
    # and it follows the flat fields (it is derived when read, never a stale copy)
    config.num_queries = 100
    assert config.mask2former_config.num_queries == 100


@pytest.mark.parametrize("variant", ["possam-vit-b", "possam-vit-h"])
def test_full_size_decoder_is_transformers_mask2former_decoder(variant):
    """
    The pixel decoder and transformer module of a full-size PosSAM (built on the meta device) have exactly the
    parameters of transformers' Mask2Former modules built from a Mask2FormerConfig written out by hand.
    """
    config = PosSAMConfig.from_pretrained(MODEL_CARDS / variant)
    with torch.device("meta"):
        model = PosSAMModel(config)
        expected_config = Mask2FormerConfig(**PAPER_DECODER)
        pixel_decoder = Mask2FormerPixelDecoder(expected_config, feature_channels=[192, 384, 768, 1536])
        transformer_module = Mask2FormerTransformerModule(in_features=256, config=expected_config)

    def shapes(module):
        return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}

    assert shapes(model.pixel_decoder) == shapes(pixel_decoder)
    assert shapes(model.transformer_module) == shapes(transformer_module)
    # the modules hold a real Mask2FormerConfig, not PosSAMConfig standing in for one
    assert type(model.pixel_decoder.config) is Mask2FormerConfig
    assert type(model.transformer_module.decoder.config) is Mask2FormerConfig
    assert all(type(layer.config) is Mask2FormerConfig for layer in model.transformer_module.decoder.layers)


def test_mask2former_init_reads_the_derived_config():
    """`init_xavier_std` reaches Mask2Former's init of the decoder layers (xavier_uniform with that gain)."""
    torch.manual_seed(0)
    small = PosSAMModel(tiny_config(init_xavier_std=0.01))
    large = PosSAMModel(tiny_config(init_xavier_std=1.0))
    weight = small.transformer_module.decoder.layers[0].fc1.weight
    fan_in, fan_out = weight.shape[1], weight.shape[0]
    bound = 0.01 * (6 / (fan_in + fan_out)) ** 0.5  # xavier_uniform's bound with gain 0.01
    assert weight.abs().max() <= bound
    assert large.transformer_module.decoder.layers[0].fc1.weight.abs().max() > 10 * bound


# ----------------------------------------------------------------------------------------------------------------------
# The pixel decoder's encoder: same values, channel-major storage; the short softmax
# ----------------------------------------------------------------------------------------------------------------------
def test_pixel_decoder_encoder_output_is_stock_values_stored_channel_major():
    """transformers' pixel decoder reads `transpose(1, 2).view(B, C, h, w)` of the encoder's output: with ours that
    map is channel-major (NCHW-strided), the values are the stock encoder's."""
    fast, reference = model_pair(PosSAMModel, "tiny")
    fast.eval(), reference.eval()
    captured = {}
    for name, model in (("fast", fast), ("reference", reference)):
        model.pixel_decoder.encoder.register_forward_hook(
            lambda module, args, output, name=name: captured.__setitem__(name, output.last_hidden_state)
        )
        with torch.no_grad():
            model(pixels(model.config))
    found, expected = captured["fast"], captured["reference"]
    torch.testing.assert_close(found, expected, **OUTPUT_TOLERANCE)
    assert found.shape == expected.shape and found.transpose(1, 2).is_contiguous()
    assert expected.is_contiguous()  # the stock layout: token-major


def test_sam_tokens_are_stock_values_stored_token_major():
    """transformers' patch embedding returns the convolution's NCHW output permuted (the hidden dimension strided by
    the token count), and every SAM block inherits that layout; ours stores the same values token-major, so every
    block reads contiguous rows. The encoder's output is the stock one."""
    fast, reference = model_pair(PosSAMModel, "windowed_and_global")
    fast.eval(), reference.eval()
    captured = {}
    for name, model in (("fast", fast), ("reference", reference)):
        for index, layer in enumerate(model.vision_encoder.layers):
            layer.register_forward_pre_hook(lambda module, args, key=(name, index): captured.__setitem__(key, args[0]))
        with torch.no_grad():
            captured[name] = model.vision_encoder(pixels(model.config)).last_hidden_state
    num_layers = len(fast.vision_encoder.layers)
    for index in range(num_layers):
        found, expected = captured["fast", index], captured["reference", index]
        assert found.is_contiguous(), index
        assert not expected.is_contiguous(), index  # the stock layout, which the replacement exists to avoid
        torch.testing.assert_close(found, expected, **OUTPUT_TOLERANCE)
    assert torch.equal(captured["fast", 0], captured["reference", 0])  # the embedding itself: a copy, same values
    torch.testing.assert_close(captured["fast"], captured["reference"], **OUTPUT_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_softmax_equals_torch_softmax_values_and_gradients(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 8, 12, generator=generator) * 30  # large logits: exp overflows without the max shift
    logits[0, 0, 0] = torch.tensor([1e4] * 6 + [-1e4] * 6)
    logits = logits.to(dtype).requires_grad_()
    found = softmax_over_a_short_last_dimension(logits)
    expected = torch.softmax(logits, dim=-1)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 4e-3}
    torch.testing.assert_close(found, expected, **tolerance)
    grad = torch.randn(found.shape, generator=generator).to(dtype)
    (found_grad,) = torch.autograd.grad(found, logits, grad)
    (expected_grad,) = torch.autograd.grad(expected, logits, grad)
    torch.testing.assert_close(found_grad, expected_grad, **tolerance)


# ----------------------------------------------------------------------------------------------------------------------
# GELU in place in the frozen encoders' MLPs
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_in_place_gelu_is_gelu_in_place_without_autograd_and_out_of_place_with_it(approximate):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 7, 16, generator=generator) * 4
    expected = nn.functional.gelu(values, approximate=approximate)
    activation = InPlaceGELU(approximate)
    with torch.no_grad():
        written = values.clone()
        found = activation(written)
    torch.testing.assert_close(found, expected, rtol=0, atol=0)
    assert found.data_ptr() == written.data_ptr()  # overwrote its input
    tracked = values.clone().requires_grad_()
    found = activation(tracked)
    assert found.data_ptr() != tracked.data_ptr()
    torch.testing.assert_close(tracked, values, rtol=0, atol=0)  # the input is left as it was
    grad = torch.randn(found.shape, generator=generator)
    (found_grad,) = torch.autograd.grad(found, tracked, grad)
    reference = values.clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(nn.functional.gelu(reference, approximate=approximate), reference, grad)
    torch.testing.assert_close(found_grad, expected_grad, rtol=0, atol=0)


def test_in_place_gelu_replaces_exactly_sam_and_convnext_mlp_activations():
    """Whole model with fast paths: every SAM MLP and every ConvNeXt block MLP runs InPlaceGELU, nothing else does
    (the CLIP text tower's quick-GELU, the CLIP head); without fast paths, none. Outputs: the whole-model tests."""
    from timm.layers import Mlp

    fast, reference = model_pair(PosSAMForPanopticSegmentation, "tiny")
    in_place = [name for name, module in fast.named_modules() if isinstance(module, InPlaceGELU)]
    mlps = [name for name, module in fast.named_modules() if isinstance(module, (SamMLPBlock, Mlp))]
    assert in_place == [f"{name}.act" for name in mlps]
    assert any(name.startswith("model.vision_encoder.") for name in in_place)
    assert any(name.startswith("clip.vision_model.stages.") for name in in_place)
    assert not any(isinstance(module, InPlaceGELU) for module in reference.modules())
    # the MLPs themselves: SAM's row-blocked; the tiny ConvNeXt (convnext_atto) has 1x1-conv MLPs, left to timm
    assert {type(module) for module in fast.modules() if isinstance(module, (SamMLPBlock, Mlp))} == {
        PosSAMSamMLPBlock,
        Mlp,
    }
    assert {type(module) for module in reference.modules() if isinstance(module, (SamMLPBlock, Mlp))} == {
        SamMLPBlock,
        Mlp,
    }
    install_in_place_gelu(fast)  # a second call changes nothing
    assert [name for name, module in fast.named_modules() if isinstance(module, InPlaceGELU)] == in_place


# ----------------------------------------------------------------------------------------------------------------------
# MLPs in blocks of rows (SAM's, ConvNeXt's, the pixel decoder's feed-forward network)
# ----------------------------------------------------------------------------------------------------------------------
def stock_mlps(seed=0):
    """transformers' SamMLPBlock (exact GELU), timm's Mlp as ConvNeXt builds it (tanh GELU) and without biases."""
    from timm.layers import GELUTanh, Mlp
    from transformers import SamVisionConfig

    torch.manual_seed(seed)
    sam = SamMLPBlock(SamVisionConfig(hidden_size=12, mlp_dim=40, hidden_act="gelu"))
    convnext = Mlp(12, 48, act_layer=GELUTanh)
    biasless = Mlp(12, 24, out_features=10, bias=False)
    return {"sam": sam, "convnext": convnext, "biasless": biasless}


@pytest.mark.parametrize("name", ["sam", "convnext", "biasless"])
@pytest.mark.parametrize(
    ("hidden_block_bytes", "minimum_rows"), [(1, 1), (40 * 4 * 16, 1), (1, 70), (2**30, 1)]
)  # row by row; 16-row blocks (70 rows: a partial last block); the minimum rows making one block; one block
def test_mlp_in_row_blocks_equals_the_stock_mlp(name, hidden_block_bytes, minimum_rows):
    mlp = stock_mlps()[name].eval()
    first, second = (mlp.lin1, mlp.lin2) if name == "sam" else (mlp.fc1, mlp.fc2)
    hidden_states = torch.randn(2, 5, 7, 12, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        expected = mlp(hidden_states)
        found = mlp_in_row_blocks(
            hidden_states,
            first,
            InPlaceGELU({"sam": "none", "convnext": "tanh", "biasless": "none"}[name]),
            second,
            hidden_block_bytes=hidden_block_bytes,
            minimum_rows_per_block=minimum_rows,
        )
    assert found.shape == expected.shape and found.is_contiguous()
    torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(hidden_states, torch.zeros_like(hidden_states))  # the input is left as it was


def test_install_mlp_fast_paths_replaces_sam_and_linear_timm_mlps_with_their_tensors():
    from timm.layers import Mlp

    mlps = stock_mlps()
    with_norm = Mlp(12, 24, norm_layer=nn.LayerNorm)  # not ConvNeXt's form: left as it is
    container = nn.ModuleDict({**mlps, "with_norm": with_norm})
    keys = dict(container.state_dict())
    activations = {name: mlp.act for name, mlp in mlps.items()}
    install_mlp_fast_paths(container)
    assert type(container["sam"]) is PosSAMSamMLPBlock
    assert type(container["convnext"]) is PosSAMTimmMlp and type(container["biasless"]) is PosSAMTimmMlp
    assert container["with_norm"] is with_norm
    state = container.state_dict()
    assert list(state) == list(keys)
    assert all(state[name] is tensor or state[name].data_ptr() == tensor.data_ptr() for name, tensor in keys.items())
    # the activation: InPlaceGELU of the same approximation (the original object for anything else)
    assert isinstance(container["sam"].act, InPlaceGELU) and container["sam"].act.approximate == "none"
    assert isinstance(container["convnext"].act, InPlaceGELU) and container["convnext"].act.approximate == "tanh"
    assert type(activations["biasless"]) is nn.GELU and container["biasless"].act.approximate == "none"
    modules = list(container.modules())
    install_mlp_fast_paths(container)  # a second call changes nothing
    assert all(after is before for after, before in zip(container.modules(), modules))


@pytest.mark.parametrize("name", ["sam", "convnext"])
def test_row_blocked_mlps_equal_stock_ones_at_inference_and_in_training(name):
    """Inference (no autograd): the blocked path; trainable parameters or an input that needs gradients: the
    stock forward, same values and gradients; in training mode with active dropout (timm), the stock forward."""
    reference = stock_mlps()[name]
    fast = nn.ModuleDict({name: stock_mlps()[name]})
    install_mlp_fast_paths(fast)
    fast = fast[name]
    hidden_states = torch.randn(3, 40, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(hidden_states), reference(hidden_states), rtol=1e-6, atol=1e-6)
    tracked = hidden_states.clone().requires_grad_()
    found = fast(tracked)
    expected = reference(tracked)
    torch.testing.assert_close(found, expected, rtol=0, atol=0)
    grad = torch.randn(found.shape, generator=torch.Generator().manual_seed(3))
    found_grads = torch.autograd.grad(found, [tracked, *fast.parameters()], grad)
    expected_grads = torch.autograd.grad(expected, [tracked, *reference.parameters()], grad)
    for ours, theirs in zip(found_grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if name == "convnext":
        fast.drop1.p = reference.drop1.p = 0.5
        fast.train(), reference.train()
        torch.manual_seed(4)
        with torch.no_grad():
            dropped = fast(hidden_states)
        torch.manual_seed(4)
        with torch.no_grad():
            torch.testing.assert_close(dropped, reference(hidden_states), rtol=0, atol=0)


def test_frozen_encoder_mlps_run_in_row_blocks_while_training(monkeypatch):
    """Frozen weights and an input without gradient (SAM and CLIP while PosSAM trains): the blocked path even with
    autograd on; a trainable MLP under autograd: the stock one."""
    from transformers_possam.modeling import mlp as mlp_module

    calls = []
    blocked = mlp_module.mlp_in_row_blocks
    monkeypatch.setattr(
        mlp_module, "mlp_in_row_blocks", lambda *args, **kwargs: calls.append(1) or blocked(*args, **kwargs)
    )
    container = nn.ModuleDict({"sam": stock_mlps()["sam"]})
    install_mlp_fast_paths(container)
    hidden_states = torch.randn(4, 12)
    container["sam"](hidden_states)
    assert calls == []  # trainable parameters, autograd on
    container.requires_grad_(False)
    container["sam"](hidden_states)
    assert calls == [1]


def test_pixel_decoder_layers_take_the_row_blocked_path_at_inference_with_stock_values(monkeypatch):
    """Each `PosSAMPixelDecoderEncoderLayer` at inference (in-place residual sums, its feed-forward network in row
    blocks) gives transformers' layer values: the mask logits of the whole model equal the stock model's. (Training
    mode and autograd take transformers' forward: `test_gradients_equal_with_fast_paths_on_and_off`.)"""
    from transformers_possam.modeling import pixel_decoder_encoder

    calls = []
    blocked = pixel_decoder_encoder.mlp_in_row_blocks
    monkeypatch.setattr(
        pixel_decoder_encoder,
        "mlp_in_row_blocks",
        lambda *args, **kwargs: calls.append(1) or blocked(*args, **kwargs),
    )
    fast, reference = model_pair(PosSAMModel, "tiny")
    fast.eval(), reference.eval()
    pixel_values = pixels(fast.config)
    with torch.no_grad():
        found = fast(pixel_values).masks_queries_logits[-1]
        assert len(calls) == len(fast.pixel_decoder.encoder.layers)
        expected = reference(pixel_values).masks_queries_logits[-1]
    torch.testing.assert_close(found, expected, **OUTPUT_TOLERANCE)


def test_linear_convnext_mlps_are_row_blocked_with_the_stock_model_outputs():
    """A ConvNeXt with linear MLPs (as PosSAM-B's ConvNeXt-L): every block's MLP is `PosSAMTimmMlp` with fast paths,
    timm's `Mlp` without, and the whole model's outputs are the same."""
    from timm.layers import Mlp

    linear_mlps = {"clip_vision_model_kwargs": {"head_hidden_size": 320, "conv_mlp": False}}
    fast, reference = model_pair(PosSAMForPanopticSegmentation, "tiny", **linear_mlps)
    fast_mlps = [module for module in fast.clip.vision_model.modules() if isinstance(module, Mlp)]
    reference_mlps = [module for module in reference.clip.vision_model.modules() if isinstance(module, Mlp)]
    assert fast_mlps and all(type(module) is PosSAMTimmMlp for module in fast_mlps)
    assert all(type(module) is Mlp for module in reference_mlps)
    fast.eval(), reference.eval()
    pixel_values, embeddings = pixels(fast.config), class_embeddings(fast.config)
    with torch.no_grad():
        found = fast(pixel_values, class_embeddings=embeddings)
        expected = reference(pixel_values, class_embeddings=embeddings)
    torch.testing.assert_close(found.masks_queries_logits, expected.masks_queries_logits, **OUTPUT_TOLERANCE)
    torch.testing.assert_close(found.class_queries_logits, expected.class_queries_logits, **OUTPUT_TOLERANCE)


# ----------------------------------------------------------------------------------------------------------------------
# The sine position embedding, made once per shape
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sine_position_embedding_is_transformers_made_once_per_shape(dtype):
    """`PosSAMSinePositionEmbedding` against transformers' `Mask2FormerSinePositionEmbedding` with the model's
    settings: bitwise the same at the three levels of a 1024x1024 input and odd sizes; a second call with the same
    shape returns the made tensor (no kernels), another batch size or dtype its own; with a mask, transformers' own
    computation (the mask changes the values)."""
    from transformers_possam.modeling.position_embedding import _cached_sine_position_embedding

    settings = {"num_position_features": 128, "normalize": True}
    reference = Mask2FormerSinePositionEmbedding(**settings)
    ours = PosSAMSinePositionEmbedding(**settings)
    _cached_sine_position_embedding.cache_clear()
    for shape in ((1, 256, 32, 32), (1, 256, 64, 64), (1, 256, 128, 128), (2, 256, 7, 13), (1, 256, 1, 1)):
        expected = reference(torch.Size(shape), "cpu", dtype)
        found = ours(torch.Size(shape), "cpu", dtype)
        assert found.dtype == dtype and torch.equal(found, expected), shape
        assert ours(torch.Size(shape), torch.device("cpu"), dtype) is found
    info = _cached_sine_position_embedding.cache_info()
    assert info.misses == 5 and info.hits == 5
    mask = torch.ones(1, 9, 11, dtype=torch.bool)
    mask[:, :, 8:] = False
    assert torch.equal(ours((1, 256, 9, 11), "cpu", dtype, mask), reference((1, 256, 9, 11), "cpu", dtype, mask))
    assert not torch.equal(ours((1, 256, 9, 11), "cpu", dtype, mask), ours((1, 256, 9, 11), "cpu", dtype))


def test_sine_position_embedding_of_fake_tensors_is_not_cached():
    """Shape-only (fake) runs compute the embedding each time and leave nothing in the cache that real runs read."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from transformers_possam.modeling.position_embedding import _cached_sine_position_embedding

    _cached_sine_position_embedding.cache_clear()
    ours = PosSAMSinePositionEmbedding(num_position_features=16, normalize=True)
    with FakeTensorMode():
        fake = ours(torch.Size((1, 32, 5, 5)), "cpu", torch.float32)
    assert is_fake(fake) and _cached_sine_position_embedding.cache_info().currsize == 0
    real = ours(torch.Size((1, 32, 5, 5)), "cpu", torch.float32)
    assert not is_fake(real)


def _small_deformable_layer():
    """A deformable layer of 2 heads over 4 x 4 and 2 x 2 levels, its input `(2, 20, 16)` and keyword arguments."""
    torch.manual_seed(0)
    layer = PosSAMMultiscaleDeformableAttention(embed_dim=16, num_heads=2, n_levels=2, n_points=2)
    hidden = torch.randn(2, 20, 16)
    arguments = {
        "encoder_hidden_states": hidden,
        "position_embeddings": torch.randn(2, 20, 16),
        "reference_points": torch.rand(2, 20, 2, 2),
        "spatial_shapes_list": [(4, 4), (2, 2)],
    }
    return layer, hidden, arguments


def test_deformable_layers_get_no_padding_mask_which_would_change_nothing():
    """PosSAM's padding masks are all False by construction: the pixel decoder passes none to the deformable layers
    (each would mask its values with it, a pass that changes nothing). Each layer's output with an all-False mask is
    its output without one, bitwise; the whole pixel decoder stays within float rounding of transformers', which
    passes the masks."""
    fast, reference = model_pair(PosSAMModel, "tiny")
    masks = _keyword_seen(fast, PosSAMMultiscaleDeformableAttention, "attention_mask")
    pixel_values = pixels(fast.config)
    with torch.no_grad():
        found = fast.eval()(pixel_values, output_hidden_states=True)
        expected = reference.eval()(pixel_values, output_hidden_states=True)
    assert masks and all(mask is None for mask in masks)
    for level_found, level_expected in zip(
        found.pixel_decoder_hidden_states, expected.pixel_decoder_hidden_states, strict=True
    ):
        torch.testing.assert_close(level_found, level_expected, rtol=1e-5, atol=1e-5)

    layer, hidden, arguments = _small_deformable_layer()
    with torch.no_grad():
        without = layer(hidden, attention_mask=None, **arguments)[0]
        all_false = layer(hidden, attention_mask=torch.zeros(2, 20, dtype=torch.bool), **arguments)[0]
        some_true = layer(hidden, attention_mask=torch.arange(20).expand(2, 20) < 3, **arguments)[0]
    assert torch.equal(without, all_false)
    assert not torch.equal(without, some_true)  # the mask is read when it masks something


def _keyword_seen(model, module_type, keyword: str) -> list:
    """The `keyword` argument each `module_type` module of `model` is called with, in call order."""
    seen: list = []
    for module in model.modules():
        if isinstance(module, module_type):
            module.register_forward_pre_hook(
                lambda module, args, kwargs: seen.append(kwargs[keyword]), with_kwargs=True
            )
    return seen


def _reference_points_seen(model) -> list[torch.Tensor]:
    """The reference points each deformable layer of `model` is called with, in call order."""
    return _keyword_seen(model, PosSAMMultiscaleDeformableAttention, "reference_points")


def _transformers_reference_points(sizes, batch_size, dtype):
    """What transformers' pixel decoder gives the deformable layers: valid ratios of all-False padding masks in
    `dtype`, then `get_reference_points`, both transformers' own functions."""
    decoder = Mask2FormerPixelDecoder.__new__(Mask2FormerPixelDecoder)  # get_valid_ratio reads no attribute
    ratios = torch.stack(
        [decoder.get_valid_ratio(torch.zeros(batch_size, h, w, dtype=torch.bool), dtype=dtype) for h, w in sizes], 1
    )
    return Mask2FormerPixelDecoderEncoderOnly.get_reference_points(sizes, ratios, "cpu")


def test_pixel_decoder_reference_points_made_once_in_float32():
    """The pixel decoder's maps have no padding, so its valid ratios are 1 and its reference points constants of the
    levels' sizes: made once (one tensor for every layer and forward, `(1, N, levels, 2)`, shared by the batch) in
    float32 whatever the model's dtype, as FC-CLIP's, and equal bitwise to transformers' float32 points for each
    image. transformers makes them in the model's dtype: in bf16 off by up to 0.19 pixel on a 100-pixel level."""
    fast, _ = model_pair(PosSAMModel, "tiny")
    seen = _reference_points_seen(fast)
    pixel_values = pixels(fast.config, batch_size=2)
    with torch.no_grad():
        fast.eval()(pixel_values)
        calls_per_forward = len(seen)
        fast(pixel_values)
    assert calls_per_forward == fast.config.encoder_layers and len(seen) == 2 * calls_per_forward
    assert all(points is seen[0] for points in seen)  # made once
    sizes = [(size // stride, size // stride) for size in [pixel_values.shape[-1]] for stride in (32, 16, 8)]
    expected = _transformers_reference_points(sizes, 2, torch.float32)
    assert seen[0].dtype == torch.float32 and seen[0].shape == (1, *expected.shape[1:])
    assert torch.equal(seen[0].expand_as(expected), expected)

    # a bf16 model: the same float32 points
    seen.clear()
    with torch.no_grad():
        fast.to(torch.bfloat16)(pixel_values.bfloat16())
    assert seen and all(torch.equal(points, expected[:1]) for points in seen)
    assert all(points.dtype == torch.float32 for points in seen)

    # why: transformers' bf16 points on a 100 x 100 level, against its float32 ones, in pixels of the level
    in_bf16 = _transformers_reference_points([(100, 100)], 1, torch.bfloat16).float()
    in_float32 = _transformers_reference_points([(100, 100)], 1, torch.float32)
    assert 0.15 < (in_bf16 - in_float32).abs().max().item() * 100 < 0.2


def _config_with_image_size(size: int, **overrides):
    vision_config = tiny_config().vision_config.to_dict()
    vision_config["image_size"] = size
    return tiny_config(vision_config=vision_config, **overrides)


def test_reference_points_off_powers_of_2_in_bf16_and_float64():
    """At 160 px the pixel decoder's levels are 5, 10 and 20 pixels wide, where bf16 rounds (i + 0.5) / w: a bf16
    model's points are transformers' float32 ones (not its bf16 ones), and a float64 model's stay float64, so fast
    paths on and off agree to float64 rounding (with float32 points they differed by 2.6e-8)."""
    torch.manual_seed(0)
    fast = PosSAMModel(_config_with_image_size(160)).eval()
    reference = PosSAMModel(_config_with_image_size(160, use_fast_paths=False)).eval()
    reference.load_state_dict(fast.state_dict())
    sizes = [(5, 5), (10, 10), (20, 20)]
    seen = _reference_points_seen(fast)
    pixel_values = pixels(fast.config, batch_size=2)
    with torch.no_grad():
        fast.to(torch.bfloat16)(pixel_values.bfloat16())
    in_float32 = _transformers_reference_points(sizes, 1, torch.float32)
    in_bf16 = _transformers_reference_points(sizes, 1, torch.bfloat16)
    assert not torch.equal(in_bf16.float(), in_float32)  # the sizes are ones where it matters
    assert seen and all(points.dtype == torch.float32 and torch.equal(points, in_float32) for points in seen)

    seen.clear()
    # the sampling offsets moved off Mask2Former's init (every sample on a pixel centre there)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in fast.named_parameters():
            if ".sampling_offsets." in name:
                parameter.copy_(parameter.float() + torch.rand(parameter.shape, generator=generator) * 0.2 + 0.1)
    reference.load_state_dict(fast.float().state_dict())
    fast.double(), reference.double()
    with torch.no_grad():
        found, expected = fast(pixel_values.double()), reference(pixel_values.double())
    assert seen and all(points.dtype == torch.float64 for points in seen)
    torch.testing.assert_close(found.mask_features, expected.mask_features, rtol=0, atol=1e-12)
    torch.testing.assert_close(found.masks_queries_logits[-1], expected.masks_queries_logits[-1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pixel_decoder_built_alone_with_transformers_layers_equals_transformers(dtype):
    """`PosSAMPixelDecoder` built directly holds transformers' encoder and deformable layers, which sample in the
    model's dtype: its reference points are made in that dtype, and its output is transformers' pixel decoder's,
    bitwise, in float32 and in bf16 (float32 points would meet bf16 values in transformers' grid_sample)."""
    torch.manual_seed(0)
    model = PosSAMModel(tiny_config(use_fast_paths=False)).eval()
    stock = model.pixel_decoder
    ours = PosSAMPixelDecoder(stock.config, feature_channels=stock.feature_channels).eval()
    ours.load_state_dict(stock.state_dict())
    assert type(ours.encoder) is Mask2FormerPixelDecoderEncoderOnly
    with torch.no_grad():
        features = model.fpn(model.vision_encoder(pixels(model.config)).last_hidden_state)
        features = [level.to(dtype) for level in features]
        found, expected = ours.to(dtype)(features), stock.to(dtype)(features)
    assert torch.equal(found.mask_features, expected.mask_features)
    for level_found, level_expected in zip(found.multi_scale_features, expected.multi_scale_features, strict=True):
        assert torch.equal(level_found, level_expected)


def test_deformable_attention_weights_under_autocast_are_float32():
    """Asked for under autocast, the attention weights come back in float32, as `F.softmax` gives there (FC-CLIP);
    in a bf16 model without autocast, in bf16 (the logits' dtype); either way they sum to 1 over levels x points."""
    layer, hidden, arguments = _small_deformable_layer()
    layer.eval()
    arguments["output_attentions"] = True
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, under_autocast = layer(hidden, **arguments)
        bf16_layer = layer.to(torch.bfloat16)
        _, in_bf16 = bf16_layer(
            hidden.bfloat16(),
            **{
                **arguments,
                "encoder_hidden_states": hidden.bfloat16(),
                "position_embeddings": arguments["position_embeddings"].bfloat16(),
            },
        )
    assert under_autocast.dtype == torch.float32 and in_bf16.dtype == torch.bfloat16
    for weights in (under_autocast, in_bf16):
        torch.testing.assert_close(weights.float().flatten(-2).sum(-1), torch.ones(2, 20, 2), rtol=0, atol=1e-2)


def test_pixel_decoder_encoder_reference_points_for_other_valid_ratios_are_transformers():
    """Only the pixel decoder's own cached valid ratios (recognized by identity: nothing is read from the device)
    select the cached points; any other valid ratios, padding or not, get transformers' computation, per image."""
    from transformers_possam.modeling.pixel_decoder_encoder import unpadded_valid_ratios

    sizes = [(3, 5), (6, 10)]
    padded = torch.tensor([[[1.0, 0.5], [1.0, 0.5]], [[0.8, 1.0], [0.8, 1.0]]])
    ones_not_cached = torch.ones(1, 2, 2)
    cached = unpadded_valid_ratios(2, torch.float32, torch.device("cpu"), like=ones_not_cached)
    for ratios in (padded, ones_not_cached):
        found = PosSAMPixelDecoderEncoder.get_reference_points(sizes, ratios, "cpu")
        assert torch.equal(found, Mask2FormerPixelDecoderEncoderOnly.get_reference_points(sizes, ratios, "cpu"))
    first = PosSAMPixelDecoderEncoder.get_reference_points(sizes, cached, "cpu")
    assert PosSAMPixelDecoderEncoder.get_reference_points(sizes, cached, "cpu") is first
    assert torch.equal(first, Mask2FormerPixelDecoderEncoderOnly.get_reference_points(sizes, ones_not_cached, "cpu"))
    assert not torch.equal(
        first.expand(2, -1, -1, -1), Mask2FormerPixelDecoderEncoderOnly.get_reference_points(sizes, padded, "cpu")
    )


def test_sine_position_embedding_cache_keeps_autocast_apart():
    """The embedding made under autocast is kept apart from the one made without it (under CUDA autocast a bf16
    request comes out float32: whichever came first must not serve the other), and each equals transformers'."""
    from transformers_possam.modeling.position_embedding import _cached_sine_position_embedding

    settings = {"num_position_features": 16, "normalize": True}
    reference = Mask2FormerSinePositionEmbedding(**settings)
    ours = PosSAMSinePositionEmbedding(**settings)
    _cached_sine_position_embedding.cache_clear()
    shape = torch.Size((1, 32, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ours(shape, "cpu", torch.bfloat16)
        assert torch.equal(under_autocast, reference(shape, "cpu", torch.bfloat16))
    plain = ours(shape, "cpu", torch.bfloat16)
    assert plain is not under_autocast and torch.equal(plain, reference(shape, "cpu", torch.bfloat16))
    assert _cached_sine_position_embedding.cache_info().currsize == 2
    assert ours(torch.Size((1, 32, 2, 2)), "meta", torch.float32).device.type == "meta"  # no autocast on meta
