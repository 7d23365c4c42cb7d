"""Shared fixtures: small slices of the real Fashion-MNIST files, prepared once per session.

Under pytest-xdist every worker is a session of its own; `shared` builds such a fixture once for all of them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

from logitcache.core.config import DataConfig, Params, validate
from logitcache.core.data import DATASETS, prepare_data

FMNIST = Path(DATASETS["fashion_mnist"].default_source)
WORKERS = 2  # at most: the suite's torch work shares a machine's cores, and torchrun tests start 2 processes each


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the options
def pytest_cmdline_main(config):
    """With pytest-xdist installed, the suite runs on `-n auto` workers (at most WORKERS, one a core), handing the
    tests of one `xdist_group` to one worker (`--dist loadgroup`), unless `-n` or `--dist` is given. `-n 0` or
    `-p no:xdist` runs it in this one process."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    if hasattr(config, "workerinput"):
        # a worker names each test's group in the ids it collects, which the controller schedules by (under
        # another --dist the names are only shown); the worker cannot see which --dist the controller took
        config.option.loadgroup = True
        return
    if config.option.numprocesses is None and config.option.dist == "no" and not (config.option.usepdb or
                                                                                    config.option.collectonly):
        config.option.numprocesses = "auto"
        config.option.maxprocesses = config.option.maxprocesses or WORKERS
        config.option.dist = "loadgroup"


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each worker computes on one thread, and so do the processes it starts (CLI runs, dvc stages, torchrun ranks):
    # two workers on threads of their own would oversubscribe the cores. One setting for the worker and its children
    # keeps in-process and subprocess results comparable bit for bit.
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def shared(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder `make` fills once per test run: alone, in this session's temporary folder; under pytest-xdist, in
    the folder the workers share, by whichever worker asks first while the others wait on its lock. The folders are
    read, never written, by the tests, so one copy serves every worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        make(out)
        return out
    root = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each worker's popen-gwK/
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`shared` for fixtures of a module, whose tests xdist may hand to different workers."""
    return lambda name, make: shared(tmp_path_factory, name, make)


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory) -> DataConfig:
    """Real Fashion-MNIST, first 600 train and 300 test samples."""
    if not FMNIST.exists():
        pytest.fail(f"{FMNIST} missing: install Debian's dataset-fashion-mnist (see .ci/run)")

    def make(root: Path) -> None:
        prepare_data(DataConfig(root=str(root), train_limit=600, test_limit=300))

    return DataConfig(root=str(shared(tmp_path_factory, "prepared", make)), train_limit=600, test_limit=300,
                      validation=60)


@pytest.fixture
def small_params(data_cfg, tmp_path) -> Params:
    """Params for quick real runs: tiny models, one epoch, outputs in tmp_path."""
    return validate({
        "data": data_cfg.model_dump(),
        "teacher": {"model": "resnet8", "epochs": 2, "batch_size": 32, "lr": 0.05, "workers": 0,
                    "out": str(tmp_path / "teacher")},
    })


@pytest.fixture(scope="session")
def teacher_ckpt(data_cfg, tmp_path_factory):
    """A resnet8 teacher trained for 3 epochs on the 600 real samples."""
    from logitcache.teacher.train import train_teacher

    def make(out: Path) -> None:
        train_teacher(validate({"data": data_cfg.model_dump(),
                                "teacher": {"model": "resnet8", "epochs": 3, "batch_size": 32, "lr": 0.05,
                                            "workers": 0, "out": str(out)}}))

    return shared(tmp_path_factory, "teacher", make) / "teacher.pt"


@pytest.fixture(scope="session")
def cache_dir(data_cfg, teacher_ckpt, tmp_path_factory):
    """train.h5 (3 views, layer2 pooled to 2x2) and test.h5 from the session teacher."""
    from logitcache.teacher.dump import dump_teacher

    def make(out: Path) -> None:
        dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
            "teacher": str(teacher_ckpt), "out": str(out), "views": 3, "layers": ["layer2"], "feature_pool": 2,
            "workers": 0}}))

    return shared(tmp_path_factory, "cache", make)


@pytest.fixture
def trained_on(monkeypatch):
    """What `train_student` trains on, step by step (workers=0): the (row, view) pairs of the batch, the teacher
    targets and batch (labels, labeled rows) the loss saw, the student's logits and the loss. Records at the seams, leaving the computation untouched."""
    import numpy as np

    from logitcache.student.batches import StudentBatches
    from logitcache.student.learner import Learner

    pairs, steps = [], []
    getitem, forward = StudentBatches.__getitem__, Learner.forward

    def record_pairs(self, batch_pairs):
        pairs.append(np.array(batch_pairs))
        return getitem(self, batch_pairs)

    def record_step(self, x, teacher, batch, at):
        loss, logits, terms = forward(self, x, teacher, batch, at)
        steps.append({"pairs": pairs[len(steps)], "targets": teacher, "batch": batch, "logits": logits.detach().clone(),
                      "loss": loss.detach().clone()})
        return loss, logits, terms

    monkeypatch.setattr(StudentBatches, "__getitem__", record_pairs)
    monkeypatch.setattr(Learner, "forward", record_step)
    return steps
