"""Phase two: train a student against the cache (or, with --online, the live teacher, for reference).

`train_one` is the whole flow, top to bottom: plan the run (data, labeled rows, caches,
methods), build the learner and the batches, train epoch by epoch, then evaluate and save.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from logitcache.cache.format import form_dataset, stored_forms
from logitcache.cache.reader import Cache
from logitcache.core import interrupt, provenance
from logitcache.core.config import Params, StudentConfig, save_config
from logitcache.core.data import Split, holdout, load_split, split_identity
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import FeatureTaker, load_teacher, stored_form
from logitcache.core.io import check_output_folder, load_checkpoint, load_model, save_checkpoint, write_json
from logitcache.core.models import build_model, feature_nodes, layer_channels
from logitcache.core.schedule import Progress, value_at
from logitcache.core.training import (
    RESUME,
    Checkpointer,
    Selector,
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
    validation_scorer,
)
from logitcache.core.views import Normalizer, RandomViews, ViewRenderer, ViewSpec
from logitcache.student.batches import FRESH_VIEWS, CachedColumn, StepStream, StudentBatches, ViewBatchSampler
from logitcache.student.evaluate import evaluate_model
from logitcache.student.losses import masked_ce
from logitcache.student.methods import (
    Batch,
    Context,
    Method,
    MethodConfig,
    Needs,
    StudentOut,
    TeacherInput,
    TeacherOut,
    methods,
    parse_loss,
)


def train_student(params: Params, name: str = "default", *, resume: bool = False, dist: Dist = Dist.single(),
                  jobs: int = 1) -> dict:
    """Train student NAME once, or once per seed of `seeds` (in <out>/runs/seed<N>/) with mean and std in <out>.

    `jobs` > 1 trains that many seeds at once, in processes that share the CPU threads (a run's
    bits depend on its thread count, recorded in metrics.json, not on the other jobs). Under torchrun
    every rank trains on its part of each global batch (DDP); rank 0 alone evaluates and
    writes. Returns the metrics on rank 0 and {} on the others.
    """
    cfg = params.student(name)
    out = Path(cfg.out)
    check_output_folder(out, f"students.{name}.out")
    if jobs < 1:
        raise LogitcacheError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and dist.world_size > 1:
        raise LogitcacheError("--jobs trains seeds in separate processes; under torchrun leave it at 1")
    if not cfg.seeds:
        return train_one(params, cfg, name, out, resume=resume, dist=dist)
    seeds = [(cfg.model_copy(update={"seed": seed}), out / "runs" / f"seed{seed}") for seed in cfg.seeds]
    if jobs > 1 and len(seeds) > 1:
        runs = _train_in_parallel(params, seeds, name, resume, jobs)
    else:
        runs = [train_one(params, seed_cfg, name, seed_out, resume=resume, dist=dist) for seed_cfg, seed_out in seeds]
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


def _train_in_parallel(params: Params, seeds: list, name: str, resume: bool, jobs: int) -> list[dict]:
    """Train the seeds in `jobs` worker processes, each with an equal share of this process's CPU threads and
    no progress bar (the runs' lines name their seed). A run's bits depend on its thread count, as any torch
    run's do, and not on the other jobs: `metrics.json` records `threads`."""
    jobs = min(jobs, len(seeds))
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_setup, initargs=(threads, stop)) as pool:
        futures = [pool.submit(train_one, params, seed_cfg, name, seed_out, resume=resume, bar=False)
                   for seed_cfg, seed_out in seeds]
        try:
            return [future.result() for future in futures]
        except BaseException:  # an interrupt, or one seed's error: the other seeds stop too, resumable
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _worker_setup(threads: int, stop) -> None:
    torch.set_num_threads(threads)
    interrupt.install()
    interrupt.follow_parent(stop)


