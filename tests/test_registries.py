"""One registry per kind of thing: a data set, a stored form or a runtime registered in one place works end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.core.config import validate
from logitcache.core.data import DATASETS, DatasetSpec, load_split, prepare_data
from logitcache.core.errors import LogitcacheError


def _stripes(cfg, source: str, split: str):
    """A tiny 2-class data set made here: horizontal stripes against vertical stripes, 8x8, one channel."""
    n = 80 if split == "train" else 40
    labels = np.arange(n) % 2
    images = np.zeros((n, 1, 8, 8), dtype=np.uint8)
    images[labels == 0, :, ::2, :] = 255
    images[labels == 1, :, :, ::2] = 255
    return images, labels, ["horizontal", "vertical"]


def test_a_data_set_registered_in_one_place_is_valid_config_and_trains_a_student(tmp_path, monkeypatch):
    with pytest.raises(LogitcacheError, match="unknown data set 'stripes'"):
        validate({"data": {"dataset": "stripes"}})
    monkeypatch.setitem(DATASETS, "stripes", DatasetSpec(1, 2, (0.25,), (0.43,), str(tmp_path), _stripes))
    data = {"dataset": "stripes", "root": str(tmp_path / "prepared"), "validation": 10}
    params = validate({"data": data, "students": {"s": {
        "model": "cnn_tiny", "loss": {}, "steps": 4, "batch_size": 16, "workers": 0, "test_cache": None,
        "out": str(tmp_path / "student")}}})
    prepare_data(params.data)
    train = load_split(params.data, "train")
    images, labels, _ = _stripes(None, "", "train")
    assert torch.equal(train.images, torch.from_numpy(images)) and train.labels.tolist() == labels.tolist()
    from logitcache.student.train import train_student

    metrics = train_student(params, "s")
    assert metrics["steps"] == 4 and (tmp_path / "student" / "student.pt").is_file()
