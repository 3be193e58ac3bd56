"""
`PosSAMOpenVocabularyClassifier` against FC-CLIP's classifiers as transcribed in `fcclip_reference.py`
(`get_classification_logits`, `MaskPooling`, `visual_prediction_forward_convnext`), the old checkpoint layout, and the
head's Mask2Former-style split of its forward (`get_auxiliary_logits`, `get_loss_dict`, `get_loss`).

FC-CLIP lays a vocabulary out flat: each class's synonyms one after the other, `num_templates[k]` of them, then the
void embedding. Ours is padded, `(K, S, D)` with a `(K, S)` synonym mask; `fcclip_text_classifier` converts ours to
FC-CLIP's by keeping only the real slots, so the reference never sees a padding slot.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import transformers_possam.modeling as modeling
import transformers_possam.modeling.clip as modeling_clip
from transformers_possam import PosSAMForPanopticSegmentation, tiny_config
from transformers_possam.modeling import PosSAMCLIP, PosSAMOpenVocabularyClassifier

from .conftest import make_vocabulary
from .fcclip_reference import get_classification_logits, mask_pooling, visual_prediction_forward_convnext


EMBED_DIM = 16
# per class: how many of the S = 3 slots hold a real synonym (the rest are padding)
SYNONYMS_PER_CLASS = (3, 1, 2, 1)


def padded_vocabulary(generator: torch.Generator, num_synonyms: int = 3, dtype=torch.float64):
    """`(K, S, D)` L2-normalized class embeddings and their `(K, S)` synonym mask, padding slots random too."""
    num_classes = len(SYNONYMS_PER_CLASS)
    class_embeddings = F.normalize(torch.randn(num_classes, num_synonyms, EMBED_DIM, generator=generator), dim=-1)
    synonym_mask = torch.arange(num_synonyms)[None] < torch.tensor(SYNONYMS_PER_CLASS)[:, None].clamp(max=num_synonyms)
    return class_embeddings.to(dtype), synonym_mask


def fcclip_text_classifier(class_embeddings, synonym_mask, void_weight):
    """Ours -> FC-CLIP's layout (fcclip/fcclip.py L324-328): real synonyms class by class, normalized void last."""
    rows = [class_embeddings[k][synonym_mask[k]] for k in range(class_embeddings.shape[0])]
    text_classifier = torch.cat([*rows, F.normalize(void_weight, dim=-1)], dim=0)
    return text_classifier, [len(r) for r in rows]


def make_classifier(log_scale: float, generator: torch.Generator) -> PosSAMOpenVocabularyClassifier:
    classifier = PosSAMOpenVocabularyClassifier(EMBED_DIM, logit_scale_init=log_scale).double()
    with torch.no_grad():
        classifier.void_embedding.weight.copy_(torch.randn(1, EMBED_DIM, generator=generator))
    return classifier


