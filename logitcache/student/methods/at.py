"""AT: Zagoruyko & Komodakis (2017), "Paying More Attention to Attention".

For each (student node, teacher layer) pair, the student's attention map (channel-mean of
|f|^p, flattened, L2-normalised: `attention_map`, as the cache computes the teacher's) is
compared with the cached teacher `attention` form: the squared difference averaged over
the batch and the map's positions, summed over the pairs (as the paper's code and
mdistiller do, which the default weight 1000 assumes).

The cache holds the teacher's map at its full resolution only, so the student's feature
map is brought to the teacher's size before its attention is taken: average-pooled when
larger (as mdistiller does), bilinearly interpolated when smaller.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from logitcache.core.errors import LogitcacheError
from logitcache.core.features import attention_map
from logitcache.core.schedule import NonNegative
from logitcache.student.methods import (
    Method,
    MethodConfig,
    Needs,
    TeacherInput,
    register,
)


class ATConfig(MethodConfig):
    weight: NonNegative = Field(1000.0, description="weight of the attention term (beta)")
    pairs: list[tuple[str, str]] = Field(
        min_length=1, description="[student node, cached teacher layer] pairs; the teacher layer needs the "
        "attention form in the cache", json_schema_extra={"example": [["block2", "layer2"]]})
    p: float = Field(2.0, gt=0, description="exponent of |f|^p; the same as the cache's attention form")


def resize_map(f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B, C, H, W) map at `size`: average-pooled when larger, bilinearly interpolated when smaller."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    if f.shape[-2] >= size[0] and f.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


def spatial_size(shape: tuple[int, ...], where: str) -> tuple[int, int]:
    """The (H, W) of a stored attention map: (H, W) as stored, or the side of a flattened square."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    side = math.isqrt(int(shape[0]))
    if side * side != shape[0]:
        raise LogitcacheError(f"{where}: the cached attention map has {shape[0]} positions, not a square; "
                              "AT needs square maps")
    return side, side


@register
class AT(Method):
    name = "at"
    family = "feature"
    description = "attention transfer: student attention maps regress the cached teacher attention maps"
    paper = "Zagoruyko & Komodakis 2017"
    Config = ATConfig

    @classmethod
    def needs(cls, cfg: ATConfig) -> Needs:
        return Needs(teacher=[TeacherInput(t, "attention") for _, t in cfg.pairs], student=[s for s, _ in cfg.pairs])

    def __init__(self, cfg: ATConfig, ctx):
        super().__init__(cfg, ctx)
        for s, _ in cfg.pairs:
            if len(ctx.student_shapes[s]) != 3:
                raise LogitcacheError(f"at: student node {s!r} gives shape {ctx.student_shapes[s]}, not a feature map; "
                                      "pick a convolutional node (logitcache layers MODEL)")
        self.sizes = [spatial_size(ctx.teacher_shapes[TeacherInput(t, "attention")], f"at: teacher layer {t!r}")
                      for _, t in cfg.pairs]

    def forward(self, student, teacher, batch, at):
        terms = {}
        for (s, t), size in zip(self.cfg.pairs, self.sizes):
            a_s = attention_map(resize_map(student.features[s].float(), size), self.cfg.p)
            a_t = teacher.features[TeacherInput(t, "attention")].float().flatten(1)
            terms[f"{s}->{t}"] = (a_s - a_t).pow(2).mean()
        loss = torch.stack(list(terms.values())).sum()
        return loss, {"at": loss.detach(), **({k: v.detach() for k, v in terms.items()} if len(terms) > 1 else {})}
