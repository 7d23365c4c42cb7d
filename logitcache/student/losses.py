"""Pure loss functions and schedules for distillation: tensors in, tensors out, no state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor], temperature: float,
            combine: str = "probs") -> torch.Tensor:
    """Hinton KD: KL(softmax(t/T) || softmax(s/T)) * T^2, averaged over the batch.

    Several teachers: `probs` averages their softened distributions before the KL,
    `kl` averages the KL terms.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_ts = [F.log_softmax(t.float() / temperature, dim=1) for t in teacher_logits]
    if combine == "probs" and len(log_ts) > 1:
        log_ts = [torch.logsumexp(torch.stack(log_ts), dim=0) - math.log(len(log_ts))]
    kls = [F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") for log_t in log_ts]
    return torch.stack(kls).mean() * temperature**2


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, labeled: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labeled rows only (0 when a batch has none), without a host sync."""
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_row * labeled).sum() / labeled.sum().clamp(min=1)


def hint_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """FitNets hint between the adapted student feature and the teacher's: mse, normalized_mse or cosine."""
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "normalized_mse":
        return F.mse_loss(F.normalize(s, dim=1), F.normalize(t, dim=1)) * s.shape[1]
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()


def scheduled(kind: str, start: float, end: float, progress: float, step_at: float = 0.5) -> float:
    """A value moving from `start` to `end` as training progresses from 0 to 1."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return start
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2
    return start if progress < step_at else end