@pytest.mark.parametrize(
    "log_scale",
    [math.log(1 / 0.07), math.log(500.0)],  # CLIP's initial temperature; one beyond CLIP's clamp at 100
    ids=["clip-init", "clamped"],
)
def test_in_vocabulary_logits_and_gradients_equal_fcclips(log_scale):
    generator = torch.Generator().manual_seed(0)
    classifier = make_classifier(log_scale, generator)
    class_embeddings, synonym_mask = padded_vocabulary(generator)
    ldp_embeddings = torch.randn(2, 5, EMBED_DIM, generator=generator, dtype=torch.float64) * 3.0
    # a padding slot pointing exactly at a query: it would win that class's max if the mask were ignored
    class_embeddings[1, 2] = F.normalize(ldp_embeddings[0, 0], dim=-1)

    ours = classifier(ldp_embeddings, class_embeddings, synonym_mask)
    ours.square().sum().backward()
    our_grads = [classifier.logit_scale.grad.clone(), classifier.void_embedding.weight.grad.clone()]
    classifier.zero_grad()

    text_classifier, num_templates = fcclip_text_classifier(
        class_embeddings, synonym_mask, classifier.void_embedding.weight
    )
    reference = get_classification_logits(ldp_embeddings, text_classifier, classifier.logit_scale, num_templates)
    reference.square().sum().backward()

    assert ours.shape == (2, 5, len(SYNONYMS_PER_CLASS) + 1)  # void last
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(our_grads[0], classifier.logit_scale.grad, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(our_grads[1], classifier.void_embedding.weight.grad, rtol=1e-12, atol=1e-10)
    if log_scale > math.log(100.0):  # the clamp: logits at most 100, no gradient to the temperature
        assert ours.abs().max() <= 100.0 and classifier.logit_scale.grad == 0
    # the padding slot matters: with it counted as a synonym, query 0 would score cos = 1 for class 1
    unmasked = classifier(ldp_embeddings, class_embeddings, torch.ones_like(synonym_mask))
    assert unmasked[0, 0, 1] > ours[0, 0, 1] + 1e-3


def test_single_synonym_vocabulary_equals_fcclip():
    generator = torch.Generator().manual_seed(1)
    classifier = make_classifier(math.log(1 / 0.07), generator)
    class_embeddings, synonym_mask = padded_vocabulary(generator, num_synonyms=1)
    ldp_embeddings = torch.randn(1, 4, EMBED_DIM, generator=generator, dtype=torch.float64)
    text_classifier, num_templates = fcclip_text_classifier(
        class_embeddings, synonym_mask, classifier.void_embedding.weight
    )
    assert num_templates == [1] * len(SYNONYMS_PER_CLASS)
    torch.testing.assert_close(
        classifier(ldp_embeddings, class_embeddings, synonym_mask),
        get_classification_logits(ldp_embeddings, text_classifier, classifier.logit_scale, num_templates),
        rtol=1e-12,
        atol=1e-10,
    )


def test_out_of_vocabulary_branch_equals_fcclips_with_open_clip():
    open_clip = pytest.importorskip("open_clip")
    from transformers_possam.conversion import convert_open_clip, open_clip_to_possam_kwargs

    model_cfg = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": "convnext_atto",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "mlp",
            "image_size": 64,
        },
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    reference_clip = open_clip.model.CLIP(**model_cfg).eval()
    for parameter in reference_clip.parameters():
        if parameter.dim() > 0:
            torch.nn.init.normal_(parameter, std=0.05)
    with torch.no_grad():
        reference_clip.logit_scale.fill_(math.log(50.0))
    config = tiny_config(**open_clip_to_possam_kwargs({"model_cfg": model_cfg}))
    clip = PosSAMCLIP(
        config.clip_vision_model_name,
        config.clip_vision_model_kwargs,
        config.text_config,
        config.clip_embed_dim,
        config.clip_logit_scale_init,
    )
    clip.load_state_dict(convert_open_clip(reference_clip.state_dict()), strict=True)
    clip, reference_clip = clip.double().eval(), reference_clip.double()

    generator = torch.Generator().manual_seed(2)
    classifier = make_classifier(math.log(1 / 0.07), generator)
    class_embeddings, synonym_mask = padded_vocabulary(generator)
    clip_features = torch.randn(2, clip.dense_feature_dim, 4, 4, generator=generator, dtype=torch.float64)
    mask_logits = torch.randn(2, 6, 16, 16, generator=generator, dtype=torch.float64) * 4.0
    mask_logits[1, 3] = -1.0  # an empty mask: pools to zeros in both

    with torch.no_grad():
        clip_embeddings, logits = classifier.out_of_vocabulary_logits(
            clip, clip_features, mask_logits, class_embeddings, synonym_mask
        )
        # fcclip/fcclip.py L355-367
        mask_for_pooling = F.interpolate(
            mask_logits, size=clip_features.shape[-2:], mode="bilinear", align_corners=False
        )
        pooled_clip_feature = visual_prediction_forward_convnext(
            reference_clip, mask_pooling(clip_features, mask_for_pooling)
        )
        text_classifier, num_templates = fcclip_text_classifier(
            class_embeddings, synonym_mask, classifier.void_embedding.weight
        )
        out_vocab_cls_results = get_classification_logits(
            pooled_clip_feature, text_classifier, reference_clip.logit_scale, num_templates
        )[..., :-1]  # remove void

    torch.testing.assert_close(clip_embeddings, pooled_clip_feature, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, out_vocab_cls_results, rtol=1e-10, atol=1e-10)
    assert logits.shape == (2, 6, len(SYNONYMS_PER_CLASS))  # no void column
    assert logits.abs().max() <= 50.0  # CLIP's own temperature, not the classifier's (about 14.3)


