"""RKD: Park et al. (2019), "Relational Knowledge Distillation".

On per-sample embeddings (the student node pooled with `embedding`, the teacher's cached
`embedding` form): the distance term compares the pairwise Euclidean distances, each side
divided by the mean of its non-zero distances; the angle term compares the cosines of the
angles every triple of samples forms. Both through the Huber (smooth L1) loss, averaged
over the pairs / triples, as in the paper's code and mdistiller; the loss is
`distance_weight * distance + angle_weight * angle`.

Under torchrun the loss is computed on the global batch (see `_relations`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from logitcache.core.schedule import NonNegative, value_at
from logitcache.student.methods import (
    Method,
    Needs,
    register,
)
from logitcache.student.methods._relations import EmbeddingPairConfig, global_embeddings, single_process_gradient


class RKDConfig(EmbeddingPairConfig):
    weight: NonNegative = Field(1.0, description="weight of the RKD loss (its terms carry their own weights)")
    distance_weight: NonNegative = Field(25.0, description="weight of the distance term")
    angle_weight: NonNegative = Field(50.0, description="weight of the angle term")


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, B) Euclidean distances, 0 on the diagonal (clamped before the root, so the gradient stays finite)."""
    squared = e.pow(2).sum(1)
    d = (squared[:, None] + squared[None, :] - 2 * e @ e.T).clamp_min(eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def distance_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def normalised(e):
        d = pairwise_distances(e)
        return d / d[d > 0].mean()
    return F.smooth_l1_loss(normalised(s), normalised(t))


def angle_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def cosines(e):  # [i, j, k]: cosine of the angle at e_i between e_j and e_k
        unit = F.normalize(e[None, :, :] - e[:, None, :], dim=2)
        return unit @ unit.transpose(1, 2)
    return F.smooth_l1_loss(cosines(s), cosines(t))


@register
class RKD(Method):
    name = "rkd"
    family = "relation"
    description = "relational KD: pairwise distances and triplet angles of the student's embeddings match the teacher's"
    paper = "Park et al. 2019"
    Config = RKDConfig

    @classmethod
    def needs(cls, cfg: RKDConfig) -> Needs:
        return cfg.needs()

    def forward(self, student, teacher, batch, at):
        world = batch.world_size
        s, t = global_embeddings(self.cfg, student, teacher, world)
        distance, angle = distance_loss(s, t), angle_loss(s, t)
        loss = value_at(self.cfg.distance_weight, at) * distance + value_at(self.cfg.angle_weight, at) * angle
        return single_process_gradient(loss, world), {"rkd": loss.detach(), "distance": distance.detach(),
                                                      "angle": angle.detach()}
