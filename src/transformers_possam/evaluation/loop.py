"""Evaluate a PosSAM model on panoptic rows as the paper's Table 1 does: PQ / SQ / RQ, mask AP and mIoU.

- PQ (panopticapi's rules) from panoptic inference, per All / Things / Stuff and Seen / Unseen classes (Table 3),
  against the panoptic PNG at the original image size.
- Mask AP (COCO protocol, pycocotools) from instance inference (FC-CLIP's: top-100 pairs, then thing classes only),
  against the thing segments of the panoptic PNG (crowd segments as `iscrowd` regions). FC-CLIP scores against the
  dataset's instance JSON (COCO `instances_val2017.json`, ADE20K `ade20k_instance_val.json`), whose masks are made
  from the same annotations; the panoptic PNG's thing segments are the in-memory equivalent.
- mIoU (detectron2's SemSegEvaluator rules) from semantic inference, against the dataset's own semantic ground truth
  when the row has one (`semantic_label`, e.g. ADE20K's `annotations_detectron2`, as FC-CLIP), else the semantic map
  derived from the panoptic PNG with crowd pixels labelled by their category (panopticapi's
  `panoptic2semantic_segmentation` rule, Mask2Former's COCO semantic annotations). The result says which.

Bad rows (undecodable image / PNG, `segments_info` that does not match the PNG, an unknown category, a semantic PNG of
another size) are skipped and counted exactly as in training (`check_bad_fraction`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from PIL import Image

from ..data.panoptic import BadSample, check_bad_fraction, decode_panoptic_sample, decode_semantic_label
from ..vocabularies import CandidateLabels, Vocabulary
from .instance import MaskAPAccumulator
from .panoptic import PanopticQualityAccumulator
from .semantic import SemanticConfusion, panoptic_to_semantic


__all__ = ["PanopticEvaluator", "evaluate_panoptic", "vocabulary_embeddings"]

logger = logging.getLogger(__name__)

# ignored ground-truth pixels: outside every class index, whatever the vocabulary's size
IGNORE = -1
# unlabelled pixels in a dataset's semantic PNG (Mask2Former's ADE20K / COCO semantic annotations)
SEMANTIC_PNG_IGNORE = 255

# where an evaluated image's semantic ground truth comes from (the keys of SEMANTIC_SOURCES)
GroundTruthSource = Literal["semantic_label", "panoptic"]
# what a process tells the others before each forward pass of a lockstep evaluation (`PanopticEvaluator.process`);
# ordered so that the maximum over processes is the decision: stop (someone failed) > forward again > all done
ALL_DONE, HAS_BATCH, FAILED = 0, 1, 2

# the image of a padding forward pass (`process` with `any_process`): any valid image, its outputs are dropped
PADDING_IMAGE = Image.new("RGB", (32, 32))

SEMANTIC_SOURCES = {
    "semantic_label": "the dataset's semantic ground truth (semantic_label column)",
    "panoptic": "derived from the panoptic PNG, crowd pixels labelled by their category (panopticapi's rule)",
}


class EvaluationCounts(TypedDict):
    """What `PanopticEvaluator` counts: rows processed, seen and skipped (with their ids), and ground-truth sources."""

    images: int
    seen: int
    bad: int
    bad_ids: list[object]  # the skipped rows' `image_id`, whatever type the dataset uses
    semantic_label: int
    panoptic: int


class DecodedSample(TypedDict):
    """One evaluation row, decoded and checked by `PanopticEvaluator._decode`."""

    image: Image.Image
    ids: np.ndarray  # (H, W) int64 panoptic segment ids
    segments: list[dict]  # segments_info, category ids mapped to class indices, with area and iscrowd
    semantic: np.ndarray  # (H, W) int64 class indices, IGNORE where unlabelled
    source: GroundTruthSource
    image_id: object


def underlying_model(model: torch.nn.Module) -> Any:
    """
    The model inside distributed wrappers (DDP, FSDP1, a DeepSpeed engine: each keeps it as `.module`), whose `config`
    the evaluator reads; forward passes still go through the wrapper.
    """
    inner: Any = model
    while not hasattr(inner, "config") and isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    return inner


def vocabulary_embeddings(model, processor, vocabulary: CandidateLabels) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(class_embeddings, synonym_mask)` of a vocabulary: a `Vocabulary`, a category table (`{"id", "name", "isthing"}`
    in class-index order) or anything else `processor.encode_vocabulary` takes.
    """
    tokens = processor.encode_vocabulary(vocabulary)
    device = next(model.parameters()).device
    with torch.no_grad():
        return model.get_class_embeddings(
            tokens["input_ids"].to(device), tokens["attention_mask"].to(device), tokens["synonym_mask"].to(device)
        )


