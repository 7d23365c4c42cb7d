"""Shared fixtures: small slices of the real Fashion-MNIST files, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.core.config import DataConfig, Params, validate
from logitcache.core.data import DATASETS, prepare_data

FMNIST = Path(DATASETS["fashion_mnist"].default_source)


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory) -> DataConfig:
    """Real Fashion-MNIST, first 600 train and 300 test samples."""
    if not FMNIST.exists():
        pytest.fail(f"{FMNIST} missing: install Debian's dataset-fashion-mnist (see .ci/run)")
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("prepared")), train_limit=600, test_limit=300, validation=60)
    prepare_data(cfg)
    return cfg


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

    out = tmp_path_factory.mktemp("teacher")
    params = validate({"data": data_cfg.model_dump(),
                       "teacher": {"model": "resnet8", "epochs": 3, "batch_size": 32, "lr": 0.05, "workers": 0,
                                   "out": str(out)}})
    train_teacher(params)
    return out / "teacher.pt"


@pytest.fixture(scope="session")
def cache_dir(data_cfg, teacher_ckpt, tmp_path_factory):
    """train.h5 (3 views, layer2 pooled to 2x2) and test.h5 from the session teacher."""
    from logitcache.teacher.dump import dump_teacher

    out = tmp_path_factory.mktemp("cache")
    dump_teacher(validate({"data": data_cfg.model_dump(), "dump": {
        "teacher": str(teacher_ckpt), "out": str(out), "views": 3, "layers": ["layer2"], "feature_pool": 2,
        "workers": 0}}))
    return out


@pytest.fixture
def trained_on(monkeypatch):
    """What `train_student` trains on, step by step (workers=0): the (row, view) pairs of the batch, the teacher
    targets and batch (labels, labeled rows) the loss saw, the student's logits and the loss. Records at the seams, leaving the computation untouched."""
    import numpy as np

    from logitcache.student.batches import StudentBatches
    from logitcache.student.train import Learner

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
