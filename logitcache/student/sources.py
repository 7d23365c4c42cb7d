"""Where a student's batches come from, as a dataset of `TrainBatch`es and the sampler of its (row, view) pairs.

Four paths: plain training images (CE), fresh random views (CE with `augment`), the cache's replayed views with
their targets, and random views over a 1-view cache (`force_augment`).
"""

from __future__ import annotations

from logitcache.cache.format import form_dataset
from logitcache.core.config import StudentConfig
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.views import RandomViews, ViewSpec
from logitcache.student.batches import FRESH_VIEWS, CachedColumn, StudentBatches, ViewBatchSampler
from logitcache.student.plan import Plan


def make_batches(cfg: StudentConfig, plan: Plan, dist: Dist = Dist.single()) -> tuple[StudentBatches, ViewBatchSampler]:
    """The dataset and sampler: replayed cached views with their targets, or plain images for a CE-only student."""
    if plan.cache is None:
        return _labels_only(cfg, plan, dist)
    check_augment(cfg, plan.cache.num_views)
    dataset, count = _cached(cfg, plan)
    return dataset, ViewBatchSampler(plan.rows, count, cfg.batch_size, cfg.view_sampling, cfg.seed,
                                     block=cfg.shuffle_block, dist=dist)


def check_augment(cfg: StudentConfig, count: int) -> None:
    """Random augmentation shows inputs the teacher never saw: only over a 1-view cache, and only when forced."""
    if cfg.force_augment and (cfg.augment is None or count > 1):
        raise LogitcacheError(f"force_augment needs augment: set and a 1-view cache; the cache has {count} views")
    if cfg.augment is not None and (count > 1 or not cfg.force_augment):
        raise LogitcacheError(
            f"augment is set but the student's views come from the cache ({count} view(s)); random augmentation "
            "would show inputs the teacher never saw. Dump more views (dump.views) instead, or set "
            "force_augment: true with a 1-view cache to accept mismatched targets")


def _labels_only(cfg: StudentConfig, plan: Plan, dist: Dist) -> tuple[StudentBatches, ViewBatchSampler]:
    """A CE-only student: the training images as they are, or a fresh random view of each every pass."""
    if cfg.augment is None:
        return StudentBatches(plan.train, plan.labeled), \
            ViewBatchSampler(plan.rows, 1, cfg.batch_size, "random", cfg.seed, block=cfg.shuffle_block, dist=dist)
    spec = ViewSpec.from_config(cfg.augment)
    return StudentBatches(plan.train, plan.labeled, render=plan.view.renderer(spec),
                          view_params=RandomViews(spec, cfg.seed, plan.train.sizes)), \
        ViewBatchSampler(plan.rows, FRESH_VIEWS, cfg.batch_size, "random", cfg.seed, block=cfg.shuffle_block,
                         dist=dist)


def _cached(cfg: StudentConfig, plan: Plan) -> tuple[StudentBatches, int]:
    """The cache's views replayed with their targets (none read with --online: the live teacher makes them), and
    the number of views a row may show."""
    budget = cfg.feature_budget_mb * 2**20
    cached = not cfg.online
    features = {t: CachedColumn(cfg.caches[0], form_dataset(t.layer, t.form), budget)
                for t in plan.needs.teacher} if cached else {}
    logits = [CachedColumn(p, "logits", budget) for p in cfg.caches] if cached and plan.needs.logits else []
    if cfg.force_augment:
        spec = ViewSpec.from_config(cfg.augment)
        return StudentBatches(plan.train, plan.labeled, render=plan.view.renderer(spec),
                              view_params=RandomViews(spec, cfg.seed, plan.train.sizes), logits=logits,
                              features=features), FRESH_VIEWS
    return StudentBatches(plan.train, plan.labeled, render=plan.view.renderer(plan.cache.spec), view_params=plan.cache.views,
                          logits=logits, features=features), plan.cache.num_views
