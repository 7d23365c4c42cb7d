"""Phase two: train a student against the cache (or, with --online, the live teacher, for reference).

The whole flow is here, top to bottom: check the caches against the data, choose the
labeled rows, build the batches (replayed views + cached targets), train, evaluate, save.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from logitcache.cache.reader import Cache
from logitcache.core.config import Params, StudentConfig, save_config
from logitcache.core.data import Split, load_split
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureTaker, load_teacher, pool_feature
from logitcache.core.io import load_checkpoint, load_model, save_checkpoint, write_json
from logitcache.core.models import build_model, feature_nodes, layer_channels
from logitcache.core.training import (
    RESUME,
    Checkpointer,
    autocast,
    data_parallel,
    fit,
    make_loader,
    make_optimizer,
    per_rank_batch,
    place,
    seed_epoch,
    seed_everything,
    select_device,
    to_input,
    train_epoch,
)
from logitcache.core.views import ViewRenderer, ViewSpec, normalizer
from logitcache.student.batches import CachedColumn, StudentBatches, ViewBatchSampler
from logitcache.student.evaluate import evaluate_model
from logitcache.student.methods import METHODS, Method, Targets


def train_student(params: Params, name: str = "default", *, resume: bool = False, dist: Dist = Dist.single()) -> dict:
    """Train student NAME once, or once per seed of `seeds` (in <out>/runs/seed<N>/) with mean and std in <out>.

    Under torchrun every rank trains on its part of each global batch (DDP); rank 0 alone
    evaluates and writes. Returns the metrics on rank 0 and {} on the others.
    """
    cfg = params.student(name)
    out = Path(cfg.out)
    if not cfg.seeds:
        return train_one(params, cfg, name, out, resume=resume, dist=dist)
    runs = [train_one(params, cfg.model_copy(update={"seed": seed}), name, out / "runs" / f"seed{seed}",
                      resume=resume, dist=dist) for seed in cfg.seeds]
    if not dist.is_main:
        return {}
    summary = aggregate(runs, cfg.seeds)
    histories = [json.loads((out / "runs" / f"seed{seed}" / "history.json").read_text()) for seed in cfg.seeds]
    write_json(out / "history.json", [{k: float(np.mean([h[i][k] for h in histories])) for k in histories[0][i]}
                                      for i in range(len(histories[0]))])
    (out / "confusion.json").write_bytes((out / "runs" / f"seed{cfg.seeds[0]}" / "confusion.json").read_bytes())
    save_config({"data": params.data, "student": cfg}, out / "config.json")
    write_json(out / "metrics.json", summary)
    return summary


def aggregate(runs: list[dict], seeds: list[int]) -> dict:
    """Mean and (sample) standard deviation of every numeric metric over seeds, plus each seed's figures."""
    summary: dict = {"seeds": list(seeds), "mode": runs[0]["mode"], "online": runs[0]["online"]}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            summary[key] = float(np.mean(values))
            summary[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    summary["per_seed"] = {str(s): {k: r[k] for k in ("test_acc", "agreement", "kl_to_teacher")} for s, r in zip(seeds, runs)}
    return summary


class Learner(nn.Module):
    """Student and method (adapters) as one module, so DDP averages the gradients of both."""

    def __init__(self, taker: nn.Module, method: Method):
        super().__init__()
        self.taker, self.method = taker, method

    def forward(self, x: torch.Tensor, targets: Targets, progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.taker(x)
        loss, _ = self.method(out["logits"].float(), out.get("feature"), targets, progress)
        return loss, out["logits"]


def train_one(params: Params, cfg: StudentConfig, name: str, out: Path, *, resume: bool = False,
              dist: Dist = Dist.single()) -> dict:
    config = {"data": params.data.model_dump(mode="json"), "student": cfg.model_dump(mode="json"), "name": name}
    if resume and (done := _finished_run(out, config)) is not None:
        return done if dist.is_main else {}
    device = select_device(cfg.device, dist)
    per_rank_batch(cfg.batch_size, dist)  # refuse a batch that does not split evenly over the ranks
    seed_everything(cfg.seed)
    train = load_split(params.data, "train")
    method_cls = METHODS[cfg.mode]
    distilling = cfg.mode != "ce"
    meta = _open_caches(cfg, train) if distilling else None
    labeled = labeled_mask(cfg, len(train))
    if cfg.test_cache and Path(cfg.test_cache).exists():  # as evaluate_model uses it, but checked before training
        with Cache(cfg.test_cache) as cache:
            cache.check_matches(load_split(params.data, "test"))
    rows = np.arange(len(train)) if distilling else np.flatnonzero(labeled)

    student = _initial_model(cfg, train)
    nodes = feature_nodes(student)
    if method_cls.uses_features and cfg.student_layer not in nodes:
        raise LogitcacheError(f"unknown student_layer {cfg.student_layer!r} for {cfg.model}; valid names: {', '.join(nodes)}")
    taker = place(create_feature_extractor(student, {nodes[-1]: "logits", **(
        {cfg.student_layer: "feature"} if method_cls.uses_features else {})}), device)
    method = _make_method(cfg, method_cls, taker, train, meta, device)
    learner = data_parallel(Learner(taker, method), device, dist)
    dataset, sampler = _batches(cfg, train, labeled, rows, meta, dist)
    loader = make_loader(dataset, None, shuffle=False, seed=cfg.seed, workers=cfg.workers, device=device,
                         sampler=sampler)
    optimizer, scheduler = make_optimizer([*taker.parameters(), *method.parameters()], cfg, len(sampler))
    prepare = normalizer(train.mean, train.std)
    online = _online_teacher(cfg, meta, device) if cfg.online and distilling else None
    total_steps = cfg.epochs * len(sampler)
    checkpointer = Checkpointer(out, [out / "student.pt", Path(cfg.out) / "metrics.json"],
                                {**config, "world_size": dist.world_size},
                                {"student": taker, "method": method, "optimizer": optimizer, "scheduler": scheduler},
                                dist)

    def step(batch, progress):
        images, labels, labeled_rows, logits, features = batch
        x = to_input(images, device, prepare)
        if online is not None:
            logits, features = online(x)
        targets = Targets(labels.to(device), labeled_rows.to(device), [t.to(device) for t in logits],
                          {k: v.to(device) for k, v in features.items()})
        with autocast(device):
            loss, logits = learner(x, targets, progress)
        return loss, logits, targets.labels

    def run_epoch(epoch: int) -> dict:
        seed_epoch(cfg.seed, dist.rank, epoch, loader.generator)
        sampler.set_epoch(epoch)
        steps = iter(range(epoch * len(sampler), (epoch + 1) * len(sampler)))
        stats = train_epoch(learner, loader, lambda b: step(b, next(steps) / max(1, total_steps - 1)), optimizer,
                            scheduler, epoch=epoch + 1, desc=f"{name} {epoch + 1}/{cfg.epochs}", dist=dist)
        if dist.is_main:
            print(f"{name} epoch {epoch + 1}/{cfg.epochs}: loss {stats['train_loss']:.4f} "
                  f"train acc {stats['train_acc']:.4f} ({stats['seconds']:.1f} s)", flush=True)
        return {"epoch": epoch + 1, **stats}

    try:
        history = fit(cfg.epochs, run_epoch, checkpointer, resume)
    finally:
        for column in [*dataset.logits, *dataset.features.values()]:
            column.close()
    if not dist.is_main:
        dist.barrier()
        return {}
    # the student shares the taker's trained modules
    metrics = evaluate_model(student, params.data, device, cfg.test_cache, confusion=out / "confusion.json")
    metrics.update(seconds_per_epoch=sum(h["seconds"] for h in history) / len(history), mode=cfg.mode,
                   labeled=int(labeled.sum()), online=cfg.online, world_size=dist.world_size)
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history)
    save_config({"data": params.data, "student": cfg}, out / "config.json")
    save_checkpoint(out / "student.pt", _cpu(student.state_dict()), config, adapters=_cpu(method.state_dict()),
                    model_info={"model": cfg.model, "in_channels": train.channels, "num_classes": train.num_classes,
                                **({"channels": layer_channels(student)} if cfg.init else {})})
    checkpointer.discard()  # the checkpoint, written last, marks the run finished
    dist.barrier()
    return metrics


def _initial_model(cfg: StudentConfig, train: Split) -> nn.Module:
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


def _finished_run(out: Path, config: dict) -> dict | None:
    """A resumed multi-seed run skips the seeds whose outputs are complete and made with these settings."""
    if not (out / "student.pt").is_file() or (out / RESUME).exists() or not (out / "metrics.json").is_file():
        return None
    if load_checkpoint(out / "student.pt")["config"] != json.loads(json.dumps(config, sort_keys=True)):
        return None
    return json.loads((out / "metrics.json").read_text())


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def labeled_mask(cfg: StudentConfig, n: int) -> np.ndarray:
    """Which rows the CE term may use: an explicit index list, or a seeded fraction shared by all student seeds."""
    mask = np.zeros(n, dtype=bool)
    if cfg.labeled_indices:
        path = Path(cfg.labeled_indices)
        if not path.is_file():
            raise LogitcacheError(f"labeled_indices file {path} does not exist")
        try:
            values = json.loads(path.read_text())
        except ValueError:
            values = None
        if not isinstance(values, list) or not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise LogitcacheError(f"labeled_indices file {path} must hold a non-empty JSON list of integer sample indices")
        indices = np.asarray(values, dtype=np.int64)
        if indices.min() < 0 or indices.max() >= n:
            raise LogitcacheError(f"labeled_indices in {path} must be integers in [0, {n})")
        mask[indices] = True
        return mask
    count = max(1, round(cfg.labeled_fraction * n))
    mask[np.random.default_rng(cfg.labels_seed).permutation(n)[:count]] = True
    return mask


def _open_caches(cfg: StudentConfig, train: Split) -> dict:
    """Check every cache against the training data and each other; return what training needs of them."""
    if not cfg.caches:
        raise LogitcacheError(f"mode {cfg.mode} needs at least one cache in caches:")
    first = None
    for path in cfg.caches:
        with Cache(path) as cache:
            cache.check_matches(train)
            if first is None:
                first = {"views": cache.view_params(), "meta": cache.meta}
            elif not np.array_equal(cache.view_params(), first["views"]):
                raise LogitcacheError(f"{path} holds other views than {cfg.caches[0]}; several caches must share views")
            if cache.num_classes != train.num_classes:
                raise LogitcacheError(f"{path} has {cache.num_classes} classes, the data has {train.num_classes}")
    layers = first["meta"]["layers"]
    if cfg.mode in ("feature", "kd+feature"):
        names = [layer["name"] for layer in layers]
        if cfg.teacher_layer not in names or not cfg.student_layer:
            raise LogitcacheError(f"mode {cfg.mode} needs student_layer and teacher_layer; cached teacher layers: "
                                  f"{', '.join(names) or 'none (dump with --layers)'}")
    return first


def _make_method(cfg: StudentConfig, method_cls, taker, train: Split, meta, device) -> Method:
    if not method_cls.uses_features:
        return method_cls(cfg).to(device)
    layer = next(layer for layer in meta["meta"]["layers"] if layer["name"] == cfg.teacher_layer)
    with torch.no_grad():
        probe = taker.eval()(normalizer(train.mean, train.std)(train.images[:2].to(device)))
    return method_cls(cfg, tuple(probe["feature"].shape[1:]), tuple(layer["shape"])).to(device)


def _batches(cfg: StudentConfig, train: Split, labeled: np.ndarray, rows: np.ndarray, meta,
             dist: Dist = Dist.single()):
    """The dataset and sampler: replayed cached views with their targets, or plain images for CE."""
    if meta is None:
        spec = ViewSpec.from_config(cfg.augment) if cfg.augment else None
        transform = spec.random_transform(train.image_size) if spec else None
        return StudentBatches(train, labeled, transform=transform), \
            ViewBatchSampler(rows, 1, cfg.batch_size, "random", cfg.seed, dist=dist)
    views, info = meta["views"], meta["meta"]
    count = views.shape[1]
    if cfg.force_augment and (cfg.augment is None or count > 1):
        raise LogitcacheError(f"force_augment needs augment: set and a 1-view cache; the cache has {count} views")
    if cfg.augment is not None and (count > 1 or not cfg.force_augment):
        raise LogitcacheError(
            f"augment is set but the student's views come from the cache ({count} view(s)); random augmentation "
            "would show inputs the teacher never saw. Dump more views (dump.views) instead, or set "
            "force_augment: true with a 1-view cache to accept mismatched targets")
    budget = cfg.feature_budget_mb * 2**20
    hinted = cfg.mode in ("feature", "kd+feature") and not cfg.online  # the hint imitates the first cache's teacher
    features = {cfg.teacher_layer: CachedColumn(cfg.caches[0], f"features/{cfg.teacher_layer}", budget)} if hinted else {}
    logits = [CachedColumn(p, "logits", budget) for p in cfg.caches] if not cfg.online else []
    in_ram = all(c.array is not None for c in [*logits, *features.values()])
    spec = ViewSpec.from_json(info["transform"]["augment"])
    if cfg.force_augment:
        dataset = StudentBatches(train, labeled, transform=ViewSpec.from_config(cfg.augment).random_transform(
            train.image_size), logits=logits, features=features)
    else:
        dataset = StudentBatches(train, labeled, render=ViewRenderer(spec), view_params=views, logits=logits,
                                 features=features)
    block = 1 if in_ram else 256
    return dataset, ViewBatchSampler(rows, count, cfg.batch_size, cfg.view_sampling, cfg.seed, block, dist)


def _online_teacher(cfg: StudentConfig, meta, device):
    """The reference path: the live teacher computes the same targets on the same inputs."""
    if len(cfg.caches) > 1 or meta["meta"]["topk"]:
        raise LogitcacheError("--online reproduces a single full-logit cache; use one cache without topk")
    teacher = load_teacher(cfg.teacher)
    if teacher.sha256 != meta["meta"]["teacher"]["checkpoint_sha256"]:
        raise LogitcacheError(f"--online teacher {cfg.teacher} is not the checkpoint the cache was made from")
    layers = [cfg.teacher_layer] if cfg.mode in ("feature", "kd+feature") else []
    pooled = {layer["name"]: layer["pooled_to"] or 0 for layer in meta["meta"]["layers"]}
    taker = place(FeatureTaker(teacher.model, layers), device).eval()
    dtype = meta["meta"]["dtypes"]["logits"]

    @torch.no_grad()
    def targets(x):
        out = taker(x)
        # round like the cache does, so online and cached runs differ only by where targets come from
        logits = out["logits"].float().to(getattr(torch, dtype)).float()
        return [logits], {name: pool_feature(out[name].float(), pooled[name]).half().float() for name in layers}

    return targets
