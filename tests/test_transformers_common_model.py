"""
transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`) run against PosSAM.

Set up as transformers' Mask2Former / OneFormer / SAM model tests are: a tiny tester, the mixin, and overrides only
where those models override (hidden states and attentions under Mask2Former's names, training with targets), plus
the skips they make, each with its reason. The mixins come from the installed transformers' sdist
(`tests/transformers_common.py`).
"""

import copy
import inspect
import unittest

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from transformers_possam import PosSAMConfig, PosSAMForPanopticSegmentation, PosSAMModel

from .transformers_common import common_module


test_modeling_common = common_module("test_modeling_common")
test_configuration_common = common_module("test_configuration_common")
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester


class PosSAMTextTowerTester:
    """Inputs of `get_text_features`: `(N, L)` prompts ending with the end-of-text token, as the CLIP tokenizer gives."""

    def __init__(self, text_config: dict, batch_size: int = 3, seq_length: int = 6):
        self.text_config = text_config
        self.num_hidden_layers = text_config["num_hidden_layers"]
        self.batch_size = batch_size
        self.seq_length = seq_length

    def prepare_inputs(self, seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(seed)
        bos, eos = self.text_config["bos_token_id"], self.text_config["eos_token_id"]
        input_ids = torch.randint(0, bos, (self.batch_size, self.seq_length), generator=generator)
        input_ids[:, 0] = bos
        lengths = torch.tensor([self.seq_length - 1 - row % 2 for row in range(self.batch_size)])  # ragged prompts
        attention_mask = (torch.arange(self.seq_length)[None] <= lengths[:, None]).long()
        input_ids[torch.arange(self.batch_size), lengths] = eos
        input_ids = input_ids.masked_fill(attention_mask == 0, self.text_config["pad_token_id"])
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def prepare_config_and_inputs_for_common(self):
        return None, self.prepare_inputs()


class PosSAMCLIPImageTowerTester:
    """
    Inputs of `get_image_features`. The CLIP image tower is a timm ConvNeXt: its hidden states are the stem's output
    and each stage's, so a "layer" here is a stage.
    """

    def __init__(self, parent_tester: "PosSAMModelTester"):
        self.parent_tester = parent_tester
        self.num_hidden_layers = len(parent_tester.clip_vision_model_kwargs["depths"])

    def prepare_config_and_inputs_for_common(self):
        config, inputs = self.parent_tester.prepare_config_and_inputs_for_common()
        return config, {"pixel_values": inputs["pixel_values"]}


class PosSAMModelTester:
    """
    A PosSAM of about 0.16M parameters (SAM ViT, CLIP ConvNeXt and text tower included) at 64x64 input.

    The vocabulary of `PosSAMForPanopticSegmentation` is given as tokens (`input_ids` / `attention_mask` of shape
    `(num_classes, seq_len)`, one prompt per class), so every common test also runs the text tower and its checks.
    `num_classes` is not a multiple of `batch_size`: the batching test splits every input whose first dimension is,
    and the vocabulary is shared by all images, not batched. It is at least 7, the batch the eager/SDPA test runs:
    that test pads shorter inputs with random ids, which are no prompts (no end-of-text token).

    Training targets (`mask_labels`, `class_labels`) are added only with `with_labels=True` (the training tests): the
    loss samples random points (PointRend), so two forward passes with targets differ in `loss`, which the tuple/dict
    equivalence test would compare. Mask2Former's tester leaves them out of its common inputs too.
    """

    def __init__(
        self,
        parent,
        batch_size=2,
        image_size=64,
        num_classes=7,
        num_queries=4,
        hidden_dim=32,
        decoder_layers=2,
        with_vocabulary=True,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = 3
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.hidden_size = hidden_dim
        self.decoder_layers = decoder_layers
        # `num_hidden_layers` maps to `decoder_layers` in PosSAMConfig (as in Mask2FormerConfig)
        self.num_hidden_layers = decoder_layers
        self.num_attention_heads = 2
        self.with_vocabulary = with_vocabulary
        self.is_training = is_training
        self.with_labels = False
        self.vision_config = {
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "mlp_dim": 32,
            "image_size": image_size,
            "patch_size": 16,
            "output_channels": 16,
            "window_size": 2,
            "global_attn_indexes": [1],
            "initializer_range": 0.02,
        }
        self.text_config = {
            "vocab_size": 99,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 16,
            "max_position_embeddings": 16,
            "bos_token_id": 97,
            "eos_token_id": 98,
            "pad_token_id": 98,
        }
        self.clip_vision_model_kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "head_hidden_size": 64}
        self.text_model_tester = PosSAMTextTowerTester(self.text_config, batch_size=num_classes)
        self.vision_model_tester = PosSAMCLIPImageTowerTester(self)

    def get_config(self) -> PosSAMConfig:
        return PosSAMConfig(
            vision_config=self.vision_config,
            text_config=self.text_config,
            clip_vision_model_name="convnext_atto",
            clip_vision_model_kwargs=self.clip_vision_model_kwargs,
            clip_embed_dim=16,
            fpn_out_channels=[16, 16, 32, 32],
            feature_size=self.hidden_dim,
            mask_feature_size=self.hidden_dim,
            hidden_dim=self.hidden_dim,
            encoder_feedforward_dim=32,
            encoder_layers=1,
            decoder_layers=self.decoder_layers,
            num_attention_heads=self.num_attention_heads,
            dim_feedforward=32,
            num_queries=self.num_queries,
            iou_head_hidden_dim=16,
            iou_head_depth=2,
            ldp_num_heads=2,
            train_num_points=16,
        )

    def prepare_labels(self, seed: int = 2) -> dict:
        """Per image 2 binary masks covering the padded input and their class indices (uint8, as the processor)."""
        generator = torch.Generator().manual_seed(seed)
        size = self.image_size
        mask_labels, class_labels = [], []
        for _ in range(self.batch_size):
            left = torch.zeros(size, size, dtype=torch.uint8)
            left[:, : int(torch.randint(8, size - 8, (), generator=generator))] = 1
            mask_labels.append(torch.stack([left, 1 - left]))
            class_labels.append(torch.randint(0, self.num_classes, (2,), generator=generator))
        return {"mask_labels": mask_labels, "class_labels": class_labels}

    def prepare_config_and_inputs_for_common(self):
        generator = torch.Generator().manual_seed(1)
        size = self.image_size
        pixel_values = torch.randn(self.batch_size, self.num_channels, size, size, generator=generator)
        pixel_mask = torch.ones(self.batch_size, size, size, dtype=torch.long)
        pixel_mask[-1, :, size - 16 :] = 0  # the last image is padded on the right, as the processor pads
        inputs = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if self.with_vocabulary:
            inputs.update(self.text_model_tester.prepare_inputs(seed=3))
        if self.with_labels:
            inputs.update(self.prepare_labels())
        return self.get_config(), inputs


class PosSAMCommonTestsMixin(ModelTesterMixin):
    """What the PosSAMModel and PosSAMForPanopticSegmentation test classes share."""

    is_encoder_decoder = False
    # a SAM vision config and a CLIP text config under one PosSAMConfig (SAM's test declares the same)
    _is_composite = True
    # PosSAM has no token embeddings to resize (Mask2Former: "does not use token embeddings")
    test_resize_embeddings = False
    # `_init_weights` covers every parameter (the mixin only checks models added since 2023 unless told to)
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.config_tester = ConfigTester(
            self,
            config_class=PosSAMConfig,
            has_text_modality=False,
            common_properties=["hidden_size", "num_attention_heads", "num_hidden_layers"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="PosSAM does not use inputs_embeds (as Mask2Former)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="PosSAM does not use token embeddings (as Mask2Former)")
    def test_resize_tokens_embeddings(self):
        pass

    def test_model_get_set_embeddings(self):
        # as SAM's test: the input embeddings are SAM's patch embedding (a convolution, not an nn.Embedding)
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), nn.Module)
            self.assertIs(model.get_input_embeddings(), model.base_model.vision_encoder.patch_embed)
            output_embeddings = model.get_output_embeddings()
            self.assertTrue(output_embeddings is None or isinstance(output_embeddings, nn.Linear))

    def test_forward_signature(self):
        # as Mask2Former's test: pixel_values is the first argument
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            parameters = list(inspect.signature(model_class(config).forward).parameters)
            self.assertEqual(parameters[:1], ["pixel_values"])

    def check_hidden_states(self, outputs, config):
        """SAM's name for the ViT states, Mask2Former's for the backbone maps, pixel decoder and transformer decoder."""
        tester = self.model_tester
        batch_size, image_size = tester.batch_size, tester.image_size
        vision = config.vision_config
        tokens = image_size // vision.patch_size
        self.assertEqual(len(outputs.vision_hidden_states), vision.num_hidden_layers + 1)
        for states in outputs.vision_hidden_states:
            self.assertEqual(states.shape, (batch_size, tokens, tokens, vision.hidden_size))
        # Mask2Former's encoder_hidden_states are the backbone's multi-scale maps: here the FPN's, strides 4 to 32
        self.assertEqual(len(outputs.encoder_hidden_states), 4)
        for states, stride, channels in zip(outputs.encoder_hidden_states, (4, 8, 16, 32), config.fpn_out_channels):
            self.assertEqual(states.shape, (batch_size, channels, image_size // stride, image_size // stride))
        self.assertEqual(len(outputs.pixel_decoder_hidden_states), 3)
        for states, stride in zip(outputs.pixel_decoder_hidden_states, (32, 16, 8)):
            self.assertEqual(
                states.shape, (batch_size, config.feature_size, image_size // stride, image_size // stride)
            )
        # the learnable queries, then each transformer layer's output
        self.assertEqual(len(outputs.transformer_decoder_hidden_states), config.decoder_layers)
        for states in outputs.transformer_decoder_hidden_states:
            self.assertEqual(states.shape, (tester.num_queries, batch_size, config.hidden_dim))

    def test_hidden_states_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config)).eval()
            with torch.no_grad():
                plain = model(**inputs)
                outputs = model(**inputs, output_hidden_states=True)
            for name in (
                "vision_hidden_states",
                "encoder_hidden_states",
                "pixel_decoder_hidden_states",
                "transformer_decoder_hidden_states",
            ):
                self.assertIsNone(getattr(plain, name), name)
            self.check_hidden_states(outputs, config)
            # the config's flag works too
            config_with_flag = copy.deepcopy(config)
            config_with_flag.output_hidden_states = True
            model = model_class(config_with_flag).eval()
            with torch.no_grad():
                self.check_hidden_states(model(**inputs), config)

    def check_attentions(self, outputs, config):
        # per transformer layer (decoder_layers counts the prediction from the learnable queries too), its
        # self-attention weights, as Mask2Former's decoder returns them
        tester = self.model_tester
        self.assertEqual(len(outputs.attentions), config.decoder_layers - 1)
        for weights in outputs.attentions:
            self.assertEqual(
                weights.shape, (tester.batch_size, config.num_attention_heads, tester.num_queries, tester.num_queries)
            )
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))  # softmax rows

    def test_attention_outputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(copy.deepcopy(config)).eval()
            with torch.no_grad():
                self.assertIsNone(model(**inputs).attentions)
                self.check_attentions(model(**inputs, output_attentions=True), config)
            config_with_flag = copy.deepcopy(config)
            config_with_flag.output_attentions = True
            model = model_class(config_with_flag).eval()
            with torch.no_grad():
                self.check_attentions(model(**inputs), config)

    # whether the training tests pass targets (the loss needs them; see PosSAMModelTester)
    trains_with_targets = False

    def training_objective(self, outputs) -> torch.Tensor:
        """A scalar to backpropagate from the model's outputs."""
        raise NotImplementedError

    def test_retain_grad_hidden_states_attentions(self):
        # as Mask2Former's override: in training, gradients reach every trainable hidden state and the attentions
        self.model_tester.with_labels = self.trains_with_targets
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.output_hidden_states = True
        config.output_attentions = True
        model = self.all_model_classes[0](config).train()
        outputs = model(**inputs)
        retained = {
            "encoder_hidden_states": outputs.encoder_hidden_states[0],
            "pixel_decoder_hidden_states": outputs.pixel_decoder_hidden_states[0],
            "transformer_decoder_hidden_states": outputs.transformer_decoder_hidden_states[0],
            "attentions": outputs.attentions[0],
        }
        for states in retained.values():
            states.retain_grad()
        self.training_objective(outputs).backward(retain_graph=True)
        for name, states in retained.items():
            self.assertIsNotNone(states.grad, name)
        # the SAM ViT is frozen (paper §3.2): its states carry no gradient
        self.assertFalse(any(states.requires_grad for states in outputs.vision_hidden_states))


