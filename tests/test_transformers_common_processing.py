"""
transformers' own common tests of image processors and processors, run on PosSAM's: `ImageProcessingTestMixin` and
`PostProcessSemanticSegmentationTestMixin` on both image-processor backends (`PosSAMImageProcessor`, torchvision;
`PosSAMImageProcessorPil`, PIL), `ProcessorTesterMixin` on `PosSAMProcessor`. The mixins come from the sdist of the
installed transformers (`tests/transformers_common.py`); they are set up as transformers' SAM tests set up theirs
(SAM's preprocessing is PosSAM's: longest side resized, padded to a square).

Each skip says why, in one line: a test needs the Hugging Face Hub (unreachable here), or it exercises a free-text
input that PosSAM's processor does not have, the reason SAM's processor test skips its tokenizer tests.
`AnnotationFormatTestMixin` is not run: it tests DETR's COCO detection / `masks_path` annotation formats, which
neither PosSAM nor Mask2Former / OneFormer / SAM take.
"""

import unittest

import torch

from tests.transformers_common import common_module
from transformers_possam import (
    PosSAMForPanopticSegmentationOutput,
    PosSAMImageProcessor,
    PosSAMImageProcessorPil,
    PosSAMProcessor,
    clip_tokenizer_from_bpe,
)


image_processing_common = common_module("test_image_processing_common")
processing_common = common_module("test_processing_common")

NEEDS_HUB = "loads its test image from the Hugging Face Hub, which is unreachable here"
NO_FREE_TEXT = (
    "passes free text as `text=`: PosSAM's processor has no free-text input (its tokenizer only encodes the "
    "vocabulary, `candidate_labels`, into fixed prompts), the reason SAM's processor test skips the tokenizer tests"
)


class PosSAMImageProcessingTester(image_processing_common.ImageProcessingTester):
    """SAM's tester setup (longest side 20, padded to 20 x 20) plus fake PosSAM outputs for post-processing."""

    def __init__(self, parent, num_labels=5, num_queries=3, mask_height=6, mask_width=7, **kwargs):
        kwargs.setdefault("size", {"longest_edge": 20})
        kwargs.setdefault("pad_size", {"height": 20, "width": 20})
        super().__init__(parent, **kwargs)
        self.num_labels = num_labels
        self.num_queries = num_queries
        self.mask_height = mask_height
        self.mask_width = mask_width

    def _get_image_processing_classes(self):
        # the mixin finds the classes from the test file's folder (tests/models/<model>/), which this repository lacks
        return {"torchvision": PosSAMImageProcessor, "pil": PosSAMImageProcessorPil}

    def expected_output_image_shape(self, images):
        return self.num_channels, self.pad_size["height"], self.pad_size["width"]

    def prepare_post_process_semantic_segmentation_inputs(self):
        # PosSAM's outputs (as Mask2Former's tester fakes Mask2Former's): K classes + void, masks at mask resolution
        batch, queries, classes = self.batch_size, self.num_queries, self.num_labels
        outputs = PosSAMForPanopticSegmentationOutput(
            class_queries_logits=torch.randn(batch, queries, classes + 1),
            clip_class_logits=torch.randn(batch, queries, classes),
            masks_queries_logits=torch.randn(batch, queries, self.mask_height, self.mask_width),
            iou_scores=torch.rand(batch, queries),
        )
        expected_shape = {"num_labels": classes, "height": self.mask_height, "width": self.mask_width}
        return {"outputs": outputs}, expected_shape


class PosSAMImageProcessingTest(
    image_processing_common.ImageProcessingTestMixin,
    image_processing_common.PostProcessSemanticSegmentationTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = PosSAMImageProcessingTester

    @unittest.skip(reason=NEEDS_HUB)
    def test_backends_equivalence(self):
        pass

    @unittest.skip(
        reason="runs a script that imports transformers alone, which knows PosSAM only once transformers_possam is "
        "imported, and torchvision is a requirement of this package (setup.cfg), so no install lacks it"
    )
    def test_pil_can_run_without_torchvision(self):
        pass


class PosSAMProcessorTest(processing_common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = PosSAMProcessor
    # PosSAM's text modality: a vocabulary, encoded into (K, S, T, L) prompt tokens
    candidate_labels = ["cat", "sky,clouds", {"name": "road", "isthing": False}]

    @classmethod
    def _setup_image_processor(cls):
        return PosSAMImageProcessor(size={"longest_edge": 32}, pad_size={"height": 32, "width": 32})

    @classmethod
    def _setup_tokenizer(cls):
        # CLIP's BPE tokenizer built offline from open_clip's vocabulary file (no Hub access)
        return clip_tokenizer_from_bpe()

    def test_model_input_names(self):
        # the mixin's check, with the text modality given as PosSAM takes it (the mixin passes `text=`)
        processor = self.get_processor()
        inputs = processor(
            images=self.prepare_images_inputs(), candidate_labels=self.candidate_labels, return_tensors="pt"
        )
        self.assertSetEqual(set(inputs.keys()), set(processor.model_input_names))

    def test_processor_with_multiple_inputs(self):
        # the mixin's check, with the text modality given as PosSAM takes it (the mixin passes `text=`)
        processor = self.get_processor()
        inputs = processor(
            images=self.prepare_images_inputs(), candidate_labels=self.candidate_labels, return_tensors="pt"
        )
        self.assertIn(self.text_input_name, inputs)
        self.assertIn(self.images_input_name, inputs)
        with self.assertRaises((TypeError, ValueError)):
            processor()

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_subprocessor_defaults_0_text(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_subprocessor_defaults_preserved_by_kwargs_0_images(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_kwargs_overrides_default_subprocessor_kwargs_0_images(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_unstructured_kwargs_0_images(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_unstructured_kwargs_batched_0_images(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_doubly_passed_kwargs_0_images(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_structured_kwargs_nested_from_dict_0_images(self):
        pass

    @unittest.skip(reason=NO_FREE_TEXT)
    def test_overlapping_text_image_kwargs_handling_0_images(self):
        pass
