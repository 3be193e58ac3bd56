"""
Independent reference for the post-processing and the classifiers: a literal transcription of FC-CLIP's inference code.

Source: bytedance/fc-clip at commit 2b0bbe2 (2b0bbe213070d44da9182530fa2e826fef03f974), `fcclip/fcclip.py`, its
classifiers (`fcclip/modeling/transformer_decoder/fcclip_transformer_decoder.py`, `fcclip/modeling/backbone/clip.py`)
and detectron2's `detectron2/modeling/postprocessing.py::sem_seg_postprocess` (facebookresearch/detectron2 at 02b5c4e).
Line ranges below refer to these files. Operation order and constants are FC-CLIP's, unchanged, also where a
simpler formula would give the same numbers: the point is to compare our vectorized post-processors with the code
that produced FC-CLIP's (and PosSAM's) published numbers. Only the plumbing differs:

- plain functions on torch tensors instead of `FCCLIP` methods (no detectron2: `Instances` becomes a dict);
- metadata becomes arguments: `thing_ids` replaces `test_metadata.thing_dataset_id_to_contiguous_id.values()`, the
  number of classes K is read off the logits (`len(test_metadata.stuff_classes)` is K in FC-CLIP's panoptic
  datasets: stuff_classes lists every class, things included);
- the out-of-vocabulary (CLIP) logits come without their void column, which FC-CLIP drops right away (L367);
- defaults are the FC-CLIP eval configs' values: GEOMETRIC_ENSEMBLE_ALPHA 0.4 / BETA 0.8 and
  ENSEMBLE_ON_VALID_MASK False (fcclip/config.py L128-130; configs/.../fcclip_convnext_large_eval_*.yaml),
  OBJECT_MASK_THRESHOLD 0.0 (eval yaml L24), OVERLAP_THRESHOLD 0.8 (maskformer2_R50_bs16_50ep.yaml L44),
  test_topk_per_image = TEST.DETECTIONS_PER_IMAGE = 100 (detectron2/config/defaults.py L614), and
  semantic, panoptic and instance inference all on (eval yaml L21-23), which makes
  `sem_seg_postprocess_before_inference` True (fcclip.py L272-276).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch.nn import functional as F


__all__ = [
    "GEOMETRIC_ENSEMBLE_ALPHA",
    "GEOMETRIC_ENSEMBLE_BETA",
    "OBJECT_MASK_THRESHOLD",
    "OVERLAP_THRESHOLD",
    "TEST_TOPK_PER_IMAGE",
    "fcclip_ensemble_logits",
    "fcclip_ensemble_probs",
    "fcclip_inference",
    "fcclip_upsample_masks",
    "get_classification_logits",
    "mask_pooling",
    "visual_prediction_forward_convnext",
    "instance_inference",
    "panoptic_inference",
    "sem_seg_postprocess",
    "semantic_inference",
]

GEOMETRIC_ENSEMBLE_ALPHA = 0.4
GEOMETRIC_ENSEMBLE_BETA = 0.8
OBJECT_MASK_THRESHOLD = 0.0
OVERLAP_THRESHOLD = 0.8
TEST_TOPK_PER_IMAGE = 100


def fcclip_ensemble_probs(
    in_vocab_logits: torch.Tensor,
    out_vocab_logits: torch.Tensor,
    category_overlapping_mask: torch.Tensor,
    alpha: float = GEOMETRIC_ENSEMBLE_ALPHA,
    beta: float = GEOMETRIC_ENSEMBLE_BETA,
) -> torch.Tensor:
    """
    Transcribes `FCCLIP.forward`'s eval-branch class ensemble, fcclip/fcclip.py L350-401 (commit 2b0bbe2), with
    `ensemble_on_valid_mask=False` (the `else` branch, L383-385), up to `mask_cls_probs` (before the log of L402).

    Args:
        in_vocab_logits: `(..., Q, K + 1)` in-vocabulary class logits, void last (FC-CLIP's `outputs["pred_logits"]`).
        out_vocab_logits: `(..., Q, K)` out-of-vocabulary (CLIP) logits, void column already removed (L367).
        category_overlapping_mask: `(K,)` 1 for classes seen in training, 0 for unseen (any int / bool dtype).
        alpha, beta: CLIP's exponent on seen / unseen classes.

    Returns:
        `mask_cls_probs` `(..., Q, K + 1)`: ensembled class probabilities times (1 - p_void), then p_void.
    """
    mask_cls_results = in_vocab_logits  # L350
    out_vocab_cls_results = out_vocab_logits  # L365 (+ L367: the caller already dropped the void column)
    in_vocab_cls_results = mask_cls_results[..., :-1]  # remove void (L366)

    # L369-371: "Reference: https://github.com/NVlabs/ODISE/blob/main/odise/modeling/meta_arch/odise.py#L1506"
    out_vocab_cls_probs = out_vocab_cls_results.softmax(-1)
    in_vocab_cls_results = in_vocab_cls_results.softmax(-1)
    # L372: FC-CLIP's mask is a long tensor (prepare_class_names_from_metadata, L160-161)
    category_overlapping_mask = category_overlapping_mask.to(device=in_vocab_logits.device, dtype=torch.long)

    # L383-385 (ensemble_on_valid_mask False): `alpha` and `beta` stay the scalar config values

    # L387-395: geometric ensemble in log space, selected by the seen / unseen masks (a product 0 would give
    # -inf * 0 = NaN here, exactly as in FC-CLIP)
    cls_logits_seen = (
        in_vocab_cls_results ** (1 - alpha) * out_vocab_cls_probs**alpha
    ).log() * category_overlapping_mask
    cls_logits_unseen = (in_vocab_cls_results ** (1 - beta) * out_vocab_cls_probs**beta).log() * (
        1 - category_overlapping_mask
    )
    cls_results = cls_logits_seen + cls_logits_unseen

    # L397-401: "This is used to filtering void predictions."
    is_void_prob = F.softmax(mask_cls_results, dim=-1)[..., -1:]
    mask_cls_probs = torch.cat([cls_results.softmax(-1) * (1.0 - is_void_prob), is_void_prob], dim=-1)
    return mask_cls_probs


def fcclip_ensemble_logits(*args, **kwargs) -> torch.Tensor:
    """
    fcclip/fcclip.py L350-402 (commit 2b0bbe2): `fcclip_ensemble_probs` (same arguments), then L402's
    `mask_cls_results = torch.log(mask_cls_probs + 1e-8)`, the `(..., Q, K + 1)` logits every inference below
    takes (they softmax it again, which gives back (p + 1e-8) / (1 + (K + 1) * 1e-8)).
    """
    mask_cls_probs = fcclip_ensemble_probs(*args, **kwargs)
    mask_cls_results = torch.log(mask_cls_probs + 1e-8)  # L402
    return mask_cls_results


def get_classification_logits(x, text_classifier, logit_scale, num_templates=None):
    """
    fcclip/modeling/transformer_decoder/fcclip_transformer_decoder.py L38-54 (commit 2b0bbe2), verbatim: both of
    FC-CLIP's classifiers. `x` `(B, Q, C)` embeddings; `text_classifier` `(sum(num_templates) + 1, C)`: each class's
    L2-normalized synonym embeddings one after the other, then the L2-normalized void embedding (fcclip/fcclip.py
    L326); `logit_scale` the learnable log 1/tau; `num_templates[k]` the number of synonyms of class k. Returns
    `(B, Q, K + 1)`, void last (the out-of-vocabulary branch drops it, fcclip/fcclip.py L367).
    """
    # x in shape of [B, *, C]
    # text_classifier in shape of [num_classes, C]
    # logit_scale is a learnable scalar https://github.com/mlfoundations/open_clip/blob/main/src/open_clip/model.py#L201
    # return: [B, *, num_classes]
    x = F.normalize(x, dim=-1)
    logit_scale = torch.clamp(logit_scale.exp(), max=100)
    pred_logits = logit_scale * x @ text_classifier.T  # B, *, N + 1
    # max ensembel as in OpenSeg/ODISE
    final_pred_logits = []
    cur_idx = 0
    for num_t in num_templates:
        final_pred_logits.append(pred_logits[:, :, cur_idx : cur_idx + num_t].max(-1).values)
        cur_idx += num_t
    final_pred_logits.append(pred_logits[:, :, -1])  # the last classifier is for void
    final_pred_logits = torch.stack(final_pred_logits, dim=-1)
    return final_pred_logits


def mask_pooling(x, mask):
    """
    fcclip/modeling/transformer_decoder/fcclip_transformer_decoder.py L57-83 (commit 2b0bbe2), `MaskPooling.forward`:
    `x` `(B, C, H, W)` features, `mask` `(B, Q, H, W)` mask logits -> `(B, Q, C)` averages inside each mask (logit > 0).
    fcclip/fcclip.py L356-357 first resizes the mask logits to the CLIP feature map (bilinear, align_corners=False).
    """
    if x.shape[-2:] != mask.shape[-2:]:
        # reshape mask to x
        mask = F.interpolate(mask, size=x.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        mask = mask.detach()
        mask = (mask > 0).to(mask.dtype)
        denorm = mask.sum(dim=(-1, -2), keepdim=True) + 1e-8

    mask_pooled_x = torch.einsum(
        "bchw,bqhw->bqc",
        x,
        mask / denorm,
    )
    return mask_pooled_x


def visual_prediction_forward_convnext(clip_model, x):
    """
    fcclip/modeling/backbone/clip.py L147-152 (commit 2b0bbe2): open_clip's ConvNeXt head (`visual.trunk.head`,
    then the projection `visual.head`) on mask-pooled features `(B, Q, C)`, each treated as a 1x1 map -> G_clip
    `(B, Q, D)`. `clip_model` is the open_clip `CLIP` (FC-CLIP's `self.clip_model`).
    """
    batch, num_query, channel = x.shape
    x = x.reshape(batch * num_query, channel, 1, 1)  # fake 2D input
    x = clip_model.visual.trunk.head(x)
    x = clip_model.visual.head(x)
    return x.view(batch, num_query, x.shape[-1])  # B x num_queries x 640


def fcclip_upsample_masks(mask_pred_results: torch.Tensor, padded_size: Sequence[int]) -> torch.Tensor:
    """
    fcclip/fcclip.py L404-410 (commit 2b0bbe2), "upsample masks": `(B, Q, h, w)` mask logits -> `(B, Q, H_pad,
    W_pad)`, bilinear, align_corners=False, to the padded batch size (FC-CLIP's `images.tensor.shape[-2:]`).
    """
    mask_pred_results = F.interpolate(
        mask_pred_results,
        size=(padded_size[0], padded_size[1]),
        mode="bilinear",
        align_corners=False,
    )
    return mask_pred_results


def sem_seg_postprocess(
    result: torch.Tensor, img_size: Sequence[int], output_height: int, output_width: int
) -> torch.Tensor:
    """
    detectron2/modeling/postprocessing.py L77-100, `sem_seg_postprocess` (imported by FC-CLIP 2b0bbe2 at fcclip.py
    L17; read at detectron2 02b5c4e, the code is unchanged since October 2019): crop the padding away (`img_size` =
    the resized image inside the padding), then bilinear (align_corners=False) resize of the `(C, h, w)` maps to
    `(output_height, output_width)`.
    """
    result = result[:, : img_size[0], : img_size[1]].expand(1, -1, -1, -1)
    result = F.interpolate(result, size=(output_height, output_width), mode="bilinear", align_corners=False)[0]
    return result


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """
    `FCCLIP.semantic_inference`, fcclip/fcclip.py L463-467 (commit 2b0bbe2): `(Q, K + 1)` ensembled logits and
    `(Q, H, W)` mask logits -> `(K, H, W)` per-class scores sum_q p(k | q) * sigmoid(mask_q).
    """
    mask_cls = F.softmax(mask_cls, dim=-1)[..., :-1]
    mask_pred = mask_pred.sigmoid()
    semseg = torch.einsum("qc,qhw->chw", mask_cls, mask_pred)
    return semseg


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    object_mask_threshold: float = OBJECT_MASK_THRESHOLD,
    overlap_threshold: float = OVERLAP_THRESHOLD,
) -> tuple[torch.Tensor, list[dict]]:
    """
    `FCCLIP.panoptic_inference`, fcclip/fcclip.py L469-525 (commit 2b0bbe2).

    Args:
        mask_cls: `(Q, K + 1)` ensembled logits (`fcclip_ensemble_logits`).
        mask_pred: `(Q, H, W)` mask logits at output resolution.
        thing_ids: the thing classes (FC-CLIP: `test_metadata.thing_dataset_id_to_contiguous_id.values()`).

    Returns:
        `(panoptic_seg (H, W) int32, segments_info)`, ids from 1, 0 = no segment; each info is FC-CLIP's
        `{"id", "isthing", "category_id"}` plus `"score"` (not in FC-CLIP: the score of the query that opened the
        segment, `cur_scores[k]`, kept for the parity tests; it changes nothing else).
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    mask_pred = mask_pred.sigmoid()
    num_classes = mask_cls.shape[-1] - 1  # len(self.test_metadata.stuff_classes)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores = scores[keep]
    cur_classes = labels[keep]
    cur_masks = mask_pred[keep]
    cur_mask_cls = mask_cls[keep]
    cur_mask_cls = cur_mask_cls[:, :-1]

    cur_prob_masks = cur_scores.view(-1, 1, 1) * cur_masks

    h, w = cur_masks.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=cur_masks.device)
    segments_info = []

    current_segment_id = 0

    if cur_masks.shape[0] == 0:
        # We didn't detect any mask :(
        return panoptic_seg, segments_info
    else:
        # take argmax
        cur_mask_ids = cur_prob_masks.argmax(0)
        stuff_memory_list = {}
        for k in range(cur_classes.shape[0]):
            pred_class = cur_classes[k].item()
            isthing = pred_class in thing_ids
            mask_area = (cur_mask_ids == k).sum().item()
            original_area = (cur_masks[k] >= 0.5).sum().item()
            mask = (cur_mask_ids == k) & (cur_masks[k] >= 0.5)

            if mask_area > 0 and original_area > 0 and mask.sum().item() > 0:
                if mask_area / original_area < overlap_threshold:
                    continue

                # merge stuff regions
                if not isthing:
                    if int(pred_class) in stuff_memory_list.keys():
                        panoptic_seg[mask] = stuff_memory_list[int(pred_class)]
                        continue
                    else:
                        stuff_memory_list[int(pred_class)] = current_segment_id + 1

                current_segment_id += 1
                panoptic_seg[mask] = current_segment_id

                segments_info.append(
                    {
                        "id": current_segment_id,
                        "isthing": bool(isthing),
                        "category_id": int(pred_class),
                        "score": cur_scores[k].item(),  # addition for the parity tests (see docstring)
                    }
                )

        return panoptic_seg, segments_info


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    thing_ids: Collection[int],
    test_topk_per_image: int = TEST_TOPK_PER_IMAGE,
    panoptic_on: bool = True,
) -> dict:
    """
    `FCCLIP.instance_inference`, fcclip/fcclip.py L527-568 (commit 2b0bbe2). With `panoptic_on` (FC-CLIP's eval
    configs) the top `test_topk_per_image` (query, class) pairs are taken over all K classes first, THEN the
    non-thing pairs are dropped. Note FC-CLIP's `topk(..., sorted=False)`: the order of the results is unspecified.
    Requires Q * K >= test_topk_per_image (FC-CLIP has 250 queries).

    Args:
        mask_cls: `(Q, K + 1)` ensembled logits (`fcclip_ensemble_logits`).
        mask_pred: `(Q, H, W)` mask logits at output resolution.
        thing_ids: the thing classes (FC-CLIP: `test_metadata.thing_dataset_id_to_contiguous_id.values()`).

    Returns:
        detectron2's `Instances` fields as a dict: `image_size`, `pred_masks` `(N, H, W)` float 0/1, `scores` `(N,)`,
        `pred_classes` `(N,)` (`pred_boxes` are all-zero boxes in FC-CLIP, left out).
    """
    # mask_pred is already processed to have the same shape as original input
    image_size = mask_pred.shape[-2:]
    num_queries = mask_cls.shape[0]  # self.num_queries

    # [Q, K]
    scores = F.softmax(mask_cls, dim=-1)[:, :-1]
    # if this is panoptic segmentation
    num_classes = mask_cls.shape[-1] - 1  # len(stuff_classes) if panoptic_on else len(thing_classes)
    labels = torch.arange(num_classes, device=mask_cls.device).unsqueeze(0).repeat(num_queries, 1).flatten(0, 1)
    scores_per_image, topk_indices = scores.flatten(0, 1).topk(test_topk_per_image, sorted=False)
    labels_per_image = labels[topk_indices]

    topk_indices = topk_indices // num_classes
    mask_pred = mask_pred[topk_indices]

    # if this is panoptic segmentation, we only keep the "thing" classes
    if panoptic_on:
        keep = torch.zeros_like(scores_per_image).bool()
        for i, lab in enumerate(labels_per_image):
            keep[i] = lab in thing_ids

        scores_per_image = scores_per_image[keep]
        labels_per_image = labels_per_image[keep]
        mask_pred = mask_pred[keep]

    result = {"image_size": tuple(image_size)}
    # mask (before sigmoid)
    result["pred_masks"] = (mask_pred > 0).float()

    # calculate average mask prob
    mask_scores_per_image = (mask_pred.sigmoid().flatten(1) * result["pred_masks"].flatten(1)).sum(1) / (
        result["pred_masks"].flatten(1).sum(1) + 1e-6
    )
    result["scores"] = scores_per_image * mask_scores_per_image
    result["pred_classes"] = labels_per_image
    return result


