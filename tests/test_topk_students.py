"""benchmarks/topk_students.py's synthetic data set: files in CIFAR-100's format that torchvision and
prepare-data read, balanced, reproducible from their seed, and learnable."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import topk_students  # noqa: E402


def test_synthetic_cifar100_is_read_by_torchvision_and_prepare_data(tmp_path, monkeypatch):
    import torchvision.datasets
    import torchvision.datasets.cifar

    from logitcache.core.config import DataConfig
    from logitcache.core.data import load_split, prepare_data

    topk_students.synthetic_cifar100(tmp_path / "raw", train_per_class=3, test_per_class=2, seed=5)
    # the files are ours, so they cannot have the md5 sums of the published ones; the reading is real
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    for train, per_class in ((True, 3), (False, 2)):
        ds = torchvision.datasets.CIFAR100(str(tmp_path / "raw"), train=train)
        assert ds.data.shape == (100 * per_class, 32, 32, 3) and ds.data.dtype == np.uint8
        assert len(ds.classes) == 100
        assert np.bincount(ds.targets, minlength=100).tolist() == [per_class] * 100
        raw = pickle.loads((tmp_path / "raw" / "cifar-100-python" / ("train" if train else "test")).read_bytes())
        assert raw["coarse_labels"] == [label // 5 for label in ds.targets]
        # a row is the R, G and B planes one after the other: pixel (0, 1) of image 0 is bytes 1, 1025, 2049
        assert ds.data[0, 0, 1].tolist() == [raw["data"][0][1], raw["data"][0][1025], raw["data"][0][2049]]

    cfg = DataConfig(dataset="cifar100", source=str(tmp_path / "raw"), root=str(tmp_path / "prepared"), validation=0)
    meta = prepare_data(cfg)
    assert meta["num_classes"] == 100 and meta["image_size"] == [32, 32] and meta["channels"] == 3
    assert load_split(cfg, "test").images.shape == (200, 3, 32, 32)


def test_synthetic_cifar100_is_the_same_from_the_same_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        topk_students.synthetic_cifar100(tmp_path / name, train_per_class=2, test_per_class=1, seed=seed)
    read = {name: (tmp_path / name / "cifar-100-python" / "train").read_bytes() for name in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]


def test_synthetic_classes_are_told_apart_by_their_training_means():
    """Learnable: a nearest-class-mean classifier, in float64, on unshifted samples is far above chance (1 %)."""
    protos = topk_students.prototypes(0)
    rng = np.random.default_rng(0)
    train, train_labels = topk_students.samples(protos, 10, rng, shift=0, blend=0.5, noise=0.8)
    test, test_labels = topk_students.samples(protos, 3, rng, shift=0, blend=0.5, noise=0.8)
    train, test = (x.reshape(len(x), -1).astype(np.float64) for x in (train, test))
    means = np.stack([train[train_labels == c].mean(axis=0) for c in range(100)])
    nearest = ((test[:, None, :] - means[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (nearest == test_labels).mean() > 0.5
