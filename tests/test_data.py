import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from logitcache.core.config import DataConfig
from logitcache.core.data import DATASETS, fingerprint, load_split, prepare_data
from logitcache.core.errors import LogitcacheError

FMNIST = Path(DATASETS["fashion_mnist"].default_source)


def _raw_images(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)


def test_prepared_rows_are_the_raw_files_rows(data_cfg):
    train = load_split(data_cfg, "train")
    raw = _raw_images("train-images-idx3-ubyte.gz")
    assert train.images.shape == (600, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), raw[:600])
    assert train.num_classes == 10 and train.mean == (0.2860,)


def test_fingerprint_is_stable_across_prepares(data_cfg, tmp_path):
    again = DataConfig(root=str(tmp_path), train_limit=600, test_limit=300)
    meta = prepare_data(again)
    first = json.loads((Path(data_cfg.root) / "fashion_mnist" / "meta.json").read_text())
    assert meta["splits"] == first["splits"]
    assert load_split(again, "train").fingerprint == load_split(data_cfg, "train").fingerprint


def test_fingerprint_changes_with_content():
    images = np.zeros((4, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(4)
    base = fingerprint(images, labels)
    changed = images.copy()
    changed[2, 0, 3, 3] = 1
    assert fingerprint(changed, labels) != base
    assert fingerprint(images, labels[::-1].copy()) != base
    assert fingerprint(images[:3], labels[:3]) != base


def test_tampered_prepared_split_is_refused(data_cfg, tmp_path):
    cfg = DataConfig(root=str(tmp_path), train_limit=50, test_limit=50)
    prepare_data(cfg)
    path = tmp_path / "fashion_mnist" / "test_labels.npy"
    labels = np.load(path)
    labels[0] = (labels[0] + 1) % 10
    np.save(path, labels)
    with pytest.raises(LogitcacheError, match="fingerprint"):
        load_split(cfg, "test")


def test_missing_source_and_unprepared_data(tmp_path):
    with pytest.raises(LogitcacheError, match="does not exist"):
        prepare_data(DataConfig(source=str(tmp_path / "nowhere"), root=str(tmp_path)))
    with pytest.raises(LogitcacheError, match="prepare-data"):
        load_split(DataConfig(root=str(tmp_path)), "train")
    with pytest.raises(LogitcacheError, match="not found"):
        prepare_data(DataConfig(source=str(tmp_path), root=str(tmp_path)))


def test_cifar_without_files_says_how_to_fix(tmp_path):
    with pytest.raises(LogitcacheError, match="data.download"):
        prepare_data(DataConfig(dataset="cifar10", source=str(tmp_path), root=str(tmp_path / "out")))


def test_image_folder_is_prepared_resized_with_measured_statistics(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "raw" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", source=str(tmp_path / "raw"), root=str(tmp_path / "out"), image_size=16)
    meta = prepare_data(cfg)
    assert meta["classes"] == ["cat", "dog"] and meta["splits"]["train"]["count"] == 6
    split = load_split(cfg, "train")
    assert split.images.shape == (6, 3, 16, 16) and split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert 0.3 < split.mean[0] < 0.7
