import gzip
import json
from pathlib import Path

import numpy as np
import torch
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


def test_image_folder_is_indexed_in_place_with_measured_statistics(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "raw" / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", source=str(tmp_path / "raw"), root=str(tmp_path / "out"))
    meta = prepare_data(cfg)
    assert meta["classes"] == ["cat", "dog"] and meta["splits"]["train"]["count"] == 6
    split = load_split(cfg, "train")
    assert split.read(5).shape == (3, 20, 24) and split.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (split.sizes == [20, 24]).all() and split.image_size == (20, 24)
    assert 0.3 < split.mean[0] < 0.7


# ---------------------------------------------------------------- every data set end to end, on files in their real formats

def _pickle(path: Path, obj) -> None:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def _write_cifar10(root: Path, train: np.ndarray, train_labels, test: np.ndarray, test_labels, classes) -> None:
    """cifar-10-batches-py as torchvision reads it: five training batches, a test batch and batches.meta;
    rows of 3072 bytes (the R, G and B planes of a 32x32 image), labels under b'labels'."""
    folder = root / "cifar-10-batches-py"
    for k, (images, labels) in enumerate(zip(np.array_split(train, 5), np.array_split(train_labels, 5)), 1):
        _pickle(folder / f"data_batch_{k}", {"data": images.reshape(len(images), -1), "labels": labels.tolist()})
    _pickle(folder / "test_batch", {"data": test.reshape(len(test), -1), "labels": test_labels.tolist()})
    _pickle(folder / "batches.meta", {"label_names": classes})


def _write_cifar100(root: Path, train: np.ndarray, train_labels, test: np.ndarray, test_labels, classes) -> None:
    """cifar-100-python as torchvision reads it: train, test (labels under 'fine_labels') and meta."""
    folder = root / "cifar-100-python"
    for name, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        _pickle(folder / name, {"data": images.reshape(len(images), -1), "fine_labels": labels.tolist(),
                                "coarse_labels": (labels // 5).tolist()})
    _pickle(folder / "meta", {"fine_label_names": classes, "coarse_label_names": [f"c{i}" for i in range(20)]})


def _write_image_folder(root: Path, train: np.ndarray, train_labels, test: np.ndarray, test_labels, classes) -> None:
    """<split>/<class>/<image>.png; files sorted by class then name, as ImageFolder lists them."""
    from PIL import Image

    for split, images, labels in (("train", train, train_labels), ("test", test, test_labels)):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.png")


@pytest.mark.slow
@pytest.mark.parametrize("dataset, num_classes, write", [
    ("cifar10", 10, _write_cifar10), ("cifar100", 100, _write_cifar100), ("imagefolder", 3, _write_image_folder)])
def test_every_data_set_runs_end_to_end_from_its_raw_files(dataset, num_classes, write, tmp_path, monkeypatch):
    """prepare-data -> train-teacher (1 epoch; an image folder, read in place: import-teacher) -> dump-teacher ->
    train-student, through the CLI, never downloading."""
    import torchvision.datasets.cifar
    import yaml
    from click.testing import CliRunner

    from logitcache.cache.reader import Cache
    from logitcache.cli import main

    rng = np.random.default_rng(0)
    classes = [f"class{i:03d}" for i in range(num_classes)]
    n_train, n_test = 60, 20
    train, test = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8) for n in (n_train, n_test))
    train_labels, test_labels = rng.integers(0, num_classes, n_train), rng.integers(0, num_classes, n_test)
    if dataset == "imagefolder":  # ImageFolder knows the classes it finds, and lists samples class by class
        train_labels, test_labels = np.arange(n_train) % 3, np.arange(n_test) % 3
        order_train, order_test = np.argsort(train_labels, kind="stable"), np.argsort(test_labels, kind="stable")
    write(tmp_path / "raw", train, train_labels, test, test_labels, classes)
    # torchvision checks the published files' md5 sums, which files written here cannot have; the reading is real
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"dataset": dataset, "source": str(tmp_path / "raw"), "root": str(tmp_path / "prepared"),
                 "validation": n_train // 4},
        "teacher": {"model": "resnet8", "epochs": 1, "batch_size": 16, "workers": 0, "out": str(tmp_path / "teacher")},
        "dump": {"teacher": str(tmp_path / "teacher" / "teacher.pt"), "views": 2, "layers": ["layer2"],
                 "batch_size": 64, "workers": 0, "out": str(tmp_path / "cache")},
        "students": {"kd": {"model": "cnn_tiny", "epochs": 1, "batch_size": 16, "workers": 0,
                            "caches": [str(tmp_path / "cache" / "train.h5")],
                            "test_cache": str(tmp_path / "cache" / "test.h5"), "out": str(tmp_path / "student")}},
    }))
    teacher = ["train-teacher"]
    if dataset == "imagefolder":  # its images are read one by one: the teacher comes trained, its views are boxes
        from logitcache.core.models import build_model

        torch.manual_seed(0)
        torch.save(build_model("resnet8", 3, 3).state_dict(), tmp_path / "resnet8.pt")
        teacher = ["import-teacher", str(tmp_path / "resnet8.pt"), "--arch", "resnet8", "--resize", "32", "--crop", "32"]
        raw = yaml.safe_load(params.read_text())
        raw["dump"]["augment"] = {"kind": "random_resized_crop"}
        params.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    for command in (["prepare-data"], teacher, ["dump-teacher"], ["train-student", "kd"]):
        result = runner.invoke(main, [*command, "--params", str(params)])
        assert result.exit_code == 0, f"{command}: {result.output}"

    cfg = DataConfig(dataset=dataset, root=str(tmp_path / "prepared"))
    prepared = load_split(cfg, "train")
    if dataset == "imagefolder":
        train, train_labels = train[order_train], train_labels[order_train]
        test, test_labels = test[order_test], test_labels[order_test]
    def images(split):
        return torch.stack([split.read(i) for i in range(len(split))]).numpy() if split.is_files else split.images.numpy()

    assert np.array_equal(images(prepared), train) and np.array_equal(prepared.labels.numpy(), train_labels)
    assert np.array_equal(images(load_split(cfg, "test")), test)
    assert prepared.num_classes == num_classes
    meta = json.loads((tmp_path / "prepared" / dataset / "meta.json").read_text())
    assert meta["classes"] == classes
    if dataset == "imagefolder":  # statistics measured on the training images
        assert np.allclose(meta["mean"], (train / 255.0).mean(axis=(0, 2, 3)), atol=1e-4)
    else:
        assert tuple(meta["mean"]) == DATASETS[dataset].mean
    with Cache(tmp_path / "cache" / "train.h5") as cache:
        assert (cache.num_samples, cache.num_views, cache.num_classes) == (n_train, 2, num_classes)
        assert np.array_equal(cache.read("labels"), train_labels)
        assert cache.logits().shape == (n_train, 2, num_classes)
    student = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert student["mode"] == "kd" and student["labeled"] == n_train - n_train // 4 and 0 <= student["test_acc"] <= 1
