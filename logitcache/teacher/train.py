"""Supervised teacher training: the expensive model that the cache is made from.

`train_teacher` reads top to bottom: build the run (`TeacherRun.build`), train epoch by epoch
(`TeacherRun.train_epoch`, one `train_steps` over the loader), then score the selected weights on the test split (`score_split`, as the
students are scored) and write the outputs (`_write_outputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from logitcache.core import provenance
from logitcache.core.config import Params, TeacherConfig, save_config
from logitcache.core.data import IndexedDataset, Split, check_prepared, holdout, load_split
from logitcache.core.distributed import Dist
from logitcache.core.io import check_output_folder, output_lock, save_checkpoint, write_confusion, write_json
from logitcache.core.training import (
    Checkpointer,
    Scored,
    Selector,
    StepOut,
    autocast,
    data_parallel,
    fit,
    make_loader,
    make_optimizer,
    per_rank_batch,
    place,
    score_split,
    seed_epoch,
    seed_everything,
    select_device,
    to_input,
    train_steps,
    validation_scorer,
)
from logitcache.core.errors import LogitcacheError
from logitcache.core.preprocess import TeacherInput, preprocess_input
from logitcache.core.views import ViewSpec
from logitcache.teacher.init import Start, initial_teacher

CHECKPOINT = "teacher.pt"


def train_teacher(params: Params, *, resume: bool = False, dist: Dist = Dist.single()) -> dict:
    """Train `params.teacher.model` on the prepared training split; write checkpoint, metrics and config.

    Under torchrun each rank trains on its part of every global batch (DDP); rank 0 writes.
    """
    with output_lock(params.teacher.out, "train-teacher", hold=dist.is_main):
        return _train_teacher(params, resume, dist)


def _train_teacher(params: Params, resume: bool, dist: Dist) -> dict:
    check_output_folder(Path(params.teacher.out), "teacher.out")
    check_prepared(params.data)  # both splits, before the first step
    run = TeacherRun.build(params, dist)
    history = fit(run.cfg.epochs, run.train_epoch, run.checkpointer, resume)
    if not dist.is_main:
        return {}
    selected = run.selector.restore()
    test = load_split(params.data, "test")
    scored = score_split(run.model, test, run.device, preprocess_input(run.start.preprocess, test))  # once
    metrics = {**scored.accuracy(), **selected, "params": sum(p.numel() for p in run.model.parameters()),
               "steps": run.cfg.epochs * len(run.loader), "train_seconds": sum(h["seconds"] for h in history),
               "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history), "device": run.device.type,
               "world_size": dist.world_size, **({"init_val_acc": history[0].get("init_val_acc")} if run.cfg.init else {}),
               provenance.KEY: provenance.environment(run.device).as_dict()}
    _write_outputs(run, metrics, scored, history)
    run.checkpointer.discard()
    return metrics


@dataclass
class TeacherRun:
    """A teacher run's parts, built before its first epoch."""

    params: Params
    dist: Dist
    device: torch.device
    train: Split
    start: Start  # the architecture's first weights: fresh, or teacher.init's
    model: nn.Module
    trained: nn.Module  # the model, wrapped in DDP under torchrun
    prepare: TeacherInput
    loader: DataLoader
    sampler: DistributedSampler | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    selector: Selector
    config: dict  # the settings recorded in resume.pt and teacher.pt
    checkpointer: Checkpointer

    @property
    def cfg(self) -> TeacherConfig:
        return self.params.teacher

    @classmethod
    def build(cls, params: Params, dist: Dist) -> "TeacherRun":
        cfg, out = params.teacher, Path(params.teacher.out)
        device = select_device(cfg.device, dist)
        train = load_split(params.data, "train")
        if train.is_files:
            raise LogitcacheError(f"train-teacher trains on data sets held as arrays; {params.data.dataset} is read "
                                  "from its image files: bring a pretrained teacher with `logitcache import-teacher`")
        train_rows, validation_rows = holdout(params.data, len(train))
        seed_everything(cfg.seed)
        start = initial_teacher(cfg, train)
        model = place(start.model, device)
        trained = data_parallel(model, device, dist)
        loader, sampler = _loader(cfg, train, train_rows, device, dist)
        prepare = TeacherInput(start.preprocess, train.channels)
        optimizer, scheduler = make_optimizer(start.parameter_groups(cfg), cfg, cfg.epochs * len(loader))
        selector = Selector(model, cfg.select, validation_scorer(model, train, validation_rows, device,
                                                                 preprocess_input(start.preprocess, train)))
        config = {"data": params.data.model_dump(mode="json"), "teacher": cfg.model_dump(mode="json")}
        checkpointer = Checkpointer(out, [out / CHECKPOINT, out / "metrics.json"],
                                    {**config, "world_size": dist.world_size},
                                    {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                                     "selector": selector}, dist)
        return cls(params, dist, device, train, start, model, trained, prepare, loader, sampler, optimizer, scheduler,
                   selector, config, checkpointer)

    def step(self, batch) -> StepOut:
        images, labels, _ = batch
        images, labels = to_input(images, self.device, self.prepare), labels.to(self.device, non_blocking=True)
        with autocast(self.device):
            logits = self.trained(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        return StepOut(loss, logits, labels)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training rows (each rank its own augmentations), then the validation score."""
        cfg, dist = self.cfg, self.dist
        before = _score_init(self.selector) if cfg.init and epoch == 0 and dist.is_main else {}
        seed_epoch(cfg.seed, dist.rank, epoch, self.loader.generator)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        stats = train_steps(self.trained, self.loader, self.step, self.optimizer, self.scheduler,
                            first_step=epoch * len(self.loader), desc=f"teacher {epoch + 1}/{cfg.epochs}", dist=dist)
        stats.update(epoch=epoch + 1, **before)
        if dist.is_main:
            scored = self.selector.evaluate(epoch + 1, stats)
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f} train {stats['train_acc']:.4f} "
                  f"{scored} ({stats['seconds']:.0f} s, {stats['img_per_s']:.0f} img/s)", flush=True)
        return stats


def _loader(cfg: TeacherConfig, train: Split, rows: np.ndarray, device: torch.device,
            dist: Dist) -> tuple[DataLoader, DistributedSampler | None]:
    """Randomly augmented training rows (never the validation rows), each rank its part of every global batch."""
    augment = ViewSpec.from_config(cfg.augment).random_transform(train.image_size)
    dataset = Subset(IndexedDataset(train, augment), rows.tolist())
    sampler = DistributedSampler(dataset, dist.world_size, dist.rank, seed=cfg.seed, drop_last=True) if dist.active else None
    loader = make_loader(dataset, per_rank_batch(cfg.batch_size, dist), shuffle=True, seed=cfg.seed,
                         workers=cfg.workers, device=device, drop_last=True, sampler=sampler)
    return loader, sampler


def _write_outputs(run: TeacherRun, metrics: dict, scored: Scored, history: list[dict]) -> None:
    """metrics, confusion, history and config, then teacher.pt (last: its presence means the run finished)."""
    out, train, cfg = Path(run.cfg.out), run.train, run.cfg
    write_json(out / "metrics.json", metrics)
    write_confusion(out / "confusion.json", scored.labels, scored.logits.argmax(1))
    write_json(out / "history.json", history)
    save_config({"data": run.params.data, "teacher": cfg}, out / "config.json")
    model_info = {"model": cfg.model, "in_channels": run.start.in_channels, "num_classes": train.num_classes,
                  "dataset": train.identity(), "mean": list(train.mean), "std": list(train.std),
                  "preprocess": run.start.preprocess.to_json(), **run.start.inherited}
    save_checkpoint(out / CHECKPOINT, {k: v.cpu() for k, v in run.model.state_dict().items()}, run.config,
                    model_info=model_info)


def _score_init(selector: Selector) -> dict:
    """The starting weights scored on the validation split before any step (round 0 of the selection, so
    fine-tuning that does not help keeps them)."""
    scores: dict = {}
    selector.evaluate(0, scores)
    print(f"init: {scores.get('val_acc')} validation accuracy before fine-tuning", flush=True)
    return {"init_val_acc": scores.get("val_acc")}
