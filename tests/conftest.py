"""Shared fixtures: small slices of the real Fashion-MNIST files, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from logitcache.config import DataConfig, Params, validate
from logitcache.data import DATASETS, prepare_data

FMNIST = Path(DATASETS["fashion_mnist"].default_source)


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory) -> DataConfig:
    """Real Fashion-MNIST, first 600 train and 300 test samples."""
    if not FMNIST.exists():
        pytest.fail(f"{FMNIST} missing: install Debian's dataset-fashion-mnist (see .ci/run)")
    cfg = DataConfig(root=str(tmp_path_factory.mktemp("prepared")), train_limit=600, test_limit=300)
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
