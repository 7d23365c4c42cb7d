"""Phase two: train a student against the cache (or, with --online, the live teacher, for reference).

`train_student` trains a student once, or once per seed (in turn, or several at once in worker processes),
and summarises the seeds. Its parts, one concern each:

- `plan`: every input checked before the first step (`plan_run`) -> a `Plan`;
- `sources`: where the batches come from (plain images, random views, replayed cached views);
- `batches`: the (row, view) samplers and the dataset that builds a `TrainBatch`;
- `learner`: the student and its methods as one module, and one step's forward (`Stepper`);
- `online`: the live teacher of --online;
- `run`: one run's loop, evaluation by evaluation, then its test score and outputs;
- `resume`: what fixes a run's results, and whether a finished run is kept.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from logitcache.core import interrupt, provenance
from logitcache.core.config import Params, StudentConfig, save_config
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import check_output_folder, output_lock, write_json
from logitcache.student.checks import ORIGIN, check_seeds
from logitcache.student.run import train_one


def train_student(params: Params, name: str = "default", *, resume: bool = False, dist: Dist = Dist.single(),
                  jobs: int = 1) -> dict:
    """Train student NAME once, or once per seed of `seeds` (in <out>/runs/seed<N>/) with mean and std in <out>.

    `jobs` > 1 trains that many seeds at once, in processes that share the CPU threads (a run's
    bits depend on its thread count, recorded in metrics.json, not on the other jobs). Under torchrun
    every rank trains on its part of each global batch (DDP); rank 0 alone evaluates and
    writes. Returns the metrics on rank 0 and {} on the others.
    """
    with output_lock(params.student(name).out, "train-student", hold=dist.is_main):
        return _train_student(params, name, resume, dist, jobs)


def _train_student(params: Params, name: str, resume: bool, dist: Dist, jobs: int) -> dict:
    cfg = params.student(name)
    out = Path(cfg.out)
    check_output_folder(out, f"students.{name}.out")
    if jobs < 1:
        raise LogitcacheError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and dist.world_size > 1:
        raise LogitcacheError("--jobs trains seeds in separate processes; under torchrun leave it at 1")
    seeds = [(cfg.model_copy(update={"seed": seed}), out / "runs" / f"seed{seed}") for seed in cfg.seeds or []]
    check_seeds(params, name, seeds or [(cfg, out)], resume, dist)
    if not cfg.seeds:
        return train_one(params, cfg, name, out, resume=resume, dist=dist)
    if jobs > 1 and len(seeds) > 1:
        runs = _train_in_parallel(params, seeds, name, resume, jobs)
    else:
        runs = [train_one(params, seed_cfg, name, seed_out, resume=resume, dist=dist) for seed_cfg, seed_out in seeds]
    if not dist.is_main:
        return {}
    return _summarise_seeds(params, cfg, runs)


def _summarise_seeds(params: Params, cfg: StudentConfig, runs: list[dict]) -> dict:
    """<out>/metrics.json (mean and std over seeds), history.json (the mean curve), the first seed's confusion."""
    out = Path(cfg.out)
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
                     "select": runs[0]["select"], **{key: runs[0].get(key) for key in ORIGIN}}
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
