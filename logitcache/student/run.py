"""One student run, top to bottom: plan it, build its parts, train evaluation by evaluation, then score and save.

`train_one` is the whole flow. `Run.build` checks the inputs (`plan_run`) and assembles the learner, the
batches, the optimiser and the checkpointing; `Run.train_until_evaluation` trains the steps up to the next
evaluation; `finish` scores the selected weights on the test split and writes the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from logitcache.core import provenance
from logitcache.core.config import Params, StudentConfig, save_config
from logitcache.core.distributed import Dist
from logitcache.core.io import save_checkpoint, write_json
from logitcache.core.models import layer_channels
from logitcache.core.preprocess import model_input
from logitcache.core.training import (
    Checkpointer,
    Selector,
    data_parallel,
    fit,
    make_loader,
    make_optimizer,
    per_rank_batch,
    seed_epoch,
    seed_everything,
    select_device,
    train_steps,
    validation_scorer,
)
from logitcache.student.batches import StepStream, StudentBatches
from logitcache.student.checks import origin
from logitcache.student.evaluate import evaluate_model
from logitcache.student.learner import Learner, Stepper, build_learner
from logitcache.student.online import online_teacher
from logitcache.student.plan import Plan, mode_name, plan_run
from logitcache.student.resume import cache_identities, finished_run, run_settings
from logitcache.student.sources import make_batches


@dataclass(frozen=True)
class Job:
    """Which student to train, with which (seed's) settings, into which folder, and how."""

    params: Params
    cfg: StudentConfig
    name: str
    out: Path
    resume: bool = False
    dist: Dist = field(default_factory=Dist.single)
    bar: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.cfg.seed}" if self.cfg.seeds else self.name


