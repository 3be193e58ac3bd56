"""
Exporting PosSAM for deployment: `torch.export` of the whole `PosSAMForPanopticSegmentation`, and ONNX through
`torch.onnx.export(..., dynamo=True)` (run with onnxruntime).

The exported graph is the model's forward from pixels and a *precomputed* vocabulary (`class_embeddings` `(K, S, D)`
from `model.get_class_embeddings(**processor.encode_vocabulary(labels))`, and its `synonym_mask` `(K, S)`): the text
tower runs once per vocabulary, not per image, so it stays out of the graph. The batch size, K and S are dynamic; the
image side is the processor's padded size (SAM's position embeddings fix it). Pre- and post-processing stay in
Python (`PosSAMProcessor`), fed with the exported program's outputs.

What tracing leaves out: the forward's checks that read tensor *values* (NaN, 0/1 masks, a class without synonyms)
are data-dependent branches, skipped while tracing (`modeling_possam._checking_values`); shape and dtype checks
remain in the graph. Check the vocabulary once in eager mode (`model(..., class_embeddings=..., synonym_mask=...)`
or `model.get_class_embeddings`) before serving it to an exported program.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.export import Dim

from .modeling_possam import PosSAMForPanopticSegmentation


__all__ = ["EXPORTED_OUTPUTS", "PosSAMExportGraph", "export_onnx", "export_program"]

# The outputs post-processing reads, in the order the graph returns them.
EXPORTED_OUTPUTS = ("class_queries_logits", "clip_class_logits", "masks_queries_logits", "iou_scores")
EXPORTED_INPUTS = ("pixel_values", "class_embeddings", "synonym_mask")
# Upper bounds of the dynamic dimensions (torch.export needs a range; these are far beyond any real use).
MAX_BATCH, MAX_CLASSES, MAX_SYNONYMS = 1024, 65536, 1024


class PosSAMExportGraph(torch.nn.Module):
    """
    `PosSAMForPanopticSegmentation` with positional tensor inputs and a tuple of tensor outputs (`EXPORTED_OUTPUTS`),
    the form ONNX and other runtimes take.

    Inputs: `pixel_values` `(B, 3, H, W)` (the processor's padded size), `class_embeddings` `(K, S, D)`,
    `synonym_mask` `(K, S)` bool. Outputs: `class_queries_logits` `(B, Q, K + 1)`, `clip_class_logits` `(B, Q, K)`,
    `masks_queries_logits` `(B, Q, H/4, W/4)`, `iou_scores` `(B, Q)`.
    """

    def __init__(self, model: PosSAMForPanopticSegmentation):
        super().__init__()
        if not isinstance(model, PosSAMForPanopticSegmentation):
            raise TypeError(f"model must be a PosSAMForPanopticSegmentation, got {type(model).__name__}.")
        self.model = model

    def forward(
        self, pixel_values: torch.Tensor, class_embeddings: torch.Tensor, synonym_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values, class_embeddings=class_embeddings, synonym_mask=synonym_mask)
        return tuple(outputs[name] for name in EXPORTED_OUTPUTS)


def _dynamic_shapes() -> dict[str, dict[int, Dim]]:
    batch = Dim("batch", min=1, max=MAX_BATCH)
    classes = Dim("classes", min=1, max=MAX_CLASSES)
    synonyms = Dim("synonyms", min=1, max=MAX_SYNONYMS)
    return {
        "pixel_values": {0: batch},
        "class_embeddings": {0: classes, 1: synonyms},
        "synonym_mask": {0: classes, 1: synonyms},
    }


def _example_inputs(
    model: PosSAMForPanopticSegmentation,
    pixel_values: torch.Tensor,
    class_embeddings: torch.Tensor,
    synonym_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The example inputs, checked once eagerly (values included) and laid out as the graph takes them."""
    if model.training:
        raise ValueError("Export the model in eval mode (`model.eval()`): training mode computes losses and dropout.")
    if not torch.is_tensor(class_embeddings) or class_embeddings.dim() != 3:
        raise ValueError(
            "class_embeddings must be a (num_classes, num_synonyms, dim) tensor, e.g. "
            "model.get_class_embeddings(**processor.encode_vocabulary(labels)); got "
            f"{tuple(class_embeddings.shape) if torch.is_tensor(class_embeddings) else type(class_embeddings).__name__}."
        )
    if synonym_mask is None:
        synonym_mask = torch.ones(class_embeddings.shape[:2], dtype=torch.bool, device=class_embeddings.device)
    with torch.no_grad():  # the eager forward validates what tracing cannot (NaN, 0/1 masks, empty classes)
        model(pixel_values=pixel_values, class_embeddings=class_embeddings, synonym_mask=synonym_mask)
    synonym_mask = synonym_mask.bool()
    # torch.export specializes a dimension whose example size is 1 (it would no longer be dynamic): trace with 2
    if pixel_values.shape[0] == 1:
        pixel_values = pixel_values.repeat(2, 1, 1, 1)
    if class_embeddings.shape[0] == 1:
        class_embeddings, synonym_mask = class_embeddings.repeat(2, 1, 1), synonym_mask.repeat(2, 1)
    if class_embeddings.shape[1] == 1:
        class_embeddings, synonym_mask = class_embeddings.repeat(1, 2, 1), synonym_mask.repeat(1, 2)
    return pixel_values, class_embeddings, synonym_mask


def export_program(
    model: PosSAMForPanopticSegmentation,
    pixel_values: torch.Tensor,
    class_embeddings: torch.Tensor,
    synonym_mask: torch.Tensor | None = None,
) -> torch.export.ExportedProgram:
    """
    `torch.export` of `model`'s forward (eval mode) from example inputs: `pixel_values` `(B, 3, H, W)`,
    `class_embeddings` `(K, S, D)`, `synonym_mask` `(K, S)` (all True when None). B, K and S are dynamic.
    `program.module()(pixel_values=..., class_embeddings=..., synonym_mask=...)`, run under `torch.no_grad()` (the
    graph is traced for inference), returns a `PosSAMForPanopticSegmentationOutput`, which the processor's
    post-processing takes.

    Raises:
        ValueError: a model in training mode, or example inputs the model refuses.
    """
    pixel_values, class_embeddings, synonym_mask = _example_inputs(model, pixel_values, class_embeddings, synonym_mask)
    inputs = {"pixel_values": pixel_values, "class_embeddings": class_embeddings, "synonym_mask": synonym_mask}
    with torch.no_grad():
        return torch.export.export(model, (), inputs, dynamic_shapes=_dynamic_shapes(), strict=False)


def export_onnx(
    model: PosSAMForPanopticSegmentation,
    path: str | os.PathLike,
    pixel_values: torch.Tensor,
    class_embeddings: torch.Tensor,
    synonym_mask: torch.Tensor | None = None,
    opset_version: int | None = None,
) -> Path:
    """
    ONNX export (`torch.onnx.export(..., dynamo=True)`, which needs the `onnx` and `onnxscript` packages) of
    `PosSAMExportGraph(model)` to `path`: inputs `EXPORTED_INPUTS`, outputs `EXPORTED_OUTPUTS`, dynamic batch size,
    K and S. A model beyond protobuf's 2 GB limit has its weights in a `<name>.data` file next to it (ONNX external
    data), which must stay with the `.onnx` file. Returns `path`.

    Run it with onnxruntime: `onnxruntime.InferenceSession(path).run(None, {"pixel_values": ..., "class_embeddings":
    ..., "synonym_mask": ...})` (numpy arrays; `synonym_mask` bool).
    """
    pixel_values, class_embeddings, synonym_mask = _example_inputs(model, pixel_values, class_embeddings, synonym_mask)
    dynamic_shapes = _dynamic_shapes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            PosSAMExportGraph(model),
            (pixel_values, class_embeddings, synonym_mask),
            dynamo=True,
            input_names=list(EXPORTED_INPUTS),
            output_names=list(EXPORTED_OUTPUTS),
            dynamic_shapes=tuple(dynamic_shapes[name] for name in EXPORTED_INPUTS),
            opset_version=opset_version,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program: this torch version's dynamo exporter is needed.")
    program.save(str(path))  # external data only beyond protobuf's 2 GB (onnx's default)
    return path
