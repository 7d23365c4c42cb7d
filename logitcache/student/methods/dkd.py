"""DKD: Zhao et al. (2022), "Decoupled Knowledge Distillation".

KD's KL splits into TCKD, the KL between the binary (target, rest) distributions, and
NCKD, the KL between the distributions over the non-target classes alone (each
renormalised). DKD weighs them apart: `alpha * TCKD + beta * NCKD`, both times T^2 and
averaged over the batch, ramped up linearly from 0 over the first `warmup` epochs (per
step: the factor is min(epochs done / warmup, 1)).

The target class is the label on labeled rows (`Batch.labeled`); on unlabeled rows, whose
labels the student may not use, it is the teacher's most probable class. With several
caches the teachers' softened distributions are averaged first (as KD's `combine: probs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from logitcache.core.schedule import NonNegative, Positive, value_at
from logitcache.student.methods import Method, MethodConfig, Needs, register


class DKDConfig(MethodConfig):
    weight: NonNegative = Field(1.0, description="weight of the DKD term")
    alpha: NonNegative = Field(1.0, description="weight of TCKD (target-class KD)")
    beta: NonNegative = Field(8.0, description="weight of NCKD (non-target-class KD)")
    temperature: Positive = Field(4.0, description="softmax temperature T")
    warmup: float = Field(20.0, ge=0, description="epochs over which the DKD terms ramp up linearly from 0 (0: none)")


def dkd_terms(student: torch.Tensor, teachers: list[torch.Tensor], target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each times T^2 and averaged over the batch; `teachers` averaged as probabilities."""
    p_t = torch.stack([F.softmax(t.float() / temperature, dim=1) for t in teachers]).mean(0)
    log_p_s = F.log_softmax(student.float() / temperature, dim=1)
    is_target = F.one_hot(target, student.shape[1]).bool()
    batch = student.shape[0]

    p_t_target = p_t.gather(1, target[:, None]).squeeze(1)
    log_s_target = log_p_s.gather(1, target[:, None]).squeeze(1)
    log_s_rest = torch.logsumexp(log_p_s.masked_fill(is_target, float("-inf")), dim=1)
    binary_t = torch.stack([p_t_target, 1 - p_t_target], dim=1)
    tckd = F.kl_div(torch.stack([log_s_target, log_s_rest], dim=1), binary_t, reduction="sum") / batch

    rest_t = p_t.masked_fill(is_target, 0) / (1 - p_t_target).clamp_min(1e-12)[:, None]
    log_rest_s = F.log_softmax(student.float().masked_fill(is_target, float("-inf")) / temperature, dim=1)
    nckd = F.kl_div(log_rest_s.masked_fill(is_target, 0), rest_t, reduction="sum") / batch
    return tckd * temperature**2, nckd * temperature**2


@register
class DKD(Method):
    name = "dkd"
    family = "response"
    description = "decoupled KD: target-class (TCKD) and non-target-class (NCKD) KL weighed apart, with warm-up"
    paper = "Zhao et al. 2022"
    Config = DKDConfig

    @classmethod
    def needs(cls, cfg: DKDConfig) -> Needs:
        return Needs(logits=True)

    def forward(self, student, teacher, batch, at):
        t = value_at(self.cfg.temperature, at)
        logits = teacher.logits_at(t)
        teacher_class = torch.stack([F.softmax(x.float() / t, dim=1) for x in logits]).mean(0).argmax(1)
        target = torch.where(batch.labeled > 0, batch.labels, teacher_class)
        tckd, nckd = dkd_terms(student.logits, logits, target, t)
        ramp = min(at.epoch / self.cfg.warmup, 1.0) if self.cfg.warmup > 0 else 1.0
        loss = ramp * (value_at(self.cfg.alpha, at) * tckd + value_at(self.cfg.beta, at) * nckd)
        return loss, {"dkd": loss.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "warmup": ramp}