@dataclass(frozen=True)
class Budget:
    """A run's length in optimizer steps, cut into evenly spaced evaluations (validation score, checkpoint)."""

    total: int
    every: int

    @classmethod
    def of(cls, cfg: StudentConfig, steps_per_pass: int) -> "Budget":
        total = cfg.steps or cfg.epochs * steps_per_pass
        return cls(total, -(-total // cfg.evaluations) if cfg.evaluations else steps_per_pass)

    @property
    def evaluations(self) -> int:
        return -(-self.total // self.every)

    def steps_of(self, evaluation: int) -> tuple[int, int]:
        """The global steps [start, stop) trained before evaluation number `evaluation` (from 0)."""
        return evaluation * self.every, min(self.total, (evaluation + 1) * self.every)


def train_one(params: Params, cfg: StudentConfig, name: str, out: Path, *, resume: bool = False,
              dist: Dist = Dist.single(), bar: bool = True) -> dict:
    """Train one seed of student NAME into `out`; its metrics on rank 0, {} on the others."""
    job = Job(params, cfg, name, out, resume, dist, bar)
    if resume and (done := finished_run(out, run_settings(params, cfg, name), cfg)) is not None:
        if dist.is_main:
            print(f"{name} seed {cfg.seed} already finished, kept ({out})", flush=True)
        return done if dist.is_main else {}
    run = Run.build(job)
    try:
        history = fit(run.budget.evaluations, run.train_until_evaluation, run.checkpointer, resume,
                      unit="evaluation")
    finally:
        run.batches.close()
    return finish(run, history)


@dataclass
class Run:
    """A student run's parts, built once its inputs are checked."""

    job: Job
    plan: Plan
    device: torch.device
    config: dict  # the settings and cache identities recorded in resume.pt and student.pt
    student: nn.Module
    learner: Learner
    batches: StudentBatches
    stream: StepStream
    loader: torch.utils.data.DataLoader
    budget: Budget
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    model: nn.Module  # the learner, wrapped in DDP under torchrun
    selector: Selector
    checkpointer: Checkpointer
    stepper: Stepper

    @classmethod
    def build(cls, job: Job) -> "Run":
        cfg, dist = job.cfg, job.dist
        device = select_device(cfg.device, dist)
        per_rank_batch(cfg.batch_size, dist)  # refuse a batch that does not split evenly over the ranks
        seed_everything(cfg.seed)
        plan = plan_run(job.params, cfg, job.name)
        config = {**run_settings(job.params, cfg, job.name), "caches": cache_identities(cfg)}
        student, learner = build_learner(plan, cfg, device)
        batches, passes = make_batches(cfg, plan, dist)
        budget = Budget.of(cfg, len(passes))
        stream = StepStream(passes)
        loader = make_loader(batches, None, shuffle=False, seed=cfg.seed, workers=cfg.workers, device=device,
                             sampler=stream)
        optimizer, scheduler = make_optimizer(learner.parameters(), cfg, budget.total)
        model = data_parallel(learner, device, dist)
        teacher_for = online_teacher(cfg, plan, device) if cfg.online and plan.methods else None
        selector = Selector(learner, cfg.select, validation_scorer(student, plan.train, plan.validation, device,
                                                                   model_input(plan.view.info, plan.train)))
        checkpointer = Checkpointer(job.out, [job.out / "student.pt", Path(cfg.out) / "metrics.json"],
                                    {**config, "world_size": dist.world_size},
                                    {"learner": learner, "optimizer": optimizer, "scheduler": scheduler,
                                     "selector": selector}, dist)
        stepper = Stepper(model, plan, device, dist, teacher_for, steps_per_pass=len(passes), total=budget.total)
        return cls(job, plan, device, config, student, learner, batches, stream, loader, budget, optimizer,
                   scheduler, model, selector, checkpointer, stepper)

    def train_until_evaluation(self, evaluation: int) -> dict:
        """Train the steps before evaluation number `evaluation` (from 0), then score the validation split."""
        cfg, dist, budget = self.job.cfg, self.job.dist, self.budget
        start, stop = budget.steps_of(evaluation)
        seed_epoch(cfg.seed, dist.rank, evaluation, self.loader.generator)
        self.stream.select(start, stop)
        self.stepper.step = start
        stats = train_steps(self.model, self.loader, self.stepper, self.optimizer, self.scheduler, first_step=start,
                            desc=f"{self.job.label} {evaluation + 1}/{budget.evaluations}", dist=dist, bar=self.job.bar)
        stats = {"evaluation": evaluation + 1, "steps": stop, "epoch": stop / len(self.stream.passes), **stats}
        if dist.is_main:
            scored = self.selector.evaluate(evaluation + 1, stats)
            print(f"{self.job.label} step {stop:,}/{budget.total:,} (epoch {stats['epoch']:.2f}): loss "
                  f"{stats['train_loss']:.4f} train acc {stats['train_acc']:.4f} {scored} ({stats['seconds']:.1f} s)",
                  flush=True)
        return stats


def finish(run: Run, history: list[dict]) -> dict:
    """Rank 0 takes the selected weights, scores them on the test split (its only read of it) and writes metrics,
    history, config and the checkpoint (last)."""
    dist = run.job.dist
    if not dist.is_main:
        dist.barrier()
        return {}
    metrics = _final_metrics(run, history)
    _write_outputs(run, metrics, history)
    run.checkpointer.discard()  # the checkpoint, written last, marks the run finished
    dist.barrier()
    return metrics


def _final_metrics(run: Run, history: list[dict]) -> dict:
    cfg, dist = run.job.cfg, run.job.dist
    selected = run.selector.restore()
    metrics = evaluate_model(run.student, run.job.params.data, run.device, cfg.test_cache,
                             confusion=run.job.out / "confusion.json", view_info=run.plan.view.info,
                             timed=cfg.latency)
    seconds = sum(h["seconds"] for h in history)
    metrics.update(selected, selected_step=history[selected["selected"] - 1]["steps"], mode=mode_name(cfg),
                   labeled=int(run.plan.labeled.sum()), online=cfg.online, world_size=dist.world_size,
                   steps=history[-1]["steps"], samples=sum(h["samples"] for h in history),
                   threads=torch.get_num_threads(), train_seconds=seconds,
                   seconds_per_epoch=seconds / history[-1]["epoch"],
                   **{provenance.KEY: provenance.environment(run.device).as_dict()})
    metrics.update(origin(run.plan.train, run.plan.cache.teacher_sha256 if run.plan.cache else None,
                          run.config["caches"]))
    return metrics


def _write_outputs(run: Run, metrics: dict, history: list[dict]) -> None:
    """metrics.json, history.json, config.json, then student.pt (its presence means the run finished)."""
    job, train = run.job, run.plan.train
    write_json(job.out / "metrics.json", metrics)
    write_json(job.out / "history.json", history)
    save_config({"data": job.params.data, "student": job.cfg}, job.out / "config.json")
    adapters = {f"{name}.{key}": value for name, method in run.learner.methods.items()
                for key, value in method.learned_state().items()}
    save_checkpoint(job.out / "student.pt", _cpu(run.student.state_dict()), run.config, adapters=_cpu(adapters),
                    teacher_sha256=run.plan.cache.teacher_sha256 if run.plan.cache else None,  # evaluate checks it
                    model_info={"model": job.cfg.model, "in_channels": train.channels,
                                "num_classes": train.num_classes, **run.plan.view.info,
                                **({"channels": layer_channels(run.student)} if job.cfg.init else {})})


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}
