"""Checks of a student run that come before its work, and the record of where its results come from.

`check_seeds` runs before any seed trains: with --resume every seed's saved state must have been saved with
this run's settings (else nothing is trained). `check_same_teacher` refuses a test cache of another teacher
than the training caches. `origin` is what metrics.json records of the teacher, the caches and the data a run
used.
"""

from __future__ import annotations

from pathlib import Path

from logitcache.cache.reader import Cache
from logitcache.core.config import Params, StudentConfig
from logitcache.core.data import Split
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.training import RESUME, check_resumable
from logitcache.student.resume import cache_identities, run_settings

ORIGIN = ("teacher_sha256", "caches", "data_fingerprint")  # the keys `origin` adds to metrics.json


def check_seeds(params: Params, name: str, seeds: list[tuple[StudentConfig, Path]], resume: bool, dist: Dist) -> None:
    """Before the first seed trains, with --resume: every seed's resume.pt."""
    if not resume:
        return
    for cfg, out in seeds:
        if (out / RESUME).is_file():
            config = {**run_settings(params, cfg, name), "caches": cache_identities(cfg), "world_size": dist.world_size}
            check_resumable(out / RESUME, config)


def check_same_teacher(cfg: StudentConfig, teacher_sha256: str | None) -> None:
    """A test cache scores agreement and KL against a teacher: it must be the teacher of the training caches."""
    if teacher_sha256 is None or not (cfg.test_cache and Path(cfg.test_cache).exists()):
        return
    with Cache(cfg.test_cache) as cache:
        if cache.teacher_sha256 != teacher_sha256:
            raise LogitcacheError(f"test cache {cfg.test_cache} was made by another teacher checkpoint (sha256 "
                                  f"{cache.teacher_sha256[:16]}…) than {cfg.caches[0]} ({teacher_sha256[:16]}…); "
                                  "dump both splits with the same teacher")


def origin(train: Split, teacher_sha256: str | None, caches: dict[str, str]) -> dict:
    """Where a run's results come from: the teacher checkpoint (None for cross-entropy alone), the identity of
    every cache it read and the training data's fingerprint; `summarize` keeps rows of one teacher and data together."""
    return {"teacher_sha256": teacher_sha256, "caches": caches, "data_fingerprint": train.fingerprint}
