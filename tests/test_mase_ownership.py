"""MASE's alpha / beta have one owner, the image processor (saved in preprocessor_config.json), read by every path."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import pipeline
from transformers.testing_utils import CaptureLogger

from transformers_possam import (
    PosSAMConfig,
    PosSAMImageProcessor,
    configuration_possam,
    postprocessing,
    tiny_config,
)
from transformers_possam.data import TOY_CATEGORIES, toy_panoptic_rows

from .conftest import load_training_script, save_tiny_checkpoint


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model whose saved image processor holds non-default weights alpha 0.1, beta 0.5."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("possam-mase"), mase_alpha=0.1, mase_beta=0.5)


@pytest.fixture()
def recorded_weights(monkeypatch):
    """Every (alpha, beta) that post-processing hands to `class_scores`."""
    calls = []
    original = postprocessing.class_scores

    def recording(outputs, seen_mask=None, use_mase=True, alpha=0.4, beta=0.8):
        calls.append((alpha, beta))
        return original(outputs, seen_mask=seen_mask, use_mase=use_mase, alpha=alpha, beta=beta)

    monkeypatch.setattr(postprocessing, "class_scores", recording)
    return calls


def random_outputs(seed=0, queries=6, classes=4):
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        masks_queries_logits=torch.randn(1, queries, 16, 16, generator=generator) * 4,
        class_queries_logits=torch.randn(1, queries, classes + 1, generator=generator) * 2,
        clip_class_logits=torch.randn(1, queries, classes, generator=generator) * 2,
        iou_scores=torch.rand(1, queries, generator=generator),
    )


def test_config_holds_no_mase_weights():
    assert not hasattr(tiny_config(), "mase_alpha") and not hasattr(tiny_config(), "mase_beta")
    # an old config.json carrying them still loads; the user is told they are not used and where they live now
    with CaptureLogger(configuration_possam.logger) as captured:
        config = PosSAMConfig(mase_alpha=0.3, mase_beta=0.6)
    assert "Ignoring" in captured.out and "preprocessor_config.json" in captured.out
    assert not hasattr(config, "mase_alpha") and "mase_alpha" not in config.to_dict()


def test_weights_are_saved_and_loaded_with_the_image_processor(checkpoint, tmp_path):
    # a processor saves its image processor's settings inside processor_config.json (transformers 5) ...
    saved = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]
    assert (saved["mase_alpha"], saved["mase_beta"]) == (0.1, 0.5)
    # ... an image processor alone in preprocessor_config.json
    PosSAMImageProcessor.from_pretrained(checkpoint).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["mase_alpha"], saved["mase_beta"]) == (0.1, 0.5)
    assert PosSAMImageProcessor.from_pretrained(tmp_path).mase_alpha == 0.1
    loaded = PosSAMImageProcessor.from_pretrained(checkpoint)
    assert (loaded.mase_alpha, loaded.mase_beta) == (0.1, 0.5)
    assert (PosSAMImageProcessor().mase_alpha, PosSAMImageProcessor().mase_beta) == (0.4, 0.8)  # FC-CLIP / Table 7
    for bad in (-0.1, 1.5, "0.4", True):  # exponents of a geometric mean: numbers in [0, 1]
        with pytest.raises(ValueError, match="must be a number in \\[0, 1\\]"):
            PosSAMImageProcessor(mase_alpha=bad)


def test_every_post_processing_path_reads_them(checkpoint, recorded_weights):
    processor = PosSAMImageProcessor.from_pretrained(checkpoint)
    outputs = random_outputs()
    processor.post_process_panoptic_segmentation(outputs)
    processor.post_process_semantic_segmentation(outputs)
    processor.post_process_instance_segmentation(outputs)
    processor.post_process_panoptic_segmentation(outputs, use_mase=False)  # FC-CLIP's fixed ensemble uses them too
    assert recorded_weights == [(0.1, 0.5)] * 4
    processor.post_process_semantic_segmentation(outputs, mase_alpha=0.3, mase_beta=0.6)  # a call may override
    assert recorded_weights[-1] == (0.3, 0.6)


def test_changing_them_changes_outputs():
    outputs = random_outputs(seed=1)
    results = []
    for alpha, beta in ((0.4, 0.8), (0.1, 0.5), (0.4, 0.2)):
        processor = PosSAMImageProcessor(mase_alpha=alpha, mase_beta=beta)
        seen = torch.tensor([True, False, True, False])
        instance = processor.post_process_instance_segmentation(outputs, seen_mask=seen)[0]["segments_info"]
        results.append([round(s["score"], 6) for s in instance])
    assert results[0] != results[1] and results[0] != results[2]  # alpha changes scores, and so does beta


def test_pipeline_and_evaluation_read_them(checkpoint, recorded_weights, tmp_path):
    segmenter = pipeline("open-vocabulary-panoptic-segmentation", model=str(checkpoint))
    image = next(toy_panoptic_rows(1))["image"]
    default = segmenter(image, candidate_labels=["ball", "box", "sky"], subtask="instance")
    assert set(recorded_weights) == {(0.1, 0.5)}
    override = segmenter(
        image, candidate_labels=["ball", "box", "sky"], subtask="instance", mase_alpha=0.9, mase_beta=0.0
    )
    assert recorded_weights[-1] == (0.9, 0.0)
    assert [s["score"] for s in default] != [s["score"] for s in override]
    with pytest.raises(ValueError, match="mase_beta must be a number in \\[0, 1\\]"):
        segmenter(image, candidate_labels=["ball"], mase_beta=2.0)  # refused before any forward pass
    # training/evaluate.py: the checkpoint's values by default, flags override
    evaluate_script = load_training_script("evaluate")  # by path: "evaluate" is Hugging Face's package

    recorded_weights.clear()
    metrics = evaluate_script.main(
        ["--model_name_or_path", str(checkpoint), "--max_samples", "2", "--output_dir", str(tmp_path / "a")]
    )
    assert set(recorded_weights) == {(0.1, 0.5)} and (
        metrics["settings"]["mase_alpha"],
        metrics["settings"]["mase_beta"],
    ) == (0.1, 0.5)
    recorded_weights.clear()
    evaluate_script.main(
        [
            "--model_name_or_path",
            str(checkpoint),
            "--max_samples",
            "2",
            "--output_dir",
            str(tmp_path / "b"),
            "--mase_alpha",
            "0.25",
            "--mase_beta",
            "0.75",
        ]
    )
    assert set(recorded_weights) == {(0.25, 0.75)}
    assert len(TOY_CATEGORIES) == 6  # the toy vocabulary evaluate.py used
