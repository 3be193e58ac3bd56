"""Mask-Aware Selective Ensemble (MASE), paper §3.5 and Algorithm 1."""

from __future__ import annotations

import torch


__all__ = ["mask_aware_selective_ensemble", "selectivity"]


def selectivity(probs: torch.Tensor) -> torch.Tensor:
    """
    Algorithm 1's SE = 1 - sort(P)[-2] / sort(P)[-1] along the class axis: 1 for a single confident class, 0 for a
    tie. Defined as 1 when there is one class, and 0 when every probability is 0 (no evidence either way).

    Args:
        probs: `(..., K)`.

    Returns:
        `(...)`.
    """
    if probs.shape[-1] == 1:
        return torch.ones_like(probs[..., 0])
    top = probs.topk(2, dim=-1).values
    first, second = top[..., 0], top[..., 1]
    ratio = second / torch.where(first > 0, first, torch.ones_like(first))
    return torch.where(first > 0, 1 - ratio, torch.zeros_like(first))


def mask_aware_selective_ensemble(
    ldp_probs: torch.Tensor,
    clip_probs: torch.Tensor,
    iou_scores: torch.Tensor | None,
    seen_mask: torch.Tensor,
    alpha: float = 0.4,
    beta: float = 0.8,
) -> torch.Tensor:
    """
    Combine in-vocabulary (LDP) and out-of-vocabulary (CLIP) class probabilities per mask (paper Algorithm 1).

    - P_ldp = ldp_probs * IoU, P_clip = clip_probs * IoU (IoU broadcast over classes);
    - SE_ldp, SE_clip = `selectivity(P_ldp)`, `selectivity(P_clip)`; SE_conf = SE_clip / (SE_clip + SE_ldp), 0.5
      when both are 0;
    - alpha_hat = clamp(alpha * (1 + SE_conf), 0, 1), beta_hat likewise (the clamp keeps the geometric-mean
      exponents in [0, 1]; the paper leaves it out);
    - result = P_ldp^(1 - alpha_hat) * P_clip^alpha_hat on seen classes, with beta_hat on unseen classes.

    With `iou_scores=None` (Algorithm 1's "IoU not valid"): FC-CLIP's fixed geometric ensemble, exponent alpha on
    seen and beta on unseen classes, no IoU weighting.

    Args:
        ldp_probs, clip_probs: `(..., Q, K)` class probabilities without void.
        iou_scores: `(..., Q)` predicted IoU in [0, 1], or None.
        seen_mask: `(K,)` bool, True for classes of the training vocabulary.
        alpha, beta: CLIP's weight on seen / unseen classes.

    Returns:
        `(..., Q, K)` ensembled class scores (not renormalized: the IoU weighting is part of the score). Zero
        probabilities give 0 (never NaN or inf).
    """
    if ldp_probs.shape != clip_probs.shape:
        raise ValueError(
            f"ldp_probs {tuple(ldp_probs.shape)} and clip_probs {tuple(clip_probs.shape)} must have one shape."
        )
    num_classes = ldp_probs.shape[-1]
    seen = seen_mask.to(device=ldp_probs.device, dtype=torch.bool)
    if seen.shape != (num_classes,):
        raise ValueError(f"seen_mask must have shape ({num_classes},), got {tuple(seen.shape)}.")
    dtype = torch.promote_types(ldp_probs.dtype, clip_probs.dtype)
    ldp_probs, clip_probs = ldp_probs.to(dtype), clip_probs.to(dtype)

    if iou_scores is None:
        # filled on the device (torch.tensor(alpha, device=...) would be a blocking host-to-device copy)
        exponent = torch.where(
            seen,
            torch.full((), alpha, dtype=dtype, device=seen.device),
            torch.full((), beta, dtype=dtype, device=seen.device),
        )
    else:
        if iou_scores.shape != ldp_probs.shape[:-1]:
            raise ValueError(
                f"iou_scores must have shape {tuple(ldp_probs.shape[:-1])}, got {tuple(iou_scores.shape)}."
            )
        iou = iou_scores.to(dtype).unsqueeze(-1)
        ldp_probs, clip_probs = ldp_probs * iou, clip_probs * iou
        se_ldp, se_clip = selectivity(ldp_probs), selectivity(clip_probs)
        total = se_clip + se_ldp
        se_conf = torch.where(
            total > 0, se_clip / torch.where(total > 0, total, torch.ones_like(total)), torch.full_like(total, 0.5)
        )
        alpha_hat = (alpha * (1 + se_conf)).clamp(0, 1).unsqueeze(-1)
        beta_hat = (beta * (1 + se_conf)).clamp(0, 1).unsqueeze(-1)
        exponent = torch.where(seen, alpha_hat, beta_hat)
    # pow(0, 0) = 1 and pow(0, e > 0) = 0: no NaN/inf from log(0)
    return ldp_probs.pow(1 - exponent) * clip_probs.pow(exponent)