def test_classification_parameters_live_in_one_module_and_the_old_copies_are_gone(model, config):
    names = {name for name, _ in model.named_parameters()}
    assert {"classifier.void_embedding.weight", "classifier.logit_scale"} <= names
    assert not {"void_embedding.weight", "logit_scale"} & names
    assert {name for name in names if name.startswith("classifier.")} == {
        "classifier.void_embedding.weight",
        "classifier.logit_scale",
    }
    for old in ("void_embedding", "logit_scale", "ldp_class_logits", "clip_class_logits"):
        assert not hasattr(model, old), old
    assert not hasattr(modeling, "classify_embeddings") and not hasattr(modeling_clip, "classify_embeddings")
    assert isinstance(model.ldp, modeling.LocalDiscriminativePooling)  # LDP stays its own box (paper Fig. 5)
    # the trained temperature starts at CLIP's, the frozen CLIP keeps its own
    assert model.classifier.logit_scale.item() == pytest.approx(config.logit_scale_init)
    assert model.classifier.logit_scale is not model.clip.logit_scale


def test_init_weights_initializes_the_classifier(model, config):
    classifier = PosSAMOpenVocabularyClassifier(config.clip_embed_dim, 0.0)
    with torch.no_grad():
        classifier.void_embedding.weight.fill_(1e6)
    torch.manual_seed(3)
    model._init_weights(classifier)
    torch.manual_seed(3)
    expected = torch.empty(1, config.clip_embed_dim).normal_(mean=0.0, std=config.init_std)
    assert classifier.logit_scale.item() == pytest.approx(config.logit_scale_init)
    torch.testing.assert_close(classifier.void_embedding.weight.detach(), expected)


def _distinctive_model():
    """A tiny model whose classifier parameters differ from what a fresh initialization would give."""
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(tiny_config()).eval()
    with torch.no_grad():
        model.classifier.logit_scale.fill_(3.3)
        model.classifier.void_embedding.weight.copy_(torch.linspace(-1, 1, model.config.clip_embed_dim)[None])
        model.clip.logit_scale.fill_(4.1)
    return model


def _class_logits(model, pixel_values):
    input_ids, synonym_mask = make_vocabulary()
    with torch.no_grad():
        outputs = model(pixel_values, input_ids=input_ids, synonym_mask=synonym_mask)
    return outputs.class_queries_logits, outputs.clip_class_logits


def test_checkpoints_of_the_old_layout_load_with_identical_outputs(tmp_path, pixel_values):
    model = _distinctive_model()
    expected_logits = _class_logits(model, pixel_values)

    new_layout = tmp_path / "new"
    model.save_pretrained(new_layout, save_original_format=False)
    new_keys = set(load_file(new_layout / "model.safetensors"))
    assert {"classifier.void_embedding.weight", "classifier.logit_scale", "clip.logit_scale"} <= new_keys
    assert not {"void_embedding.weight", "logit_scale"} & new_keys

    # a checkpoint saved before the classifier existed: the same tensors under the old top-level names
    old_layout = tmp_path / "old"
    shutil.copytree(new_layout, old_layout)
    with safe_open(new_layout / "model.safetensors", framework="pt") as file:
        metadata = file.metadata()
    old_names = {"classifier.void_embedding.weight": "void_embedding.weight", "classifier.logit_scale": "logit_scale"}
    tensors = {old_names.get(key, key): value for key, value in load_file(new_layout / "model.safetensors").items()}
    save_file(tensors, old_layout / "model.safetensors", metadata=metadata)

    # what save_pretrained writes by default: transformers' `save_original_format`, the layout before the move
    default_layout = tmp_path / "default"
    model.save_pretrained(default_layout)
    assert set(load_file(default_layout / "model.safetensors")) == set(tensors)

    for folder in (old_layout, new_layout, default_layout):
        loaded, info = PosSAMForPanopticSegmentation.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (folder.name, info)
        loaded.eval()
        state, reference_state = loaded.state_dict(), model.state_dict()
        assert state.keys() == reference_state.keys()
        for key, value in reference_state.items():
            assert torch.equal(state[key], value), (folder.name, key)
        for got, expected in zip(_class_logits(loaded, pixel_values), expected_logits):
            assert torch.equal(got, expected), folder.name


