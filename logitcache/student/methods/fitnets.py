"""FitNets hints: Romero et al. (2015), "FitNets: Hints for Thin Deep Nets".

Each (student node, teacher layer) pair maps the student's feature through a learnable
adapter (1x1 conv + BN for maps, resized to the teacher's side; linear for vectors) and
compares it with the cached teacher map. The loss is the mean over pairs. The student's feature
enters the adapter in float32, as every method takes its inputs: under CUDA autocast the
adapter then runs in autocast's precision like the student, never on a half-precision copy
of the feature mixed with float32 weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from logitcache.core.schedule import NonNegative
from logitcache.student.methods import Method, MethodConfig, Needs, TeacherInput, register


class FitNetsConfig(MethodConfig):
    weight: NonNegative = Field(1.0, description="weight of the hint term")
    pairs: list[tuple[str, str]] = Field(
        min_length=1, description="[student node, cached teacher layer] pairs (logitcache layers MODEL)",
        json_schema_extra={"example": [["block2", "layer2"]]})
    distance: Literal["mse", "normalized_mse", "cosine"] = Field(
        "mse", description="mse; normalized_mse (of L2-normalised features, times their size); cosine (1 - cos)")


class Adapter(nn.Module):
    """Maps a student feature onto a teacher feature's shape.

    Maps to maps: 1x1 conv + BN, then spatial resize. Vectors: linear. A map to a vector
    pools first; a vector to a map is projected and reshaped.
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        self.teacher_shape = tuple(teacher_shape)
        cs, ct = student_shape[0], teacher_shape[0]
        if len(student_shape) == 3 and len(teacher_shape) == 3:
            self.proj = nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct))
        else:
            self.proj = nn.Linear(cs, int(torch.tensor(teacher_shape).prod()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Linear):
            if x.dim() == 4:
                x = x.mean(dim=(2, 3))
            return self.proj(x.flatten(1)).view(-1, *self.teacher_shape)
        x = self.proj(x)
        if x.shape[-2:] != self.teacher_shape[-2:]:
            x = F.adaptive_avg_pool2d(x, self.teacher_shape[-2:]) if x.shape[-1] > self.teacher_shape[-1] \
                else F.interpolate(x, size=self.teacher_shape[-2:], mode="bilinear", align_corners=False)
        return x


def hint_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    s, t = student.float().flatten(1), teacher.float().flatten(1)
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "normalized_mse":
        return F.mse_loss(F.normalize(s, dim=1), F.normalize(t, dim=1)) * s.shape[1]
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()


@register
class FitNets(Method):
    name = "fitnets"
    family = "feature"
    description = "hint: an adapted student feature map regresses the cached teacher map"
    paper = "Romero et al. 2015"
    Config = FitNetsConfig

    @classmethod
    def needs(cls, cfg: FitNetsConfig) -> Needs:
        return Needs(teacher=[TeacherInput(t, "map") for _, t in cfg.pairs], student=[s for s, _ in cfg.pairs])

    def __init__(self, cfg: FitNetsConfig, ctx):
        super().__init__(cfg, ctx)
        self.adapters = nn.ModuleList(Adapter(ctx.student_shapes[s], ctx.teacher_shapes[TeacherInput(t, "map")])
                                      for s, t in cfg.pairs)

    def forward(self, student, teacher, batch, at):
        terms = {}
        for (s, t), adapter in zip(self.cfg.pairs, self.adapters):
            terms[f"{s}->{t}"] = hint_distance(adapter(student.features[s].float()), teacher.features[TeacherInput(t, "map")],
                                               self.cfg.distance)
        loss = torch.stack(list(terms.values())).mean()
        return loss, {"hint": loss.detach(), **({k: v.detach() for k, v in terms.items()} if len(terms) > 1 else {})}
