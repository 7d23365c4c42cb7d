"""Distillation methods: one small class per mode over the pure losses, plus the FitNets adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from logitcache.student.losses import hint_loss, kd_loss, masked_ce, scheduled


class Adapter(nn.Module):
    """Maps a student feature onto a teacher feature's shape, so the hint loss can compare them.

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


@dataclass
class Targets:
    """What a batch carries for the losses: labels, the labeled mask, teacher logits per cache, teacher features."""

    labels: torch.Tensor
    labeled: torch.Tensor
    logits: list[torch.Tensor]
    features: dict[str, torch.Tensor]


class Method(nn.Module):
    """A distillation mode. Parameters of its submodules (adapters) join the optimiser."""

    uses_logits = False
    uses_features = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def temperature(self, progress: float) -> float:
        c = self.cfg
        return scheduled(c.temperature_schedule, c.temperature, c.temperature_end or c.temperature, progress)

    def alpha(self, progress: float) -> float:
        c = self.cfg
        end = c.alpha if c.alpha_end is None else c.alpha_end
        return scheduled(c.alpha_schedule, c.alpha, end, progress)

    def forward(self, logits, student_feature, targets: Targets, progress: float) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class CE(Method):
    def forward(self, logits, student_feature, targets, progress):
        loss = masked_ce(logits, targets.labels, targets.labeled)
        return loss, {"ce": loss.detach()}


class KD(Method):
    uses_logits = True

    def forward(self, logits, student_feature, targets, progress):
        alpha, t = self.alpha(progress), self.temperature(progress)
        ce = masked_ce(logits, targets.labels, targets.labeled)
        kd = kd_loss(logits, targets.logits, t, self.cfg.combine)
        return alpha * kd + (1 - alpha) * ce, {"ce": ce.detach(), "kd": kd.detach(), "T": t, "alpha": alpha}


class Feature(Method):
    uses_features = True

    def __init__(self, cfg, student_shape, teacher_shape):
        super().__init__(cfg)
        self.adapter = Adapter(student_shape, teacher_shape)

    def hint(self, student_feature, targets):
        teacher = targets.features[self.cfg.teacher_layer]
        return hint_loss(self.adapter(student_feature), teacher, self.cfg.feature_loss)

    def forward(self, logits, student_feature, targets, progress):
        ce = masked_ce(logits, targets.labels, targets.labeled)
        hint = self.hint(student_feature, targets)
        return ce + self.cfg.feature_weight * hint, {"ce": ce.detach(), "hint": hint.detach()}


class KDFeature(Feature):
    uses_logits = True

    def forward(self, logits, student_feature, targets, progress):
        kd_part, parts = KD.forward(self, logits, student_feature, targets, progress)
        hint = self.hint(student_feature, targets)
        return kd_part + self.cfg.feature_weight * hint, {**parts, "hint": hint.detach()}


METHODS: dict[str, type[Method]] = {"ce": CE, "kd": KD, "feature": Feature, "kd+feature": KDFeature}
