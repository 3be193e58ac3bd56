"""
torch.export and ONNX (issue 15, item 5): the whole `PosSAMForPanopticSegmentation` exports from precomputed class
embeddings and a synonym mask, with dynamic batch / class / synonym counts; the exported program's outputs equal the
eager model's, and onnxruntime's equal PyTorch's within 1e-4 relative. References: the eager model (PyTorch) and
onnxruntime, a runtime that shares no code with ours.
"""

import numpy as np
import pytest
import torch

from transformers_possam import PosSAMForPanopticSegmentation, PosSAMImageProcessor, tiny_config
from transformers_possam.export import EXPORTED_OUTPUTS, export_onnx, export_program


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PosSAMForPanopticSegmentation(tiny_config()).eval()


def vocabulary(model, num_classes: int, num_synonyms: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(num_classes, num_synonyms, model.config.clip_embed_dim, generator=generator)
    synonym_mask = torch.rand(num_classes, num_synonyms, generator=generator) > 0.4
    synonym_mask[:, 0] = True
    return embeddings, synonym_mask


def pixels(model, batch_size: int, seed: int):
    size = model.config.vision_config.image_size
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def eager(model, pixel_values, embeddings, synonym_mask):
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values, class_embeddings=embeddings, synonym_mask=synonym_mask)
    return [outputs[name] for name in EXPORTED_OUTPUTS]


@pytest.fixture(scope="module")
def program(model):
    return export_program(model, pixels(model, 2, 0), *vocabulary(model, 5, 2, 0))


def test_torch_export_of_the_whole_model_with_dynamic_vocabulary(model, program):
    # other batch size, class count and synonym count than the example
    for batch_size, num_classes, num_synonyms in ((1, 7, 3), (3, 1, 1)):
        inputs = (pixels(model, batch_size, 1), *vocabulary(model, num_classes, num_synonyms, 1))
        with torch.no_grad():
            exported = program.module()(pixel_values=inputs[0], class_embeddings=inputs[1], synonym_mask=inputs[2])
        for name, expected in zip(EXPORTED_OUTPUTS, eager(model, *inputs)):
            assert exported[name].shape == expected.shape
            torch.testing.assert_close(exported[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_exported_outputs_feed_post_processing(model, program):
    """What a deployment does: exported outputs into the processor's post-processing, same segments as eager."""
    inputs = (pixels(model, 1, 2), *vocabulary(model, 4, 2, 2))
    with torch.no_grad():
        exported = program.module()(pixel_values=inputs[0], class_embeddings=inputs[1], synonym_mask=inputs[2])
        reference = model(pixel_values=inputs[0], class_embeddings=inputs[1], synonym_mask=inputs[2])
    processor = PosSAMImageProcessor()
    # instance inference: top (query, class) pairs, void or not, so the random model yields segments
    (ours,) = processor.post_process_instance_segmentation(exported, num_top_instances=10)
    (theirs,) = processor.post_process_instance_segmentation(reference, num_top_instances=10)
    assert theirs["segments_info"], "positive control: the random model yields segments"
    assert [s["label_id"] for s in ours["segments_info"]] == [s["label_id"] for s in theirs["segments_info"]]
    assert torch.equal(ours["segmentation"], theirs["segmentation"])


def test_onnx_in_onnxruntime_equals_pytorch(model, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = export_onnx(model, tmp_path / "possam.onnx", pixels(model, 1, 0), *vocabulary(model, 5, 2, 0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_outputs()] == list(EXPORTED_OUTPUTS)
    nonzero: dict[str, bool] = {}
    for batch_size, num_classes, num_synonyms in ((1, 5, 2), (2, 9, 3)):
        inputs = (pixels(model, batch_size, 3), *vocabulary(model, num_classes, num_synonyms, 3))
        feeds = {
            "pixel_values": inputs[0].numpy(),
            "class_embeddings": inputs[1].numpy(),
            "synonym_mask": inputs[2].numpy(),
        }
        for name, found, expected in zip(EXPORTED_OUTPUTS, session.run(None, feeds), eager(model, *inputs)):
            expected = expected.numpy()
            assert found.shape == expected.shape, name
            # relative to the output's largest value; an all-zero output (every mask empty after binarization
            # pools to zeros: the random model's CLIP logits for one of the images) must come out as zeros
            scale = np.abs(expected).max()
            error = np.abs(found - expected).max()
            assert error <= 1e-4 * scale if scale > 0 else error <= 1e-7, f"{name}: error {error:.2e} of {scale:.2e}"
            nonzero[name] = nonzero.get(name, False) or scale > 0
    # positive control: every output, the out-of-vocabulary logits included, is compared on non-zero values
    assert all(nonzero.values()), nonzero


def test_mask_pooling_of_an_empty_mask_in_onnxruntime_is_zero_as_in_pytorch(tmp_path):
    """
    An empty mask pools to zeros (FC-CLIP divides by `area + 1e-8`). The ONNX export's graph optimizer dropped that
    `+ 1e-8`, so onnxruntime divided 0 by 0 and every class logit of the image became NaN (seen on random tiny
    models); `mask_pool` divides by `area.clamp_min(1)`, the same values for integer areas.
    """
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from transformers_possam.modeling import mask_pool

    class Pooling(torch.nn.Module):
        def forward(self, features, mask_logits):
            return mask_pool(features, mask_logits)

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 4, 4, 4, generator=generator)
    mask_logits = torch.randn(1, 3, 8, 8, generator=generator)
    mask_logits[0, 1] = -1.0  # empty after binarization
    expected = mask_pool(features, mask_logits)
    assert torch.equal(expected[0, 1], torch.zeros(4)) and expected[0, 0].abs().sum() > 0
    program = torch.onnx.export(Pooling(), (features, mask_logits), dynamo=True)
    program.save(str(tmp_path / "pooling.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "pooling.onnx"), providers=["CPUExecutionProvider"])
    (found,) = session.run(None, {"features": features.numpy(), "mask_logits": mask_logits.numpy()})
    np.testing.assert_allclose(found, expected.numpy(), rtol=1e-6, atol=1e-7)


def test_export_refuses_what_it_cannot_export(model):
    embeddings, synonym_mask = vocabulary(model, 3, 2, 0)
    picture = pixels(model, 1, 0)
    # a training-mode model computes losses and dropout: exporting it would freeze that in
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            export_program(model, picture, embeddings, synonym_mask)
    finally:
        model.eval()
    # one embedding per class (K, D) must be given as (K, 1, D): the graph's layout is fixed
    with pytest.raises(ValueError, match=r"\(num_classes, num_synonyms, dim\)"):
        export_program(model, picture, embeddings[:, 0], None)
    # value checks, which the traced graph skips, run once eagerly on the example
    with pytest.raises(ValueError, match="non-finite|NaN|finite"):
        export_program(model, picture, torch.full_like(embeddings, float("nan")), synonym_mask)
    empty_class = synonym_mask.clone()
    empty_class[1] = False
    with pytest.raises(ValueError, match="no synonym"):
        export_program(model, picture, embeddings, empty_class)
    with pytest.raises(TypeError, match="PosSAMForPanopticSegmentation"):
        from transformers_possam.export import PosSAMExportGraph

        PosSAMExportGraph(torch.nn.Linear(2, 2))
