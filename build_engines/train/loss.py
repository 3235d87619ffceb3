"""The distillation loss: hard labels where the data has them, the teacher's soft targets everywhere.

Held-out classes are never labeled, so the soft targets are what keeps them from being forgotten.
"""
import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher_probs_tau: torch.Tensor, labels: torch.Tensor | None,
                      alpha: float, tau: float) -> torch.Tensor:
    """alpha * CE(y, S) + (1 - alpha) * tau^2 * KL(softmax(T/tau) || softmax(S/tau)).

    ``teacher_probs_tau``: softmax(T/tau), already mixed for mixup/cutmix (so targets can be cached).
    ``labels``: [N, 1000] soft one-hot (mixed) with all-zero rows for unlabeled images, or None.
    The CE term is averaged over labeled rows only; with none, the teacher term alone."""
    log_s = F.log_softmax(student / tau, dim=1)
    p = teacher_probs_tau.clamp_min(1e-12)
    kl = (p * (p.log() - log_s)).sum(1).mean()
    loss = (1.0 - alpha) * tau * tau * kl
    if labels is not None:
        has = labels.sum(1) > 0
        if has.any():
            ce = -(labels[has] * F.log_softmax(student[has], dim=1)).sum(1).mean()
            loss = loss + alpha * ce
    return loss