def fcclip_inference(
    in_vocab_logits: torch.Tensor,
    out_vocab_logits: torch.Tensor,
    mask_pred_results: torch.Tensor,
    category_overlapping_mask: torch.Tensor,
    padded_size: Sequence[int],
    image_sizes: Sequence[Sequence[int]],
    output_sizes: Sequence[Sequence[int]],
    thing_ids: Collection[int],
    alpha: float = GEOMETRIC_ENSEMBLE_ALPHA,
    beta: float = GEOMETRIC_ENSEMBLE_BETA,
    semantic_on: bool = True,
    panoptic_on: bool = True,
    instance_on: bool = True,
) -> list[dict]:
    """
    `FCCLIP.forward`'s eval branch from the head outputs on, fcclip/fcclip.py L350-445 (commit 2b0bbe2), with
    `sem_seg_postprocess_before_inference` True (forced by panoptic / instance inference, L272-276): the mask logits
    are upsampled to the padded size, cropped to the image and resized to the output size BEFORE the sigmoid of
    every inference.

    Args:
        in_vocab_logits: `(B, Q, K + 1)`, void last.
        out_vocab_logits: `(B, Q, K)` (no void column).
        mask_pred_results: `(B, Q, h, w)` mask logits (1/4 of the padded input).
        category_overlapping_mask: `(K,)` 1 = seen class.
        padded_size: `(H_pad, W_pad)` of the padded batch (`images.tensor.shape[-2:]`).
        image_sizes: per image, the resized image inside the padding (`images.image_sizes`).
        output_sizes: per image, the requested `(height, width)` (FC-CLIP: the original image size).
        thing_ids: the thing classes.

    Returns:
        Per image `{"sem_seg": (K, H, W), "panoptic_seg": (seg, segments_info), "instances": dict}` (the enabled ones).
    """
    mask_cls_results = fcclip_ensemble_logits(
        in_vocab_logits, out_vocab_logits, category_overlapping_mask, alpha, beta
    )
    mask_pred_results = fcclip_upsample_masks(mask_pred_results, padded_size)  # L404-410

    processed_results = []
    for mask_cls_result, mask_pred_result, output_size, image_size in zip(
        mask_cls_results, mask_pred_results, output_sizes, image_sizes, strict=True
    ):
        height, width = output_size  # L418-419
        processed_results.append({})

        # L422-426 (sem_seg_postprocess_before_inference)
        mask_pred_result = sem_seg_postprocess(mask_pred_result, image_size, height, width)
        mask_cls_result = mask_cls_result.to(mask_pred_result)

        # semantic segmentation inference (L429-433)
        if semantic_on:
            r = semantic_inference(mask_cls_result, mask_pred_result)
            processed_results[-1]["sem_seg"] = r

        # panoptic segmentation inference (L436-438)
        if panoptic_on:
            panoptic_r = panoptic_inference(mask_cls_result, mask_pred_result, thing_ids)
            processed_results[-1]["panoptic_seg"] = panoptic_r

        # instance segmentation inference (L441-443; `self.panoptic_on` is the config's, True in the eval configs)
        if instance_on:
            instance_r = instance_inference(mask_cls_result, mask_pred_result, thing_ids)
            processed_results[-1]["instances"] = instance_r

    return processed_results
