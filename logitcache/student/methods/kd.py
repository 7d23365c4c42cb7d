"""KD: Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over the batch. With several caches,
`combine: probs` averages the teachers' softened distributions before the KL, `kl`
averages the KL terms. Hinton's alpha is this method's `weight`, with `ce_weight` = 1 - alpha.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from logitcache.core.schedule import NonNegative, Positive, value_at
from logitcache.student.methods import Method, MethodConfig, Needs, register


class KDConfig(MethodConfig):
    weight: NonNegative = Field(0.9, description="alpha: weight of the KD term (set ce_weight to 1 - alpha)")
    temperature: Positive = Field(4.0, description="softmax temperature T; a schedule such as "
                                   "{start: 8, kind: step, every: 2, factor: 0.5} halves it every 2 epochs")
    combine: Literal["probs", "kl"] = Field("probs", description="several caches: average the softened "
                                            "distributions (probs) or the KL terms (kl)")


def kd_loss(student: torch.Tensor, teachers: list[torch.Tensor], temperature: float,
            combine: str = "probs") -> torch.Tensor:
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_ts = [F.log_softmax(t.float() / temperature, dim=1) for t in teachers]
    if combine == "probs" and len(log_ts) > 1:
        log_ts = [torch.logsumexp(torch.stack(log_ts), dim=0) - math.log(len(log_ts))]
    kls = [F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") for log_t in log_ts]
    return torch.stack(kls).mean() * temperature**2


@register
class KD(Method):
    name = "kd"
    family = "response"
    description = "KL divergence between the softened teacher and student distributions, times T^2"
    paper = "Hinton et al. 2015"
    Config = KDConfig

    @classmethod
    def needs(cls, cfg: KDConfig) -> Needs:
        return Needs(logits=True)

    def forward(self, student, teacher, batch, at):
        t = value_at(self.cfg.temperature, at)
        loss = kd_loss(student.logits, teacher.logits_at(t), t, self.cfg.combine)
        return loss, {"kd": loss.detach(), "temperature": t}