def aggregate(runs: list[dict], seeds: list[int]) -> dict:
    """Mean and (sample) standard deviation of every numeric metric over seeds, plus each seed's figures."""
    summary: dict = {"seeds": list(seeds), "mode": runs[0]["mode"], "online": runs[0]["online"],
                     "select": runs[0]["select"]}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            summary[key] = float(np.mean(values))
            summary[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    summary["per_seed"] = {str(s): {k: r[k] for k in ("test_acc", "val_acc", "agreement", "kl_to_teacher", "selected_step")}
                           for s, r in zip(seeds, runs)}
    environments = [r.get(provenance.KEY) for r in runs]
    summary[provenance.KEY] = environments[0] if all(e == environments[0] for e in environments) else environments
    return summary


@dataclass
class Plan:
    """What a run needs to know before building anything: data, labeled rows, caches, methods and their needs."""

    train: Split
    validation: np.ndarray  # the held-out rows that score each evaluation, never trained on
    labeled: np.ndarray  # bool per training row: may CE use its label
    rows: np.ndarray  # the rows a pass iterates over (labeled ones `labeled_repeat` times)
    methods: dict[str, MethodConfig]
    needs: Needs  # union over the methods
    cache: dict | None  # first cache's view parameters and metadata; None for a CE-only student


def mode_name(cfg: StudentConfig) -> str:
    return "+".join(cfg.loss) or "ce"


def plan_run(params: Params, cfg: StudentConfig, name: str) -> Plan:
    """Validate everything the run reads, before any output folder is touched."""
    chosen = parse_loss(cfg.loss, f"students.{name}")
    needs = _union([methods()[m].needs(c) for m, c in chosen.items()])
    train = load_split(params.data, "train")
    train_rows, validation = holdout(params.data, len(train))
    meta = _open_caches(cfg, train, needs) if chosen else None
    labeled = labeled_mask(cfg, len(train), train_rows)
    if cfg.test_cache and Path(cfg.test_cache).exists():  # checked before training, from meta.json: the test
        with Cache(cfg.test_cache) as cache:               # split itself is read once, after training
            cache.check_identity(split_identity(params.data, "test"))
    if not chosen:
        rows = np.flatnonzero(labeled)
    else:
        rows = np.concatenate([train_rows, *[np.flatnonzero(labeled)] * (cfg.labeled_repeat - 1)])
    return Plan(train, validation, labeled, rows, chosen, needs, meta)


def _union(all_needs: list[Needs]) -> Needs:
    def unique(items):
        return list(dict.fromkeys(items))
    return Needs(logits=any(n.logits for n in all_needs), teacher=unique(t for n in all_needs for t in n.teacher),
                 student=unique(s for n in all_needs for s in n.student), banks=unique(b for n in all_needs for b in n.banks))


class Learner(nn.Module):
    """Student and methods (adapters, heads) as one module, so DDP averages the gradients of both.

    The loss is `ce_weight * CE(labeled rows) + sum(weight * method loss)`; every named term
    is returned for the per-epoch curves.
    """

    def __init__(self, taker: nn.Module, methods: dict[str, Method], cfg: StudentConfig):
        super().__init__()
        self.taker, self.methods, self.cfg = taker, nn.ModuleDict(methods), cfg

    def forward(self, x: torch.Tensor, teacher: TeacherOut, batch: Batch, at: Progress):
        out = self.taker(x)
        student = StudentOut(out["logits"].float(), {k: v for k, v in out.items() if k != "logits"})
        ce = masked_ce(student.logits, batch.labels, batch.labeled)
        total = value_at(self.cfg.ce_weight, at) * ce
        terms: dict = {"ce": ce.detach()}
        for name, method in self.methods.items():
            loss, parts = method(student, teacher, batch, at)
            total = total + value_at(method.cfg.weight, at) * loss
            terms.update({(name if key == name else f"{name}.{key}"): value for key, value in parts.items()})
        return total, student.logits, terms


def build_learner(plan: Plan, cfg: StudentConfig, device: torch.device) -> tuple[nn.Module, Learner]:
    """The student (with the nodes the methods read exposed) and each method sized from the real shapes."""
    train = plan.train
    student = _initial_model(cfg, train)
    nodes = feature_nodes(student)
    unknown = [s for s in plan.needs.student if s not in nodes]
    if unknown:
        raise LogitcacheError(f"unknown student layer(s) {', '.join(map(repr, unknown))} for {cfg.model}; "
                              f"valid names: {', '.join(nodes)}")
    taker = place(create_feature_extractor(student, {nodes[-1]: "logits", **{s: s for s in plan.needs.student}}),
                  device)
    with torch.no_grad():
        probe = taker.eval()(Normalizer(train.mean, train.std)(train.images[:2].to(device)))
    ctx = Context(num_classes=train.num_classes, num_samples=len(train),
                  student_shapes={s: tuple(probe[s].shape[1:]) for s in plan.needs.student},
                  teacher_shapes=plan.cache["shapes"] if plan.cache else {},
                  banks={b: _bank(cfg.caches[0], b).to(device) for b in plan.needs.banks},
                  train_rows=torch.from_numpy(np.unique(plan.rows)))
    chosen = {name: methods()[name](c, ctx) for name, c in plan.methods.items()}
    return student, Learner(taker, chosen, cfg).to(device)


def _bank(path: str, source: TeacherInput) -> torch.Tensor:
    """Every sample's cached value of a teacher layer, under its evaluation view (view 0)."""
    with Cache(path) as cache:
        return torch.from_numpy(cache.read(form_dataset(source.layer, source.form), (slice(None), 0))).float()


def train_one(params: Params, cfg: StudentConfig, name: str, out: Path, *, resume: bool = False,
              dist: Dist = Dist.single(), bar: bool = True) -> dict:
    settings = {"data": params.data.model_dump(mode="json"), "student": cfg.model_dump(mode="json"), "name": name}
    if resume and (done := _finished_run(out, settings, cfg)) is not None:
        if dist.is_main:
            print(f"{name} seed {cfg.seed} already finished, kept ({out})", flush=True)
        return done if dist.is_main else {}
    device = select_device(cfg.device, dist)
    per_rank_batch(cfg.batch_size, dist)  # refuse a batch that does not split evenly over the ranks
    seed_everything(cfg.seed)

    plan = plan_run(params, cfg, name)
    config = {**settings, "caches": _cache_identities(cfg)}
    student, learner = build_learner(plan, cfg, device)
    dataset, passes = _batches(cfg, plan, dist)
    budget = Budget.of(cfg, len(passes))
    stream = StepStream(passes)
    loader = make_loader(dataset, None, shuffle=False, seed=cfg.seed, workers=cfg.workers, device=device,
                         sampler=stream)
    optimizer, scheduler = make_optimizer(learner.parameters(), cfg, budget.total)
    model = data_parallel(learner, device, dist)
    teacher_for = _online_teacher(cfg, plan, device) if cfg.online and plan.methods else None
    selector = Selector(learner, cfg.select, validation_scorer(student, plan.train, plan.validation, device))
    checkpointer = Checkpointer(out, [out / "student.pt", Path(cfg.out) / "metrics.json"],
                                {**config, "world_size": dist.world_size},
                                {"learner": learner, "optimizer": optimizer, "scheduler": scheduler,
                                 "selector": selector}, dist)
    step = Stepper(model, cfg, plan, device, dist, teacher_for, steps_per_pass=len(passes), total=budget.total)
    label = f"{name} seed {cfg.seed}" if cfg.seeds else name

    def run_round(r: int) -> dict:
        start, stop = budget.steps_of(r)
        seed_epoch(cfg.seed, dist.rank, r, loader.generator)
        stream.cover(start, stop)
        step.at = start
        stats = train_epoch(model, loader, step, optimizer, scheduler, epoch=r + 1,
                            desc=f"{label} {r + 1}/{budget.rounds}", dist=dist, bar=bar)
        stats = {"round": r + 1, "steps": stop, "epoch": stop / len(passes), **stats}
        if dist.is_main:
            scored = selector.evaluate(r + 1, stats)
            print(f"{label} step {stop:,}/{budget.total:,} (epoch {stats['epoch']:.2f}): loss {stats['train_loss']:.4f} "
                  f"train acc {stats['train_acc']:.4f} {scored} ({stats['seconds']:.1f} s)", flush=True)
        return stats

    try:
        history = fit(budget.rounds, run_round, checkpointer, resume, unit="evaluation")
    finally:
        dataset.close()
    return _finish(params, cfg, plan, student, selector, learner, history, out, config, checkpointer, device, dist)


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
    def rounds(self) -> int:
        return -(-self.total // self.every)

    def steps_of(self, r: int) -> tuple[int, int]:
        return r * self.every, min(self.total, (r + 1) * self.every)


class Stepper:
    """One training step's forward: the batch's targets (cached, or from the live teacher), then the learner."""

    def __init__(self, model, cfg: StudentConfig, plan: Plan, device, dist: Dist, teacher_for, steps_per_pass: int,
                 total: int):
        self.model, self.cfg, self.device, self.dist, self.teacher_for = model, cfg, device, dist, teacher_for
        self.prepare = Normalizer(plan.train.mean, plan.train.std)
        self.steps_per_pass, self.total = steps_per_pass, total
        self.at = 0  # the run's global step

    def __call__(self, batch):
        images, labels, labeled, rows, logits, features = batch
        step, self.at = self.at, self.at + 1
        at = Progress(step / max(1, self.total - 1), step / self.steps_per_pass)
        x = to_input(images, self.device, self.prepare)
        if self.teacher_for is not None:
            teacher = self.teacher_for(x)
        else:
            teacher = TeacherOut([t.to(self.device) for t in logits],
                                 {key: v.to(self.device) for key, v in features.items()})
        info = Batch(labels.to(self.device), labeled.to(self.device), rows.to(self.device), self.dist.world_size)
        with autocast(self.device):
            loss, logits, terms = self.model(x, teacher, info, at)
        return loss, logits, info.labels, terms


def _finish(params, cfg, plan, student, selector, learner, history, out, config, checkpointer, device, dist) -> dict:
    """Rank 0 takes the selected weights, scores them on the test split (its only read of it) and writes metrics,
    history, config and the checkpoint (last)."""
    if not dist.is_main:
        dist.barrier()
        return {}
    train = plan.train
    selected = selector.restore()
    metrics = evaluate_model(student, params.data, device, cfg.test_cache, confusion=out / "confusion.json")
    steps = history[-1]["steps"]
    metrics.update(selected, selected_step=history[selected["selected"] - 1]["steps"], mode=mode_name(cfg),
                   labeled=int(plan.labeled.sum()), online=cfg.online, world_size=dist.world_size, steps=steps,
                   samples=sum(h["samples"] for h in history), threads=torch.get_num_threads(), train_seconds=sum(h["seconds"] for h in history),
                   seconds_per_epoch=sum(h["seconds"] for h in history) / history[-1]["epoch"],
                   **{provenance.KEY: provenance.environment(device).as_dict()})
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history)
    save_config({"data": params.data, "student": cfg}, out / "config.json")
    save_checkpoint(out / "student.pt", _cpu(student.state_dict()), config,
                    adapters=_cpu({f"{name}.{key}": value for name, method in learner.methods.items()
                                   for key, value in method.learned_state().items()}),
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


def _finished_run(out: Path, settings: dict, cfg: StudentConfig) -> dict | None:
    """A resumed multi-seed run skips the seeds whose outputs are complete and made with these settings from these
    caches (where the run is stored and which other seeds it was trained with do not count: a moved run is still
    kept; a re-dumped cache is not the same cache)."""
    if not (out / "student.pt").is_file() or (out / RESUME).exists() or not (out / "metrics.json").is_file():
        return None
    saved = load_checkpoint(out / "student.pt")["config"]
    if _settings({**saved, "caches": None}) != _settings(json.loads(json.dumps({**settings, "caches": None}))):
        return None  # other settings: no cache is opened, the run starts and reports its own errors
    try:
        if saved.get("caches") != _cache_identities(cfg):
            return None
    except LogitcacheError:  # a cache that cannot be opened now: not kept; training says what is wrong
        return None
    return json.loads((out / "metrics.json").read_text())


def _cache_identities(cfg: StudentConfig) -> dict[str, str]:
    """Each cache the run reads (the training caches when it distils, the test cache when it exists) -> its
    identity: a run kept or resumed after a re-dump would hold targets of another teacher."""
    paths = [*(cfg.caches if cfg.loss else []),
             *([cfg.test_cache] if cfg.test_cache and Path(cfg.test_cache).exists() else [])]
    identities = {}
    for path in paths:
        with Cache(path) as cache:
            identities[path] = cache.identity
    return identities


def _settings(config: dict) -> dict:
    return {**config, "student": {k: v for k, v in config["student"].items() if k not in ("out", "seeds")}}


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def labeled_mask(cfg: StudentConfig, n: int, train_rows: np.ndarray) -> np.ndarray:
    """Which rows the CE term may use: an explicit index list, or a seeded fraction of the training rows (never a
    validation row) shared by all student seeds."""
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
        held = np.setdiff1d(indices, train_rows)
        if len(held):
            raise LogitcacheError(f"labeled_indices in {path} include {len(held)} validation row(s), first "
                                  f"{held[:5].tolist()}; leave them out, or change data.validation / validation_seed")
        mask[indices] = True
        return mask
    count = max(1, round(cfg.labeled_fraction * len(train_rows)))
    mask[np.random.default_rng(cfg.labels_seed).permutation(train_rows)[:count]] = True
    return mask


def _open_caches(cfg: StudentConfig, train: Split, needs: Needs) -> dict:
    """Check every cache against the training data and each other; return what training needs of them."""
    if not cfg.caches:
        raise LogitcacheError(f"students with a loss: ({', '.join(cfg.loss)}) need at least one cache in caches:")
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
    stored = stored_forms(first["meta"])
    missing = [str(t) for t in [*needs.teacher, *needs.banks] if (t.layer, t.form) not in stored]
    if missing:
        have = ", ".join(f"{layer}:{form}" for layer, form in stored) or "none"
        raise LogitcacheError(f"{cfg.caches[0]} does not store {', '.join(missing)} (cached: {have}); dump them with "
                              "dump.layers, e.g. {name: layer2, forms: [map, attention, embedding]}")
    first["shapes"] = {t: stored[(t.layer, t.form)] for t in [*needs.teacher, *needs.banks]}
    return first


def _batches(cfg: StudentConfig, plan: Plan, dist: Dist = Dist.single()):
    """The dataset and sampler: replayed cached views with their targets, or plain images for a CE-only student."""
    train, labeled = plan.train, plan.labeled
    if plan.cache is None:
        if cfg.augment is None:
            return StudentBatches(train, labeled), \
                ViewBatchSampler(plan.rows, 1, cfg.batch_size, "random", cfg.seed, cfg.shuffle_block, dist)
        spec = ViewSpec.from_config(cfg.augment)
        return StudentBatches(train, labeled, render=ViewRenderer(spec), view_params=RandomViews(spec, cfg.seed)), \
            ViewBatchSampler(plan.rows, FRESH_VIEWS, cfg.batch_size, "random", cfg.seed, cfg.shuffle_block, dist)
    views, info = plan.cache["views"], plan.cache["meta"]
    count = views.shape[1]
    if cfg.force_augment and (cfg.augment is None or count > 1):
        raise LogitcacheError(f"force_augment needs augment: set and a 1-view cache; the cache has {count} views")
    if cfg.augment is not None and (count > 1 or not cfg.force_augment):
        raise LogitcacheError(
            f"augment is set but the student's views come from the cache ({count} view(s)); random augmentation "
            "would show inputs the teacher never saw. Dump more views (dump.views) instead, or set "
            "force_augment: true with a 1-view cache to accept mismatched targets")
    budget = cfg.feature_budget_mb * 2**20
    cached = not cfg.online
    features = {t: CachedColumn(cfg.caches[0], form_dataset(t.layer, t.form), budget)
                for t in plan.needs.teacher} if cached else {}
    logits = [CachedColumn(p, "logits", budget) for p in cfg.caches] if cached and plan.needs.logits else []
    if cfg.force_augment:
        spec = ViewSpec.from_config(cfg.augment)
        dataset = StudentBatches(train, labeled, render=ViewRenderer(spec), view_params=RandomViews(spec, cfg.seed),
                                 logits=logits, features=features)
        count = FRESH_VIEWS
    else:
        dataset = StudentBatches(train, labeled, render=ViewRenderer(ViewSpec.from_json(info["transform"]["augment"])),
                                 view_params=views, logits=logits, features=features)
    return dataset, ViewBatchSampler(plan.rows, count, cfg.batch_size, cfg.view_sampling, cfg.seed,
                                     cfg.shuffle_block, dist)


def _online_teacher(cfg: StudentConfig, plan: Plan, device):
    """The reference path: the live teacher computes the same targets on the same inputs, rounded as cached."""
    meta = plan.cache["meta"]
    if len(cfg.caches) > 1 or meta["topk"]:
        raise LogitcacheError("--online reproduces a single full-logit cache; use one cache without topk")
    teacher = load_teacher(cfg.teacher)
    if teacher.sha256 != meta["teacher"]["checkpoint_sha256"]:
        raise LogitcacheError(f"--online teacher {cfg.teacher} is not the checkpoint the cache was made from")
    layers = {layer["name"]: layer for layer in meta["layers"]}
    wanted = plan.needs.teacher
    taker = place(FeatureTaker(teacher.model, list(dict.fromkeys(t.layer for t in wanted))), device).eval()
    dtype = getattr(torch, meta["dtypes"]["logits"])

    @torch.no_grad()
    def targets(x) -> TeacherOut:
        out = taker(x)
        return TeacherOut([out["logits"].float().to(dtype).float()] if plan.needs.logits else [],
                          {t: stored_form(out[t.layer].float(), t.form, layers[t.layer]).float() for t in wanted})

    return targets
