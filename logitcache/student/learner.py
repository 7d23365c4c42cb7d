"""The learner (student plus methods as one module) and one training step's forward."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from logitcache.cache.format import form_dataset
from logitcache.cache.reader import Cache
from logitcache.core.config import StudentConfig
from logitcache.core.data import Split
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_model
from logitcache.core.models import build_model, feature_extractor, feature_nodes
from logitcache.core.schedule import Progress, value_at
from logitcache.core.training import StepOut, autocast, place, to_input
from logitcache.core.preprocess import EvalBox
from logitcache.student.batches import TrainBatch
from logitcache.student.losses import masked_ce
from logitcache.student.methods import Batch, Context, Method, StudentOut, TeacherInput, TeacherOut, methods
from logitcache.student.plan import Plan


class Learner(nn.Module):
    """Student and methods (adapters, heads) as one module, so DDP averages the gradients of both.

    The loss is `ce_weight * CE(labeled rows) + sum(weight * method loss)`; every named term
    is returned for the per-evaluation curves.
    """

    def __init__(self, extractor: nn.Module, methods: dict[str, Method], cfg: StudentConfig):
        super().__init__()
        self.extractor, self.methods, self.cfg = extractor, nn.ModuleDict(methods), cfg

    def forward(self, x: torch.Tensor, teacher: TeacherOut, batch: Batch, progress: Progress):
        out = self.extractor(x)
        student = StudentOut(out["logits"].float(), {k: v for k, v in out.items() if k != "logits"})
        ce = masked_ce(student.logits, batch.labels, batch.labeled)
        total = value_at(self.cfg.ce_weight, progress) * ce
        terms: dict = {"ce": ce.detach()}
        for name, method in self.methods.items():
            loss, parts = method(student, teacher, batch, progress)
            total = total + value_at(method.cfg.weight, progress) * loss
            terms.update({(name if key == name else f"{name}.{key}"): value for key, value in parts.items()})
        return total, student.logits, terms


def build_learner(plan: Plan, cfg: StudentConfig, device: torch.device) -> tuple[nn.Module, Learner]:
    """The student (with the nodes the methods read exposed) and each method sized from the real shapes."""
    train = plan.train
    student = initial_model(cfg, train)
    nodes = feature_nodes(student)
    unknown = [s for s in plan.needs.student if s not in nodes]
    if unknown:
        raise LogitcacheError(f"unknown student layer(s) {', '.join(map(repr, unknown))} for {cfg.model}; "
                              f"valid names: {', '.join(nodes)}")
    extractor = place(feature_extractor(student, {nodes[-1]: "logits", **{s: s for s in plan.needs.student}}),
                      device)
    with torch.no_grad():
        probe = extractor.eval()(plan.view.normalizer()(_probe(plan).to(device)))
    ctx = Context(num_classes=train.num_classes, num_samples=len(train),
                  student_shapes={s: tuple(probe[s].shape[1:]) for s in plan.needs.student},
                  teacher_shapes=plan.cache.shapes if plan.cache else {},
                  banks={b: _bank(cfg.caches[0], b).to(device) for b in plan.needs.banks},
                  train_rows=torch.from_numpy(np.unique(plan.rows)))
    chosen = {name: methods()[name](c, ctx) for name, c in plan.methods.items()}
    return student, Learner(extractor, chosen, cfg).to(device)


def initial_model(cfg: StudentConfig, train: Split) -> nn.Module:
    """A freshly initialised `model`, or the weights and (pruned) architecture of the `init` checkpoint."""
    if not cfg.init:
        return build_model(cfg.model, train.channels, train.num_classes)
    model, ckpt = load_model(cfg.init)
    info = ckpt["model_info"]
    if (info["model"], info["in_channels"], info["num_classes"]) != (cfg.model, train.channels, train.num_classes):
        raise LogitcacheError(f"init checkpoint {cfg.init} holds {info['model']} for {info['in_channels']} channel(s) "
                              f"and {info['num_classes']} classes, the student is {cfg.model} for {train.channels} and "
                              f"{train.num_classes}; set model: {info['model']} or give another init")
    return model


def _probe(plan: Plan) -> torch.Tensor:
    """Two training images at the student's input size (their evaluation view when views are boxes)."""
    train = plan.train
    if plan.view.box is None:
        return train.images[:2]
    render = EvalBox(plan.view.box)
    return torch.stack([render(train.read(i)) for i in range(min(2, len(train)))])


def _bank(path: str, source: TeacherInput) -> torch.Tensor:
    """Every sample's cached value of a teacher layer, under its evaluation view (view 0)."""
    with Cache(path) as cache:
        return torch.from_numpy(cache.read(form_dataset(source.layer, source.form), (slice(None), 0))).float()


class Stepper:
    """One training step's forward: the batch's targets (cached, or from the live teacher), then the learner.

    `step` is the run's global step of the next batch; the run sets it at the start of every evaluation's steps.
    """

    def __init__(self, model: nn.Module, plan: Plan, device: torch.device, dist: Dist,
                 teacher_for: Callable[[torch.Tensor], TeacherOut] | None, *, steps_per_pass: int, total: int):
        self.model, self.device, self.dist, self.teacher_for = model, device, dist, teacher_for
        self.prepare = plan.view.normalizer()
        self.steps_per_pass, self.total = steps_per_pass, total
        self.step = 0

    def progress(self, step: int) -> Progress:
        return Progress(step / max(1, self.total - 1), step / self.steps_per_pass)

    def __call__(self, batch: TrainBatch) -> StepOut:
        progress, self.step = self.progress(self.step), self.step + 1
        x = to_input(batch.images, self.device, self.prepare)
        if self.teacher_for is not None:
            teacher = self.teacher_for(batch.images)  # the teacher renders its own input from the same view
        else:
            teacher = TeacherOut([t.to(self.device) for t in batch.logits],
                                 {key: v.to(self.device) for key, v in batch.features.items()})
        info = Batch(batch.labels.to(self.device), batch.labeled.to(self.device), batch.rows.to(self.device),
                     self.dist.world_size)
        with autocast(self.device):
            loss, logits, terms = self.model(x, teacher, info, progress)
        return StepOut(loss, logits, info.labels, terms)