class PosSAMModelTest(PosSAMCommonTestsMixin, unittest.TestCase):
    all_model_classes = (PosSAMModel,)

    def setUp(self):
        # the mask generator has no loss: training is tested on PosSAMForPanopticSegmentation (the mixin skips base
        # models such as Mask2FormerModel in its training tests too)
        self.model_tester = PosSAMModelTester(self, with_vocabulary=False, is_training=False)
        super().setUp()

    def training_objective(self, outputs) -> torch.Tensor:
        # no loss: the final masks and IoU logits reach every trainable part of the mask generator
        return outputs.masks_queries_logits[-1].sum() + outputs.iou_logits[-1].sum()


class PosSAMForPanopticSegmentationTest(PosSAMCommonTestsMixin, unittest.TestCase):
    all_model_classes = (PosSAMForPanopticSegmentation,)
    # the CLIP image tower's last_hidden_state is a ConvNeXt map (B, C, H/32, W/32), not (B, tokens, hidden) of
    # config.vision_config (SAM's): the mixin's knob for that
    skip_test_image_features_output_shape = True
    # the eager/SDPA test passes only the main input and these: the vocabulary comes as tokens
    additional_model_inputs = ["input_ids"]
    trains_with_targets = True

    def setUp(self):
        self.model_tester = PosSAMModelTester(self)
        super().setUp()

    def test_training(self):
        self.model_tester.with_labels = True  # see PosSAMModelTester
        super().test_training()

    def test_training_gradient_checkpointing(self):
        self.model_tester.with_labels = True
        super().test_training_gradient_checkpointing()

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        self.model_tester.with_labels = True
        super().test_training_gradient_checkpointing_use_reentrant_false()

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        self.model_tester.with_labels = True
        super().test_training_gradient_checkpointing_use_reentrant_true()

    def training_objective(self, outputs) -> torch.Tensor:
        return outputs.loss

    def test_get_image_features_attentions(self):
        # replaces the mixin's check: the CLIP image tower is a ConvNeXt, it has no attention layers to return
        config, inputs = self.model_tester.vision_model_tester.prepare_config_and_inputs_for_common()
        model = PosSAMForPanopticSegmentation(config).eval()
        with self.assertRaisesRegex(ValueError, "output_attentions"):
            model.get_image_features(**inputs, output_attentions=True)
        with torch.no_grad():
            outputs = model.get_image_features(**inputs)
        self.assertIsInstance(outputs, BaseModelOutputWithPooling)
        self.assertIsNone(outputs.attentions)
