import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoConfig, AutoModel, AutoModelForUniversalSegmentation

from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation, PosSAMModel, tiny_config
from transformers_possam.modeling import PosSAMOpenVocabularyClassifier

from .conftest import IMAGE_SIZE, NUM_CLASSES


REPO = Path(__file__).resolve().parents[1]


def random_labels(batch_size, num_segments=(3, 0), size=IMAGE_SIZE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask_labels, class_labels = [], []
    for index in range(batch_size):
        count = num_segments[index % len(num_segments)]
        ids = torch.randint(0, max(count, 1), (size, size), generator=generator)
        mask_labels.append(
            torch.stack([(ids == k) for k in range(count)]).to(torch.uint8)
            if count
            else torch.zeros(0, size, size, dtype=torch.uint8)
        )
        class_labels.append(torch.randint(0, NUM_CLASSES, (count,), generator=generator))
    return mask_labels, class_labels


def test_forward_shapes(model, config, pixel_values, vocabulary):
    input_ids, synonym_mask = vocabulary
    with torch.no_grad():
        out = model(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
    batch, queries = 2, config.num_queries
    assert out.class_queries_logits.shape == (batch, queries, NUM_CLASSES + 1)
    assert out.clip_class_logits.shape == (batch, queries, NUM_CLASSES)
    assert out.masks_queries_logits.shape == (batch, queries, IMAGE_SIZE // 4, IMAGE_SIZE // 4)
    assert out.iou_scores.shape == (batch, queries)
    assert ((out.iou_scores >= 0) & (out.iou_scores <= 1)).all()
    assert out.ldp_embeddings.shape == (batch, queries, config.clip_embed_dim)
    assert out.class_embeddings.shape == (NUM_CLASSES, 2, config.clip_embed_dim)
    assert out.image_embeddings.shape == (
        batch,
        config.vision_config.output_channels,
        IMAGE_SIZE // 16,
        IMAGE_SIZE // 16,
    )
    assert out.clip_features.shape[-2:] == (IMAGE_SIZE // 32, IMAGE_SIZE // 32)
    assert out.loss is None and out.auxiliary_logits is None
    assert torch.allclose(out.class_embeddings.norm(dim=-1), torch.ones(NUM_CLASSES, 2))


def test_base_model_outputs_every_decoder_layer(config, pixel_values):
    torch.manual_seed(0)
    base = PosSAMModel(config).eval()
    with torch.no_grad():
        out = base(pixel_values)
    assert len(out.masks_queries_logits) == len(out.query_states) == len(out.iou_logits) == config.decoder_layers
    assert [f.shape[-1] for f in out.fpn_features] == [IMAGE_SIZE // s for s in (4, 8, 16, 32)]
    assert [f.shape[1] for f in out.fpn_features] == list(config.fpn_out_channels)
    embeddings = base.get_image_embeddings(pixel_values)
    assert torch.equal(embeddings, out.image_embeddings)


def test_inference_without_auxiliary_masks_gives_the_same_outputs(model, pixel_values, vocabulary):
    """Inference skips the intermediate layers' 1/4-resolution masks (attention masks come from resized features)."""
    input_ids, synonym_mask = vocabulary
    base = model.model
    with torch.no_grad():
        full = base(pixel_values)
        fast = base(pixel_values, output_auxiliary_masks=False)
        with_auxiliary = model(
            pixel_values, input_ids=input_ids, synonym_mask=synonym_mask, output_auxiliary_logits=True
        )
        default = model(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
    assert all(masks is None for masks in fast.masks_queries_logits[:-1])
    torch.testing.assert_close(fast.masks_queries_logits[-1], full.masks_queries_logits[-1], atol=1e-5, rtol=1e-5)
    # the IoU head scores the last layer only: the others None, the last as with every layer scored
    assert len(fast.iou_logits) == len(full.iou_logits) == len(full.query_states)
    assert all(scores is None for scores in fast.iou_logits[:-1])
    assert all(isinstance(scores, torch.Tensor) for scores in full.iou_logits)
    torch.testing.assert_close(fast.iou_logits[-1], full.iou_logits[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default.iou_scores, full.iou_logits[-1].sigmoid(), atol=1e-5, rtol=1e-5)
    for fast_states, full_states in zip(fast.query_states, full.query_states):
        torch.testing.assert_close(fast_states, full_states, atol=1e-5, rtol=1e-5)
    for name in ("masks_queries_logits", "class_queries_logits", "clip_class_logits", "iou_scores"):
        torch.testing.assert_close(getattr(default, name), getattr(with_auxiliary, name), atol=1e-5, rtol=1e-5)
    # the commuting identity itself: resize(einsum(E, F)) == einsum(E, resize(F))
    predictor = base.transformer_module.decoder.mask_predictor
    states = full.query_states[1].transpose(0, 1)
    for size in [tuple(f.shape[-2:]) for f in full.multi_scale_features]:
        _, expected = predictor(states, full.mask_features, size)
        masks, attention = predictor(states, predictor.attention_mask_features(full.mask_features, [size]), size)
        assert masks is None and torch.equal(attention, expected)


def test_decoder_attentions_only_when_asked(config, pixel_values):
    torch.manual_seed(0)
    base = PosSAMModel(config).eval()
    with torch.no_grad():
        plain = base(pixel_values)
        with_attentions = base(pixel_values, output_attentions=True)
    assert plain.attentions is None
    # Mask2Former's decoder returns each transformer layer's self-attention weights over the queries
    assert len(with_attentions.attentions) == config.decoder_layers - 1
    for weights in with_attentions.attentions:
        assert weights.shape == (
            pixel_values.shape[0],
            config.num_attention_heads,
            config.num_queries,
            config.num_queries,
        )
    torch.testing.assert_close(
        plain.masks_queries_logits[-1], with_attentions.masks_queries_logits[-1], atol=1e-5, rtol=1e-5
    )


def test_precomputed_class_embeddings_match_tokens(model, pixel_values, vocabulary):
    input_ids, synonym_mask = vocabulary
    with torch.no_grad():
        from_tokens = model(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
        class_embeddings, mask = model.get_class_embeddings(input_ids, synonym_mask=synonym_mask)
        from_embeddings = model(pixel_values, class_embeddings=class_embeddings, synonym_mask=mask)
    torch.testing.assert_close(
        from_tokens.class_queries_logits, from_embeddings.class_queries_logits, atol=1e-5, rtol=1e-5
    )
    # template averaging: normalize each prompt, mean over templates, normalize again
    prompts = torch.nn.functional.normalize(model.get_text_features(input_ids[2, 0]).pooler_output, dim=-1)
    assert torch.allclose(class_embeddings[2, 0], torch.nn.functional.normalize(prompts.mean(0), dim=0), atol=1e-6)


def test_vocabulary_encoding_one_pass_real_synonyms_only(model, vocabulary):
    input_ids, synonym_mask = vocabulary
    input_ids = input_ids.clone()
    input_ids[..., -3:] = 49407  # end of text, then two padding tokens (CLIP pads with the end-of-text id)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[..., -2:] = 0  # padding columns in every prompt: dropped before the text tower
    seen = []
    original = model.clip.text_embeddings

    def counting(ids, mask=None):
        seen.append(tuple(ids.shape))
        return original(ids, mask)

    model.clip.text_embeddings = counting
    try:
        with torch.no_grad():
            one_pass, _ = model.get_class_embeddings(input_ids, attention_mask, synonym_mask)
            calls_one_pass = list(seen)
            chunked, _ = model.get_class_embeddings(input_ids, attention_mask, synonym_mask, text_batch_size=4)
    finally:
        del model.clip.text_embeddings
    num_templates, seq_len = input_ids.shape[2:]
    assert calls_one_pass == [(int(synonym_mask.sum()) * num_templates, seq_len - 2)]
    torch.testing.assert_close(chunked, one_pass, atol=1e-6, rtol=1e-6)
    # the dropped columns were padding: encoding the full prompts gives the same embeddings
    with torch.no_grad():
        reference = torch.nn.functional.normalize(
            model.get_text_features(input_ids[0, 0], attention_mask[0, 0]).pooler_output, dim=-1
        )
    torch.testing.assert_close(
        one_pass[0, 0], torch.nn.functional.normalize(reference.mean(0), dim=0), atol=1e-5, rtol=1e-5
    )
    padding = ~synonym_mask
    assert torch.equal(one_pass[padding], one_pass[:, 0][padding.nonzero()[:, 0]])
    with pytest.raises(ValueError, match="text_batch_size"):
        model.get_class_embeddings(input_ids, attention_mask, synonym_mask, text_batch_size=0)


def test_synonym_max_ignores_padding_slots():
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    classes = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    logits = PosSAMOpenVocabularyClassifier.max_over_synonyms(embeddings, classes, mask, torch.tensor(10.0))
    # class 0 takes the best synonym (cos 1 for both inputs); class 1's padded slot (cos 1 with input 1) is ignored
    assert torch.allclose(logits, torch.tensor([[10.0, 6.0], [10.0, 8.0]]))


def test_loss_and_gradients_reach_exactly_trainable_parameters(config, pixel_values, vocabulary):
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config).train()
    input_ids, synonym_mask = vocabulary
    mask_labels, class_labels = random_labels(2, num_segments=(3, 2))
    out = model(
        pixel_values,
        input_ids=input_ids,
        synonym_mask=synonym_mask,
        mask_labels=mask_labels,
        class_labels=class_labels,
    )
    assert torch.isfinite(out.loss)
    expected_parts = {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_iou"}
    assert expected_parts <= set(out.loss_dict)
    # deep supervision: every earlier decoder layer gets its own copy of each loss
    for layer in range(config.decoder_layers - 1):
        assert {f"{name}_{layer}" for name in expected_parts} <= set(out.loss_dict)
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_iou": 1.0}
    expected_total = sum(weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in out.loss_dict.items())
    assert torch.allclose(out.loss, expected_total)
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_freezing_exactly_sam_encoder_and_clip(config):
    model = PosSAMForPanopticSegmentation(config)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("model.vision_encoder.", "clip."))}
    assert frozen == expected and len(expected) > 0
    model.train()
    assert not model.model.vision_encoder.training and not model.clip.training
    assert model.model.pixel_decoder.training and model.ldp.training


def test_images_without_segments_train(config, pixel_values, vocabulary):
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config).train()
    input_ids, synonym_mask = vocabulary
    mask_labels, class_labels = random_labels(2, num_segments=(0,))
    out = model(
        pixel_values,
        input_ids=input_ids,
        synonym_mask=synonym_mask,
        mask_labels=mask_labels,
        class_labels=class_labels,
    )
    assert torch.isfinite(out.loss)
    assert out.loss_dict["loss_mask"] == 0 and out.loss_dict["loss_iou"] == 0
    out.loss.backward()


def test_batch_of_two_equals_two_batches_of_one(model, pixel_values, vocabulary):
    input_ids, synonym_mask = vocabulary
    with torch.no_grad():
        both = model(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
        singles = [model(pixel_values[i : i + 1], input_ids=input_ids, synonym_mask=synonym_mask) for i in range(2)]
    for name in ("masks_queries_logits", "class_queries_logits", "clip_class_logits", "iou_scores"):
        stacked = torch.cat([getattr(single, name) for single in singles])
        torch.testing.assert_close(getattr(both, name), stacked, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip_and_auto_classes(model, pixel_values, vocabulary, tmp_path):
    input_ids, synonym_mask = vocabulary
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "possam"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PosSAMConfig)
    loaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PosSAMForPanopticSegmentation)
    assert not any(p.requires_grad for p in loaded.clip.parameters())
    assert not any(p.requires_grad for p in loaded.model.vision_encoder.parameters())
    with torch.no_grad():
        before = model(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
        after = loaded(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
    for name in ("masks_queries_logits", "class_queries_logits", "clip_class_logits", "iou_scores"):
        assert torch.equal(getattr(before, name), getattr(after, name))

    base = PosSAMModel(model.config)
    base.save_pretrained(tmp_path / "base")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "base"), PosSAMModel)


def test_sdpa_and_eager_sam_attention_agree(model, pixel_values, vocabulary, tmp_path):
    input_ids, synonym_mask = vocabulary
    model.save_pretrained(tmp_path)
    eager = PosSAMForPanopticSegmentation.from_pretrained(tmp_path, attn_implementation="eager").eval()
    sdpa = PosSAMForPanopticSegmentation.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert type(eager.model.vision_encoder.layers[0].attn).__name__ == "SamVisionAttention"
    # sdpa: transformers' SDPA attention, run head by head (PosSAMVisionAttention, a SamVisionSdpaAttention subclass)
    assert type(sdpa.model.vision_encoder.layers[0].attn).__name__ == "PosSAMVisionAttention"
    assert all(type(layer.attn).__name__ == "PosSAMVisionAttention" for layer in sdpa.model.vision_encoder.layers)
    with torch.no_grad():
        a = eager(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
        b = sdpa(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
    torch.testing.assert_close(a.image_embeddings, b.image_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.masks_queries_logits, b.masks_queries_logits, atol=1e-4, rtol=1e-4)


def test_image_features_convert_sam_to_clip_normalization(model, config):
    image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    sam = (image - torch.tensor(config.sam_image_mean).view(1, 3, 1, 1)) / torch.tensor(config.sam_image_std).view(
        1, 3, 1, 1
    )
    clip = (image - torch.tensor(config.clip_image_mean).view(1, 3, 1, 1)) / torch.tensor(config.clip_image_std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        ours = model.get_image_features(sam).pooler_output
        reference = model.clip.vision_model(clip)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert ours.shape == (1, config.clip_embed_dim)


def test_bf16_inference_is_finite(config, pixel_values, vocabulary):
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config).eval().to(torch.bfloat16)
    input_ids, synonym_mask = vocabulary
    with torch.no_grad():
        out = model(pixel_values.to(torch.bfloat16), input_ids=input_ids, synonym_mask=synonym_mask)
    assert out.class_queries_logits.dtype == torch.bfloat16
    assert all(
        torch.isfinite(t.float()).all()
        for t in (out.class_queries_logits, out.clip_class_logits, out.masks_queries_logits)
    )


def test_bad_inputs_raise_clear_errors(model, pixel_values, vocabulary):
    input_ids, synonym_mask = vocabulary
    with pytest.raises(ValueError, match="vocabulary"):
        model(pixel_values)
    with pytest.raises(ValueError, match="no synonym"):
        model(pixel_values, input_ids=input_ids, synonym_mask=torch.zeros_like(synonym_mask))
    with pytest.raises(ValueError, match="input_ids must be"):
        model(pixel_values, input_ids=input_ids[0])
    mask_labels, class_labels = random_labels(2, num_segments=(2,))
    with pytest.raises(ValueError, match="index the 5 classes"):
        model(pixel_values, input_ids=input_ids, mask_labels=mask_labels, class_labels=[c + 10 for c in class_labels])
    with pytest.raises(ValueError, match="one entry per image"):
        model(pixel_values, input_ids=input_ids, mask_labels=mask_labels[:1], class_labels=class_labels[:1])
    with pytest.raises(ValueError, match="do not cover"):
        model(
            pixel_values, input_ids=input_ids, mask_labels=[m[:, :64] for m in mask_labels], class_labels=class_labels
        )
    with pytest.raises(StrictDataclassClassValidationError, match="multiple of 32"):
        tiny_config(feature_size=48)


def test_text_config_dict_defaults_to_convnext_large_d_320():
    config = PosSAMConfig(text_config={"num_hidden_layers": 2})
    assert config.text_config.hidden_size == 768 and config.text_config.hidden_act == "gelu"
    assert config.text_config.num_hidden_layers == 2
    default = PosSAMConfig()
    assert (
        default.text_config.num_hidden_layers,
        default.text_config.num_attention_heads,
        default.text_config.projection_dim,
    ) == (16, 12, 768)
    assert (
        default.num_queries,
        default.hidden_dim,
        default.dim_feedforward,
        default.decoder_layers,
        default.encoder_layers,
    ) == (250, 256, 2048, 10, 6)
    assert not hasattr(default, "mase_alpha")  # MASE weights live in the image processor
    assert len(default.training_vocabulary) == 133 and default.training_vocabulary[0].startswith("person,")


# Paper Table B.1: frozen parameters 441.4M / 660.0M / 988.7M, trainable 51.5M for all three.
PAPER_FROZEN = {"possam-vit-b": 441.4e6, "possam-vit-l": 660.0e6, "possam-vit-h": 988.7e6}
SAM_WIDTHS = {
    "possam-vit-b": (768, 12, (2, 5, 8, 11)),
    "possam-vit-l": (1024, 24, (5, 11, 17, 23)),
    "possam-vit-h": (1280, 32, (7, 15, 23, 31)),
}


@pytest.mark.parametrize("variant", sorted(PAPER_FROZEN))
def test_paper_parameter_counts_on_meta_device(variant):
    config = PosSAMConfig.from_pretrained(REPO / "model_cards" / variant)
    hidden, layers, global_layers = SAM_WIDTHS[variant]
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (hidden, layers)
    assert tuple(config.vision_config.global_attn_indexes) == global_layers
    with torch.device("meta"):
        model = PosSAMForPanopticSegmentation(config)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert abs(frozen - PAPER_FROZEN[variant]) / PAPER_FROZEN[variant] < 1e-3
    assert abs(trainable - 51.5e6) / 51.5e6 < 0.10
    # the frozen set is exactly the SAM encoder plus the whole CLIP
    sam = sum(p.numel() for p in model.model.vision_encoder.parameters())
    clip = sum(p.numel() for p in model.clip.parameters())
    assert frozen == sam + clip


@pytest.mark.parametrize("use_fast_paths", [True, False])
@pytest.mark.parametrize("variant", ["possam-vit-b", "tiny"])
def test_a_model_built_under_a_device_context_is_wholly_on_that_device(variant, use_fast_paths):
    """
    `with torch.device("cuda"): PosSAMForPanopticSegmentation(config)` (benchmarks/gpu.py, `from_pretrained`'s meta
    build) must put every tensor there. Transformers' pixel decoder allocates `level_embed` with the legacy
    `torch.Tensor(...)` constructor, which ignores the context: on an H200 every full-size row failed with "Expected all
    tensors to be on the same device" (2026-11-26). The meta device stands in for CUDA: the same context mechanism.
    """
    config = tiny_config() if variant == "tiny" else PosSAMConfig.from_pretrained(REPO / "model_cards" / variant)
    config.use_fast_paths = use_fast_paths
    with torch.device("meta"):
        model = PosSAMForPanopticSegmentation(config)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert len(tensors) > 100
    assert [name for name, tensor in tensors if tensor.device.type != "meta"] == []
    # tensors kept as plain attributes would escape `.to(device)` as well as the context
    stray = [
        f"{module_name}.{attribute}"
        for module_name, module in model.named_modules()
        for attribute, value in vars(module).items()
        if isinstance(value, torch.Tensor) and value.device.type != "meta"
    ]
    assert stray == []


@pytest.mark.parametrize("variant", sorted(PAPER_FROZEN))
def test_model_card_folders_are_hub_ready(variant):
    import yaml
    from transformers import AutoImageProcessor, AutoProcessor

    folder = REPO / "model_cards" / variant
    text = (folder / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-segmentation"
    assert "model-index" not in metadata  # no weights, so no evaluation results (tests/test_model_cards.py)
    assert "No trained" in text  # never claims weights that do not exist
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "PosSAMProcessor" and len(processor.tokenizer) == 49408
    assert type(AutoImageProcessor.from_pretrained(folder)).__name__ == "PosSAMImageProcessor"


def _initialized_on_meta(config) -> PosSAMForPanopticSegmentation:
    """Built on the meta device, materialized, then initialized by `init_weights` only (as missing checkpoint keys)."""
    with torch.device("meta"):
        model = PosSAMForPanopticSegmentation(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


CLIP_IMAGE_TOWERS = {
    "convnext_layer_scale_default": ("convnext_atto", {"head_hidden_size": 320}),
    "convnext_layer_scale_given": ("convnext_atto", {"head_hidden_size": 320, "ls_init_value": 0.5}),
    "convnext_v2_grn_no_layer_scale": ("convnextv2_atto", {"head_hidden_size": 320}),
}


@pytest.mark.parametrize("tower", sorted(CLIP_IMAGE_TOWERS))
def test_meta_device_init_gives_the_clip_image_tower_timms_layer_scales(tower):
    """
    timm fills ConvNeXt layer scales (`gamma`, `ls_init_value`) and ConvNeXt-V2's GRN only at construction; a model
    built on "meta" (or loaded without those keys) must get the same values from `init_weights`, not leftover memory.
    """
    import timm

    name, kwargs = CLIP_IMAGE_TOWERS[tower]
    config = tiny_config(clip_vision_model_name=name, clip_vision_model_kwargs=kwargs)
    model = _initialized_on_meta(config)
    reference = timm.create_model(name, pretrained=False, num_classes=config.clip_embed_dim, **kwargs)
    ours = dict(model.clip.vision_model.named_parameters())
    timm_own = {n: p for n, p in reference.named_parameters() if n.endswith(("gamma", "grn.weight", "grn.bias"))}
    assert timm_own, "the tower has no construction-time parameters to check"
    for parameter_name, expected in timm_own.items():
        assert torch.equal(ours[parameter_name], expected), parameter_name
    for parameter_name, parameter in model.named_parameters():
        assert torch.isfinite(parameter).all() and parameter.abs().max() < 1e3, parameter_name


@pytest.mark.parametrize("built", ["constructed", "meta_then_init_weights"])
def test_clip_text_tower_is_initialized_with_clips_scheme(built):
    """
    Each text-tower weight has the spread transformers' CLIP init gives it (e.g. q/k/v (hidden^-0.5)(2 layers)^-0.5,
    not the generic 0.02), checked against a `CLIPTextModelWithProjection` built from the same text config.
    """
    from transformers import CLIPTextModelWithProjection

    config = tiny_config()
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config) if built == "constructed" else _initialized_on_meta(config)
    reference = dict(CLIPTextModelWithProjection(config.text_config).named_parameters())
    for parameter_name, parameter in model.clip.text_model.named_parameters():
        expected = reference[parameter_name]
        if expected.numel() < 256 or expected.std() == 0:  # biases and norms: exact constants
            torch.testing.assert_close(parameter, expected, msg=parameter_name)
        else:
            ratio = (parameter.std() / expected.std()).item()
            assert 0.8 < ratio < 1.25, (parameter_name, ratio)


@pytest.mark.parametrize("built", ["constructed", "meta_then_init_weights"])
def test_mask2former_modules_get_mask2formers_init(built):
    """
    Mask2Former's `_init_weights` sets the deformable attention's sampling-offset grid (zero weight, a bias pointing
    each head in its own direction) and zero attention weights; the query embeddings keep nn.Embedding's N(0, 1).
    Compared with transformers' Mask2Former init applied to a fresh module of the same sizes.
    """
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
        Mask2FormerPreTrainedModel,
    )

    config = tiny_config()
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config) if built == "constructed" else _initialized_on_meta(config)
    for layer in model.model.pixel_decoder.encoder.layers:
        attention = layer.self_attn
        expected = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention(
            embed_dim=attention.d_model,
            num_heads=attention.n_heads,
            n_levels=attention.n_levels,
            n_points=attention.n_points,
        )
        Mask2FormerPreTrainedModel._init_weights(model, expected)
        for name in ("sampling_offsets.weight", "sampling_offsets.bias", "attention_weights.weight"):
            torch.testing.assert_close(attention.get_parameter(name), expected.get_parameter(name), msg=name)
        assert attention.sampling_offsets.bias.abs().max() > 0  # the grid, not a zero default
    queries = model.model.transformer_module.queries_features.weight
    assert 0.8 < queries.std().item() < 1.25
    for layer in model.model.transformer_module.decoder.layers:
        assert torch.equal(layer.cross_attn.in_proj_bias, torch.zeros_like(layer.cross_attn.in_proj_bias))


def test_a_frozen_part_unfrozen_after_train_runs_in_train_mode(config, pixel_values):
    """The frozen set stays in eval mode only while frozen, also when it is unfrozen after `model.train()`."""
    torch.manual_seed(0)
    model = PosSAMModel(config).train()
    assert not model.vision_encoder.training
    model.vision_encoder.requires_grad_(True)
    model(pixel_values[:1])
    assert model.vision_encoder.training
    model.vision_encoder.requires_grad_(False)
    model(pixel_values[:1])
    assert not model.vision_encoder.training
    model.eval()
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_plain_gradients(config, pixel_values, vocabulary, use_reentrant):
    """
    Mask2Former's decoder hands its layers the level features in Python lists, which PyTorch's reentrant checkpoint
    does not see as inputs: backward through two checkpointed layers failed. Both modes must reproduce the gradients
    of the run without checkpointing, the pixel decoder's and FPN's included.
    """
    input_ids, synonym_mask = vocabulary
    mask_labels, class_labels = random_labels(2, num_segments=(3, 2))
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config).train()

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same sampled points in the loss
        inputs = {"input_ids": input_ids, "synonym_mask": synonym_mask}
        model(pixel_values, mask_labels=mask_labels, class_labels=class_labels, **inputs).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    checkpointed = gradients()
    assert set(checkpointed) == set(plain)
    assert any(name.startswith("model.pixel_decoder.") for name in plain)
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-4, msg=name)
