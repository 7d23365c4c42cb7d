"""SP: Tung & Mori (2019), "Similarity-Preserving Knowledge Distillation".

For each (student node, teacher layer) pair, the batch Gram matrices G = F F^T of the
flattened features, each row L2-normalised, are compared: ||G_t - G_s||_F^2 / b^2, summed
over the pairs (as the paper and mdistiller). The teacher side is the cached `map` form by
default (pooled to `dump.layers.pool` when the dump bounded it, which changes the Gram
matrix from the full map's), or the globally pooled `embedding` form; the student side takes
the same form, so with `embedding` the student's map is globally average-pooled too (as RKD,
PKT and CRD pool it) and both Gram matrices are of pooled vectors.

Under torchrun the loss is computed on the global batch (see `_relations`), as one
process would.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from logitcache.core.features import embedding
from logitcache.core.schedule import NonNegative
from logitcache.student.methods import (
    Method,
    MethodConfig,
    Needs,
    TeacherInput,
    register,
)
from logitcache.student.methods._relations import gather_batch, single_process_gradient


class SPConfig(MethodConfig):
    weight: NonNegative = Field(3000.0, description="weight of the similarity term (gamma)")
    pairs: list[tuple[str, str]] = Field(
        min_length=1, description="[student node, cached teacher layer] pairs (logitcache layers MODEL)",
        json_schema_extra={"example": [["block3", "layer3"]]})
    form: Literal["map", "embedding"] = Field("map", description="which cached form of the teacher layers to compare")


def similarity_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """||normalize(G_t) - normalize(G_s)||_F^2 / b^2 of the flattened features' batch Gram matrices."""
    s, t = f_s.float().flatten(1), f_t.float().flatten(1)
    g_s, g_t = F.normalize(s @ s.T, dim=1), F.normalize(t @ t.T, dim=1)
    return (g_t - g_s).pow(2).sum() / s.shape[0] ** 2


@register
class SP(Method):
    name = "sp"
    family = "relation"
    description = "similarity-preserving: the student's batch similarity (Gram) matrices match the teacher's"
    paper = "Tung & Mori 2019"
    Config = SPConfig

    @classmethod
    def needs(cls, cfg: SPConfig) -> Needs:
        return Needs(teacher=[TeacherInput(t, cfg.form) for _, t in cfg.pairs], student=[s for s, _ in cfg.pairs])

    def student_side(self, feature: torch.Tensor) -> torch.Tensor:
        """The student feature in the teacher's form: the map as it is, or pooled for `embedding`."""
        return embedding(feature.float()) if self.cfg.form == "embedding" else feature

    def forward(self, student, teacher, batch, at):
        world = batch.world_size
        terms = {f"{s}->{t}": similarity_loss(gather_batch(self.student_side(student.features[s]), world),
                                              gather_batch(teacher.features[TeacherInput(t, self.cfg.form)], world))
                 for s, t in self.cfg.pairs}
        loss = single_process_gradient(torch.stack(list(terms.values())).sum(), world)
        return loss, {"sp": loss.detach(), **({k: v.detach() for k, v in terms.items()} if len(terms) > 1 else {})}