def test_forward_is_split_like_mask2formers(config, pixel_values):
    torch.manual_seed(0)
    model = PosSAMForPanopticSegmentation(config).train()
    input_ids, synonym_mask = make_vocabulary()
    generator = torch.Generator().manual_seed(4)
    mask_labels = [torch.randint(0, 2, (n, 128, 128), generator=generator, dtype=torch.uint8) for n in (3, 2)]
    class_labels = [torch.randint(0, 5, (n,), generator=generator) for n in (3, 2)]
    torch.manual_seed(5)  # the matcher's point sampling
    outputs = model(
        pixel_values,
        input_ids=input_ids,
        synonym_mask=synonym_mask,
        mask_labels=mask_labels,
        class_labels=class_labels,
    )
    # deep supervision: one prediction per decoder layer before the last (the learnable queries' one included)
    assert len(outputs.auxiliary_logits) == config.decoder_layers - 1
    assert set(outputs.auxiliary_logits[0]) == {"class_queries_logits", "masks_queries_logits", "iou_logits"}
    # Mask2Former's total: each part times its weight, auxiliary copies with their base part's weight
    weights = {
        "loss_cross_entropy": config.class_weight,
        "loss_mask": config.mask_weight,
        "loss_dice": config.dice_weight,
        "loss_iou": config.iou_weight,
    }
    suffixes = [""] + [f"_{layer}" for layer in range(config.decoder_layers - 1)]
    assert set(outputs.loss_dict) == {base + suffix for base in weights for suffix in suffixes}
    total = sum(weights[base] * outputs.loss_dict[base + suffix] for base in weights for suffix in suffixes)
    torch.testing.assert_close(outputs.loss, total)
    torch.testing.assert_close(model.get_loss(outputs.loss_dict), total)

    # get_loss_dict on the outputs' own predictions gives the same parts, in float32 even from bfloat16 inputs
    torch.manual_seed(5)
    loss_dict = model.get_loss_dict(
        masks_queries_logits=outputs.masks_queries_logits,
        class_queries_logits=outputs.class_queries_logits,
        mask_labels=mask_labels,
        class_labels=class_labels,
        auxiliary_predictions=outputs.auxiliary_logits,
        iou_logits=torch.logit(outputs.iou_scores),
    )
    assert loss_dict.keys() == outputs.loss_dict.keys()
    for key, value in loss_dict.items():
        torch.testing.assert_close(value, outputs.loss_dict[key], rtol=1e-4, atol=1e-5)
    half = model.get_loss_dict(
        masks_queries_logits=outputs.masks_queries_logits.bfloat16(),
        class_queries_logits=outputs.class_queries_logits.bfloat16(),
        mask_labels=mask_labels,
        class_labels=class_labels,
        auxiliary_predictions=None,
        iou_logits=torch.logit(outputs.iou_scores).bfloat16(),
    )
    assert all(value.dtype == torch.float32 for value in half.values())

    # get_auxiliary_logits pairs each layer's three predictions and leaves out the last layer's
    layers = [torch.full((1,), float(layer)) for layer in range(3)]
    auxiliary = model.get_auxiliary_logits(layers, [2 * t for t in layers], [3 * t for t in layers])
    assert [
        (d["class_queries_logits"].item(), d["masks_queries_logits"].item(), d["iou_logits"].item()) for d in auxiliary
    ] == [
        (0.0, 0.0, 0.0),
        (1.0, 2.0, 3.0),
    ]
