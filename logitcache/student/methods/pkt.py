"""PKT: Passalis & Tefas (2018), "Learning Deep Representations with Probabilistic Knowledge Transfer".

On per-sample embeddings (as RKD: the student node pooled with `embedding`, the teacher's
cached `embedding` form), the cosine-similarity kernel K = (cos + 1) / 2 of every pair is
turned into conditional probabilities p(j | i) = K_ij / sum_j K_ij, and the loss is the
KL divergence of the student's from the teacher's, averaged over all (i, j) entries as in
the paper's code and mdistiller (whose weight, 30000, is the default).

Under torchrun the loss is computed on the global batch (see `_relations`).
"""

from __future__ import annotations

import torch
from pydantic import Field

from logitcache.core.schedule import NonNegative
from logitcache.student.methods import (
    Method,
    Needs,
    register,
)
from logitcache.student.methods._relations import EmbeddingPairConfig, global_embeddings, single_process_gradient

EPS = 1e-7


class PKTConfig(EmbeddingPairConfig):
    weight: NonNegative = Field(30000.0, description="weight of the probabilistic transfer term")


def conditional_probabilities(e: torch.Tensor) -> torch.Tensor:
    """p(j | i) from the cosine kernel (cos(e_i, e_j) + 1) / 2, each row summing to 1."""
    unit = e / (e.norm(dim=1, keepdim=True) + EPS)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p_s, p_t = conditional_probabilities(s), conditional_probabilities(t)
    return (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()


@register
class PKT(Method):
    name = "pkt"
    family = "relation"
    description = "probabilistic knowledge transfer: KL between cosine-kernel conditional probabilities"
    paper = "Passalis & Tefas 2018"
    Config = PKTConfig

    @classmethod
    def needs(cls, cfg: PKTConfig) -> Needs:
        return cfg.needs()

    def forward(self, student, teacher, batch, at):
        world = batch.world_size
        s, t = global_embeddings(self.cfg, student, teacher, world)
        loss = pkt_loss(s, t)
        return single_process_gradient(loss, world), {"pkt": loss.detach()}
