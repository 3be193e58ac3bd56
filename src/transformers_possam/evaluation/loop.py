"""Evaluate a PosSAM model on panoptic rows: PQ (panopticapi rules) and mIoU."""

from __future__ import annotations

import numpy as np
import torch

from ..data.panoptic import decode_panoptic_sample
from ..processing_possam import resolve_vocabulary, seen_class_mask
from .panoptic import PanopticQualityAccumulator
from .semantic import SemanticConfusion

__all__ = ["evaluate_panoptic"]


@torch.no_grad()
def evaluate_panoptic(
    model, image_processor, rows, categories: list[dict], class_embeddings: torch.Tensor, synonym_mask: torch.Tensor,
    batch_size: int = 4, use_mase: bool = True,
) -> dict:
    """
    Runs the model on every row (the dataset schema), post-processes panoptic and semantic outputs at the original
    size and scores them. Class index i of the vocabulary is `categories[i]`; `class_embeddings` / `synonym_mask`
    come from `model.get_class_embeddings` on that vocabulary. Returns panopticapi's dict plus
    `"Seen"`/`"Unseen"` (against the model's training vocabulary) and `"mIoU"`.
    """
    vocabulary = resolve_vocabulary([{"name": c["name"], "isthing": bool(c["isthing"])} for c in categories])
    label_map = {int(c["id"]): index for index, c in enumerate(categories)}
    seen = seen_class_mask(vocabulary, model.config.training_vocabulary)
    device = next(model.parameters()).device
    accumulator = PanopticQualityAccumulator()
    confusion = SemanticConfusion(len(categories))
    stuff_ids = [i for i, thing in enumerate(vocabulary.is_thing) if not thing]
    batch: list = []

    def flush():
        images = [item[0] for item in batch]
        inputs = image_processor(images)
        was_training = model.training
        model.eval()
        outputs = model(
            pixel_values=inputs["pixel_values"].to(device, next(model.parameters()).dtype), pixel_mask=inputs["pixel_mask"].to(device),
            class_embeddings=class_embeddings, synonym_mask=synonym_mask, return_clip_logits=True,
        )
        model.train(was_training)
        sizes = dict(target_sizes=inputs["original_sizes"], reshaped_input_sizes=inputs["reshaped_input_sizes"])
        panoptic = image_processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=stuff_ids, seen_mask=seen.to(device), use_mase=use_mase, **sizes
        )
        semantic = image_processor.post_process_semantic_segmentation(outputs, seen_mask=seen.to(device), use_mase=use_mase, **sizes)
        for (_, ids, segments), result, class_map in zip(batch, panoptic, semantic):
            gt_segments = [dict(s, category_id=label_map[s["category_id"]], area=int((ids == s["id"]).sum())) for s in segments]
            pred_segments = [{"id": s["id"], "category_id": s["label_id"]} for s in result["segments_info"]]
            accumulator.update(ids, gt_segments, result["segmentation"].numpy(), pred_segments)
            semantic_gt = np.full(ids.shape, 255, np.int64)
            for segment in gt_segments:
                if not segment.get("iscrowd", 0):
                    semantic_gt[ids == segment["id"]] = segment["category_id"]
            confusion.update(class_map.numpy(), semantic_gt)
        batch.clear()

    for row in rows:
        batch.append(decode_panoptic_sample(row))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    table = {index: {"isthing": int(thing)} for index, thing in enumerate(vocabulary.is_thing)}
    results = accumulator.summarize(table, seen_category_ids=[i for i, s in enumerate(seen.tolist()) if s])
    results["mIoU"] = confusion.compute()["mIoU"]
    return results
