"""The reference path (--online): the live teacher computes the targets the cache would hold, on the same inputs."""

from __future__ import annotations

from typing import Callable

import torch

from logitcache.core.config import StudentConfig
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureTaker, load_teacher, stored_form
from logitcache.core.training import place
from logitcache.student.methods import TeacherOut
from logitcache.student.plan import Plan


def online_teacher(cfg: StudentConfig, plan: Plan, device: torch.device) -> Callable[[torch.Tensor], TeacherOut]:
    """The teacher's targets for a batch of inputs, rounded as cached."""
    info = plan.cache
    if len(cfg.caches) > 1 or info.topk:
        raise LogitcacheError("--online reproduces a single full-logit cache; use one cache without topk")
    teacher = load_teacher(cfg.teacher)
    if teacher.sha256 != info.teacher_sha256:
        raise LogitcacheError(f"--online teacher {cfg.teacher} is not the checkpoint the cache was made from")
    wanted = plan.needs.teacher
    extractor = place(FeatureTaker(teacher.model, list(dict.fromkeys(t.layer for t in wanted))), device).eval()
    dtype = getattr(torch, info.logits_dtype)

    @torch.no_grad()
    def targets(x: torch.Tensor) -> TeacherOut:
        out = extractor(x)
        return TeacherOut([out["logits"].float().to(dtype).float()] if plan.needs.logits else [],
                          {t: stored_form(out[t.layer].float(), t.form, info.layers[t.layer]).float() for t in wanted})

    return targets
