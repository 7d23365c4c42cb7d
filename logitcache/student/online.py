"""The reference path (--online): the live teacher computes the targets the cache would hold, on the same inputs."""

from __future__ import annotations

from typing import Callable

import torch

from logitcache.cache.topk import TopK, topk_summary
from logitcache.core.config import StudentConfig
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureExtractor, load_teacher, stored_form
from logitcache.core.preprocess import TeacherInput
from logitcache.core.training import place, to_input
from logitcache.student.methods import TeacherOut
from logitcache.student.plan import CacheInfo, Plan


def online_teacher(cfg: StudentConfig, plan: Plan, device: torch.device) -> Callable[[torch.Tensor], TeacherOut]:
    """The teacher's targets for a batch of uint8 views, rendered with the teacher's own preprocessing and rounded as
    cached (and, for a top-k cache, summarised as cached)."""
    info = plan.cache
    if len(cfg.caches) > 1:
        raise LogitcacheError("--online reproduces a single cache; give one cache in caches:")
    teacher = load_teacher(cfg.teacher)
    if teacher.sha256 != info.teacher_sha256:
        raise LogitcacheError(f"--online teacher {cfg.teacher} is not the checkpoint the cache was made from")
    wanted = plan.needs.teacher
    extractor = place(FeatureExtractor(teacher.model, list(dict.fromkeys(t.layer for t in wanted))), device).eval()
    dtype = getattr(torch, info.logits_dtype)
    teacher_input = _teacher_input(teacher, plan)

    @torch.no_grad()
    def targets(images: torch.Tensor) -> TeacherOut:
        out = extractor(to_input(images, device, teacher_input))
        return TeacherOut([_as_cached(out["logits"].float(), info, dtype)] if plan.needs.logits else [],
                          {t: stored_form(out[t.layer].float(), t.form, info.layers[t.layer]).float() for t in wanted})

    return targets


def _teacher_input(teacher, plan: Plan):
    """The teacher's input step for the student's rendered views: box views are already at the teacher's side
    (only its normalisation is left), pad-and-crop views go through its whole preprocessing."""
    if not plan.cache.spec.boxes:
        return teacher.input_for(plan.train)
    pre = teacher.preprocess_for(plan.train)
    if plan.view.box.size != pre.crop:
        raise LogitcacheError(f"--online renders one view for student and teacher: image_size {plan.view.box.size} "
                              f"differs from the teacher's input side {pre.crop}; remove image_size to check a run "
                              "against the live teacher")
    return TeacherInput(pre.at_size(), plan.train.channels)


def _as_cached(logits: torch.Tensor, info: CacheInfo, dtype: torch.dtype) -> torch.Tensor | TopK:
    """Float32 logits as the cache holds them: rounded to its dtype, or summarised as the dump summarises them
    (from the float32 logits, the values then rounded)."""
    if not info.topk:
        return logits.to(dtype).float()
    top = topk_summary(logits, info.topk, info.topk_temperatures)
    return TopK(top.values.to(dtype).float(), top.indices, top.rest, top.temperatures, top.num_classes)
