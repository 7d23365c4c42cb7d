"""Resume bookkeeping of a student run: what fixes its results, and whether a finished run can be kept."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.cache.reader import Cache
from logitcache.core.config import Params, StudentConfig
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_checkpoint
from logitcache.core.training import RESUME


def run_settings(params: Params, cfg: StudentConfig, name: str) -> dict:
    """The settings a run records in resume.pt and student.pt (with its caches' identities, `cache_identities`)."""
    return {"data": params.data.model_dump(mode="json"), "student": cfg.model_dump(mode="json"), "name": name}


def finished_run(out: Path, settings: dict, cfg: StudentConfig) -> dict | None:
    """A resumed multi-seed run skips the seeds whose outputs are complete and made with these settings from these
    caches (where the run is stored and which other seeds it was trained with do not count: a moved run is still
    kept; a re-dumped cache is not the same cache)."""
    if not (out / "student.pt").is_file() or (out / RESUME).exists() or not (out / "metrics.json").is_file():
        return None
    saved = load_checkpoint(out / "student.pt")["config"]
    if _comparable({**saved, "caches": None}) != _comparable(json.loads(json.dumps({**settings, "caches": None}))):
        return None  # other settings: no cache is opened, the run starts and reports its own errors
    try:
        if saved.get("caches") != cache_identities(cfg):
            return None
    except LogitcacheError:  # a cache that cannot be opened now: not kept; training says what is wrong
        return None
    return json.loads((out / "metrics.json").read_text())


def cache_identities(cfg: StudentConfig) -> dict[str, str]:
    """Each cache the run reads (the training caches when it distils, the test cache when it exists) -> its
    identity: a run kept or resumed after a re-dump would hold targets of another teacher."""
    paths = [*(cfg.caches if cfg.loss else []),
             *([cfg.test_cache] if cfg.test_cache and Path(cfg.test_cache).exists() else [])]
    identities = {}
    for path in paths:
        with Cache(path) as cache:
            identities[path] = cache.identity
    return identities


def _comparable(config: dict) -> dict:
    """The settings that fix a run's results: not where it is stored, nor which other seeds it was trained with."""
    return {**config, "student": {k: v for k, v in config["student"].items() if k not in ("out", "seeds")}}
