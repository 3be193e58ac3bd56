import pytest
import torch

from transformers_possam import mask_aware_selective_ensemble


def mase_by_hand(ldp, clip, iou, seen, alpha, beta):
    """Element-by-element transcription of the rules (paper Algorithm 1 + the clamp), loops only."""
    queries, classes = ldp.shape
    result = torch.zeros(queries, classes, dtype=torch.float64)
    for q in range(queries):
        p_ldp = [float(ldp[q, k]) * (float(iou[q]) if iou is not None else 1.0) for k in range(classes)]
        p_clip = [float(clip[q, k]) * (float(iou[q]) if iou is not None else 1.0) for k in range(classes)]

        def se(values):
            if len(values) == 1:
                return 1.0
            first, second = max(values), sorted(values)[-2]
            return 0.0 if first == 0 else 1 - second / first

        if iou is None:
            a_hat, b_hat = alpha, beta
        else:
            s_ldp, s_clip = se(p_ldp), se(p_clip)
            conf = 0.5 if s_ldp + s_clip == 0 else s_clip / (s_clip + s_ldp)
            a_hat = min(max(alpha * (1 + conf), 0.0), 1.0)
            b_hat = min(max(beta * (1 + conf), 0.0), 1.0)
        for k in range(classes):
            e = a_hat if seen[k] else b_hat
            result[q, k] = p_ldp[k] ** (1 - e) * p_clip[k] ** e
    return result


@pytest.mark.parametrize("use_iou,alpha,beta", [(True, 0.4, 0.8), (False, 0.4, 0.8), (True, 0.3, 0.7)])
def test_mase_matches_transcription(use_iou, alpha, beta):
    generator = torch.Generator().manual_seed(0)
    ldp = torch.rand(7, 5, generator=generator, dtype=torch.float64).softmax(-1)
    clip = torch.rand(7, 5, generator=generator, dtype=torch.float64).softmax(-1)
    ldp[0, 2] = 0.0  # zero probability
    clip[1] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)  # tie -> SE 0
    iou = torch.rand(7, generator=generator, dtype=torch.float64) if use_iou else None
    if use_iou:
        iou[2] = 0.0  # all probabilities 0 for this mask
    seen = torch.tensor([True, False, True, False, False])
    ours = mask_aware_selective_ensemble(ldp, clip, iou, seen, alpha, beta)
    torch.testing.assert_close(ours, mase_by_hand(ldp, clip, iou, seen, alpha, beta))
    assert torch.isfinite(ours).all()


def test_mase_batched_dtypes_and_single_class():
    ldp = torch.rand(2, 3, 4).softmax(-1)
    clip = torch.rand(2, 3, 4).softmax(-1)
    iou = torch.rand(2, 3)
    seen = torch.tensor([True, True, False, False])
    batched = mask_aware_selective_ensemble(ldp, clip, iou, seen)
    for b in range(2):
        torch.testing.assert_close(batched[b], mask_aware_selective_ensemble(ldp[b], clip[b], iou[b], seen))
    half = mask_aware_selective_ensemble(ldp.bfloat16(), clip.bfloat16(), iou.bfloat16(), seen)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    single = mask_aware_selective_ensemble(
        torch.ones(3, 1), torch.ones(3, 1), torch.tensor([0.5, 0.0, 1.0]), torch.tensor([False])
    )
    torch.testing.assert_close(single, torch.tensor([[0.5], [0.0], [1.0]]))
    zeros = mask_aware_selective_ensemble(
        torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.tensor([True, False, True])
    )
    assert torch.equal(zeros, torch.zeros(2, 3))


def test_mase_errors():
    with pytest.raises(ValueError, match="seen_mask"):
        mask_aware_selective_ensemble(torch.rand(2, 3), torch.rand(2, 3), None, torch.tensor([True]))
    with pytest.raises(ValueError, match="iou_scores"):
        mask_aware_selective_ensemble(
            torch.rand(2, 3), torch.rand(2, 3), torch.rand(3), torch.ones(3, dtype=torch.bool)
        )