class PanopticEvaluator:
    """
    Runs a model over dataset rows and accumulates PQ, mask AP and mIoU statistics (see the module doc).

    `process(rows)` as often as wanted; `state()` is a picklable summary that `merge_states` sums across processes
    (e.g. after `accelerate.utils.gather_object`); `summarize(state)` gives the results dict. Class index i of the
    vocabulary is `categories[i]`: a category table (`{"id", "name", "isthing"}`, `Vocabulary.from_categories`) or a
    `Vocabulary` whose `category_ids` are the dataset's. `class_embeddings` / `synonym_mask` default to the model's
    text tower on that vocabulary (`processor` needed then).

    `mase_alpha` / `mase_beta` default to the image processor's (`preprocessor_config.json`).

    `model` may be a distributed wrapper (DDP, FSDP, a DeepSpeed engine): forward passes go through it, the config is
    read from the model inside. Give `class_embeddings` then (the text tower of a sharded model cannot run outside
    its forward), and `process(rows, any_process=...)` so that every process runs the same number of forward passes.
    """

    def __init__(
        self,
        model,
        image_processor,
        categories: Vocabulary | Iterable[Mapping[str, object]],
        class_embeddings: torch.Tensor | None = None,
        synonym_mask: torch.Tensor | None = None,
        processor=None,
        batch_size: int = 4,
        use_mase: bool = True,
        mase_alpha: float | None = None,
        mase_beta: float | None = None,
        max_bad_fraction: float = 0.01,
        min_seen: int = 100,
        compute_ap: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.image_processor = model, image_processor
        self.vocabulary = categories if isinstance(categories, Vocabulary) else Vocabulary.from_categories(categories)
        self.label_map = self.vocabulary.label_map
        if class_embeddings is None:
            if processor is None:
                raise ValueError(
                    "Give class_embeddings and synonym_mask, or a processor to encode the categories' names."
                )
            class_embeddings, synonym_mask = vocabulary_embeddings(model, processor, self.vocabulary)
        self.class_embeddings, self.synonym_mask = class_embeddings, synonym_mask
        self.seen = self.vocabulary.seen_mask(underlying_model(model).config.training_vocabulary)
        self.batch_size, self.use_mase, self.compute_ap = batch_size, use_mase, compute_ap
        self.post_processing = {"use_mase": use_mase, "mase_alpha": mase_alpha, "mase_beta": mase_beta}
        self.max_bad_fraction, self.min_seen = max_bad_fraction, min_seen
        self.panoptic = PanopticQualityAccumulator()
        self.confusion = SemanticConfusion(len(self.vocabulary), ignore_index=IGNORE)
        self.mask_ap = MaskAPAccumulator()
        self.counts: EvaluationCounts = {
            "images": 0,
            "seen": 0,
            "bad": 0,
            "bad_ids": [],
            "semantic_label": 0,
            "panoptic": 0,
        }

    # ----- per-row work
    def _decode(self, row: dict) -> DecodedSample:
        """One row -> everything its scoring needs, or `BadSample`."""
        image, ids, segments = decode_panoptic_sample(row)
        unknown = sorted({s["category_id"] for s in segments if s["category_id"] not in self.label_map})
        if unknown:
            raise BadSample(f"sample {row.get('image_id')}: category ids {unknown} are not in the category table")
        segments = [
            dict(
                s,
                category_id=self.label_map[s["category_id"]],
                area=int((ids == s["id"]).sum()),
                iscrowd=int(s.get("iscrowd", 0)),
            )
            for s in segments
        ]
        semantic = decode_semantic_label(row, ids.shape)
        source: GroundTruthSource
        if semantic is not None:
            source = "semantic_label"
            known = np.isin(semantic, list(self.label_map)) | (semantic == SEMANTIC_PNG_IGNORE)
            if not known.all():
                raise BadSample(
                    f"sample {row.get('image_id')}: semantic label values {sorted(set(np.unique(semantic[~known]).tolist()))[:5]} "
                    f"are neither category ids of the table nor {SEMANTIC_PNG_IGNORE}"
                )
            # the PNG's 255 becomes the internal ignore value, never a class index (vocabularies may exceed 255 classes)
            lookup = {**self.label_map, SEMANTIC_PNG_IGNORE: IGNORE}
            values, inverse = np.unique(semantic, return_inverse=True)
            semantic = np.array([lookup[int(v)] for v in values], dtype=np.int64)[inverse].reshape(semantic.shape)
        else:
            source = "panoptic"
            try:
                semantic = panoptic_to_semantic(ids, segments, ignore_index=IGNORE)
            except (ValueError, KeyError) as error:
                raise BadSample(f"sample {row.get('image_id')}: {error}") from error
        return {
            "image": image,
            "ids": ids,
            "segments": segments,
            "semantic": semantic,
            "source": source,
            "image_id": row.get("image_id"),
        }

    def _skip(self, row: dict, error: BadSample) -> None:
        self.counts["bad"] += 1
        self.counts["bad_ids"].append(row.get("image_id"))
        logger.warning("Skipping bad evaluation sample: %s", error)
        check_bad_fraction(
            self.counts["seen"], self.counts["bad"], self.counts["bad_ids"], self.max_bad_fraction, self.min_seen
        )

    def _batches(self, rows: Iterable[dict]) -> Iterator[list[DecodedSample]]:
        """Decoded rows in batches of `batch_size` (the last one may be shorter); bad rows skipped and counted."""
        batch: list[DecodedSample] = []
        for row in rows:
            self.counts["seen"] += 1
            try:
                batch.append(self._decode(row))
            except BadSample as error:
                self._skip(row, error)
                continue
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def process(self, rows: Iterable[dict], any_process: Callable[[int], int] | None = None) -> None:
        """
        Scores `rows` (dataset rows, see the module doc) in batches of `batch_size`.

        `any_process`, for evaluation spread over processes through a distributed model: the maximum of an int over
        all processes (with accelerate: `lambda code: int(accelerator.gather(torch.tensor([code],
        device=accelerator.device)).max())`). With it, every process runs the model the same number of times: before
        each forward pass the processes agree whether any of them still has a batch, and one that has none runs a
        padding batch (one blank image) whose outputs are dropped. Under FSDP or DeepSpeed ZeRO-3 every forward pass
        gathers parameters from all processes, and DDP broadcasts buffers: a process running fewer forward passes
        would leave the others waiting forever. A failure on one process (too many bad rows, an error while scoring)
        stops all of them at the next agreement: that process raises its error, the others a `RuntimeError`.
        """
        batches = self._batches(rows)
        if any_process is None:
            for whole_batch in batches:
                self._score(whole_batch)
            return
        failure: Exception | None = None
        while True:
            batch: list[DecodedSample] | None = None
            if failure is None:
                try:
                    batch = next(batches, None)
                except Exception as error:  # reported to the others below, then raised here
                    failure = error
            status = FAILED if failure is not None else HAS_BATCH if batch is not None else ALL_DONE
            decision = any_process(status)
            if decision == FAILED:
                if failure is not None:
                    raise failure
                raise RuntimeError("The evaluation failed on another process; this process stops as well.")
            if decision == ALL_DONE:
                return
            try:
                if batch is None:
                    self._forward([PADDING_IMAGE])  # outputs dropped: only keeps the processes in step
                else:
                    self._score(batch)
            except Exception as error:
                failure = error

    @torch.no_grad()
    def _forward(self, images: list[Image.Image]) -> tuple[dict, object]:
        """(image processor inputs, model outputs) of `images`, the model in eval mode."""
        model, processor = self.model, self.image_processor
        first_parameter = next(model.parameters())
        inputs = processor(images, return_tensors="pt")
        was_training = model.training
        model.eval()
        try:
            outputs = model(
                pixel_values=inputs["pixel_values"].to(first_parameter.device, first_parameter.dtype),
                pixel_mask=inputs["pixel_mask"].to(first_parameter.device),
                class_embeddings=self.class_embeddings,
                synonym_mask=self.synonym_mask,
                return_clip_logits=True,
            )
        finally:
            model.train(was_training)
        return inputs, outputs

    @torch.no_grad()
    def _score(self, batch: list[DecodedSample]) -> None:
        processor = self.image_processor
        device = next(self.model.parameters()).device
        inputs, outputs = self._forward([item["image"] for item in batch])
        options = dict(
            target_sizes=inputs["original_sizes"],
            reshaped_input_sizes=inputs["reshaped_input_sizes"],
            seen_mask=self.seen.to(device),
            **self.post_processing,
        )
        panoptic = processor.post_process_panoptic_segmentation(
            outputs, label_ids_to_fuse=self.vocabulary.stuff_ids, **options
        )
        semantic = processor.post_process_semantic_segmentation(outputs, **options)
        instances = (
            processor.post_process_instance_segmentation(
                outputs, thing_label_ids=self.vocabulary.thing_ids, return_binary_maps=True, **options
            )
            if self.compute_ap
            else [None] * len(batch)
        )
        thing_ids = set(self.vocabulary.thing_ids)
        for item, panoptic_result, class_map, instance_result in zip(batch, panoptic, semantic, instances):
            pred_segments = [{"id": s["id"], "category_id": s["label_id"]} for s in panoptic_result["segments_info"]]
            self.panoptic.update(
                item["ids"],
                item["segments"],
                panoptic_result["segmentation"].numpy(),
                pred_segments,
                image_id=item["image_id"],
            )
            self.confusion.update(class_map.numpy(), item["semantic"])
            if instance_result is not None:
                things = [s for s in item["segments"] if s["category_id"] in thing_ids]
                gt_masks = (
                    np.stack([item["ids"] == s["id"] for s in things])
                    if things
                    else np.zeros((0, *item["ids"].shape), bool)
                )
                self.mask_ap.update(
                    gt_masks,
                    [s["category_id"] for s in things],
                    [s["iscrowd"] for s in things],
                    instance_result["binary_masks"].numpy(),
                    [s["label_id"] for s in instance_result["segments_info"]],
                    [s["score"] for s in instance_result["segments_info"]],
                )
            self.counts["images"] += 1
            self.counts[item["source"]] += 1

    # ----- results
    def state(self) -> dict:
        """Picklable sufficient statistics of what was processed (sum them with `merge_states`)."""
        return {
            "vocabulary": self.vocabulary,
            "seen": self.seen.tolist(),
            "compute_ap": self.compute_ap,
            "panoptic": self.panoptic.to_array(list(range(len(self.vocabulary)))),
            "confusion": self.confusion.matrix.copy(),
            "mask_ap": self.mask_ap.state(),
            "counts": {key: (list(value) if isinstance(value, list) else value) for key, value in self.counts.items()},
        }

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """Sum the statistics of several evaluators (one per process) over the same vocabulary."""
        if not states:
            raise ValueError("No evaluation state to merge.")
        first = states[0]
        for other in states[1:]:
            if other["vocabulary"] != first["vocabulary"]:
                raise ValueError("Evaluation states of different vocabularies cannot be merged.")
        counts = {
            key: (
                sum((s["counts"][key] for s in states), [])
                if key == "bad_ids"
                else sum(s["counts"][key] for s in states)
            )
            for key in first["counts"]
        }
        return dict(
            first,
            panoptic=sum(s["panoptic"] for s in states),
            confusion=sum(s["confusion"] for s in states),
            mask_ap=MaskAPAccumulator.from_states([s["mask_ap"] for s in states]).state(),
            counts=counts,
        )

    @staticmethod
    def summarize(state: dict) -> dict:
        """
        Returns panopticapi's dict (`All`, `Things`, `Stuff`, `per_class`) plus `Seen` / `Unseen`, `mask_AP`
        (`AP`, `AP50`, ... in [0, 1]; None when `compute_ap` was off), `mIoU`, `mIoU_ground_truth` (which semantic
        ground truth was used), `images` scored, `bad_samples` and `bad_sample_ids`.
        """
        vocabulary = state["vocabulary"]
        classes = list(range(len(vocabulary)))
        # panopticapi's category table, keyed by class index (the PQ splits read `isthing`)
        table = dict(enumerate(vocabulary.to_categories()))
        accumulator = PanopticQualityAccumulator.from_array(state["panoptic"], classes)
        results = accumulator.summarize(table, seen_category_ids=[i for i, seen in enumerate(state["seen"]) if seen])
        confusion = SemanticConfusion(len(vocabulary), ignore_index=IGNORE)
        confusion.matrix = state["confusion"]
        results["mIoU"] = confusion.compute()["mIoU"]
        counts = state["counts"]
        sources = [SEMANTIC_SOURCES[key] for key in ("semantic_label", "panoptic") if counts[key]]
        if len(sources) == 2:
            results["mIoU_ground_truth"] = (
                f"mixed: {counts['semantic_label']} rows {sources[0]}, {counts['panoptic']} rows {sources[1]}"
            )
        else:
            results["mIoU_ground_truth"] = sources[0] if sources else "no image scored"
        results["mask_AP"] = (
            MaskAPAccumulator.from_states([state["mask_ap"]]).compute(category_ids=vocabulary.thing_ids)
            if state["compute_ap"]
            else None
        )
        results["images"] = counts["images"]
        results["bad_samples"] = counts["bad"]
        results["bad_sample_ids"] = counts["bad_ids"][-100:]
        return results

    def results(self) -> dict:
        return self.summarize(self.state())


def evaluate_panoptic(
    model,
    image_processor,
    rows,
    categories: Vocabulary | Iterable[Mapping[str, object]],
    class_embeddings: torch.Tensor,
    synonym_mask: torch.Tensor,
    batch_size: int = 4,
    use_mase: bool = True,
    mase_alpha: float | None = None,
    mase_beta: float | None = None,
    max_bad_fraction: float = 0.01,
    compute_ap: bool = True,
) -> dict:
    """
    Runs the model on every row (the dataset schema) in one process and returns `PanopticEvaluator.summarize`'s
    dict: PQ (All / Things / Stuff / Seen / Unseen), `mask_AP`, `mIoU` (with `mIoU_ground_truth`), counts of scored
    and skipped rows. `class_embeddings` / `synonym_mask` come from `model.get_class_embeddings` on `categories`.
    """
    evaluator = PanopticEvaluator(
        model,
        image_processor,
        categories,
        class_embeddings,
        synonym_mask,
        batch_size=batch_size,
        use_mase=use_mase,
        mase_alpha=mase_alpha,
        mase_beta=mase_beta,
        max_bad_fraction=max_bad_fraction,
        compute_ap=compute_ap,
    )
    evaluator.process(rows)
    return evaluator.results()
