"""Data sets: read raw files once through torchvision.datasets, keep them as uint8 arrays.

`prepare_data` turns any supported data set into the same small layout
(`<root>/<dataset>/{split}_images.npy`, `{split}_labels.npy`, `meta.json`), so every
later phase reads one format, indexes samples stably (row i of a split is sample i),
and can check a split's content fingerprint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from logitcache.core import imagefiles
from logitcache.core.config import DataConfig
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import check_output_folder, output_lock

SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """What the data set's definition fixes: shape, classes and normalisation statistics."""

    channels: int
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    default_source: str
    load: Callable[[DataConfig, str, str], tuple[np.ndarray, np.ndarray, list[str]]] | None
    files: bool = False  # read in place: prepare-data indexes the image files, later stages decode them


def _load_fashion_mnist(cfg: DataConfig, source: str, split: str):
    from torchvision.datasets import FashionMNIST

    if cfg.download:
        ds = FashionMNIST(source, train=split == "train", download=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            _stage_mnist_files(Path(source), Path(tmp) / "FashionMNIST" / "raw")
            try:
                ds = FashionMNIST(tmp, train=split == "train", download=False)
            except Exception as e:  # torchvision's idx parser on a truncated or foreign file
                raise LogitcacheError(f"Fashion-MNIST files in {source} cannot be read ({str(e)[:120] or type(e).__name__}); "
                                      "they are truncated or damaged: reinstall or download them again") from None
    return ds.data.numpy()[:, None], ds.targets.numpy(), list(ds.classes)


def _stage_mnist_files(source: Path, raw: Path) -> None:
    """Lay out idx files (gzipped as Debian ships them, or plain) where torchvision looks."""
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        candidates = [source / stem, source / f"{stem}.gz", source / "FashionMNIST" / "raw" / stem]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise LogitcacheError(
                f"Fashion-MNIST file {stem}[.gz] not found in {source}; install Debian's "
                "dataset-fashion-mnist, set data.source, or set data.download=true"
            )
        opener = gzip.open if found.suffix == ".gz" else open
        try:
            with opener(found, "rb") as src, open(raw / stem, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated gzip ends in EOFError
            raise LogitcacheError(f"Fashion-MNIST file {found} cannot be read ({e or type(e).__name__}); it is truncated "
                                  "or damaged: reinstall dataset-fashion-mnist or download it again") from None


def _load_cifar(cls_name: str):
    def load(cfg: DataConfig, source: str, split: str):
        import torchvision.datasets as tvd

        try:
            ds = getattr(tvd, cls_name)(source, train=split == "train", download=cfg.download)
        except RuntimeError as e:
            raise LogitcacheError(f"{cls_name} not found under {source} ({e}); set data.source or data.download=true") from None
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets), list(ds.classes)

    return load


def _image_folder_classes(source: Path, folders: dict[str, str]) -> list[str]:
    """The classes of the training split; the test split must have the same, or its labels would mean others."""
    found = {}
    for split in SPLITS:
        folder = source / folders[split]
        if not folder.is_dir():
            raise LogitcacheError(f"image folder split {folder} is missing; expected {source}/{folders[split]}/<class>/"
                                  f"<image> (data.folders names each split's folder)")
        found[split] = sorted(p.name for p in folder.iterdir() if p.is_dir())
    extra, missing = sorted(set(found["test"]) - set(found["train"])), sorted(set(found["train"]) - set(found["test"]))
    if extra or missing:
        raise LogitcacheError(f"image folder {source / folders['test']} has other classes than "
                              f"{source / folders['train']} (extra: {', '.join(extra) or 'none'}; missing: "
                              f"{', '.join(missing) or 'none'}); give every split the same class folders")
    if not found["train"]:
        raise LogitcacheError(f"image folder {source / folders['train']} has no class folders; expected "
                              "<split>/<class>/<image>")
    return found["train"]


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(1, 10, (0.2860,), (0.3530,), "/usr/share/datasets/fashion-mnist", _load_fashion_mnist),
    "cifar10": DatasetSpec(3, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "data/raw/cifar10", _load_cifar("CIFAR10")),
    "cifar100": DatasetSpec(3, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "data/raw/cifar100", _load_cifar("CIFAR100")),
    # ImageFolder statistics are not fixed by a definition: they are measured on its training split.
    "imagefolder": DatasetSpec(3, None, None, None, "data/raw/imagefolder", None, files=True),
}


def fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 over sample count, shapes, labels and image bytes: any content change alters it."""
    h = hashlib.sha256()
    h.update(json.dumps({"count": len(labels), "shape": list(images.shape)}).encode())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return h.hexdigest()


def dataset_dir(cfg: DataConfig) -> Path:
    return Path(cfg.root) / cfg.dataset


def prepare_data(cfg: DataConfig) -> dict:
    """Read the raw data set and write the prepared arrays and meta.json; returns the meta."""
    spec = DATASETS[cfg.dataset]
    source = cfg.source or spec.default_source
    check_output_folder(cfg.root, "data.root")
    if cfg.download:
        check_output_folder(source, "data.source (data.download: true writes the raw files there)")
    if not cfg.download and not Path(source).exists():
        raise LogitcacheError(f"data source {source} does not exist; set data.source to the raw files or data.download=true")
    if spec.files and dataset_dir(cfg).resolve().is_relative_to(Path(source).resolve()):
        raise LogitcacheError(f"data.root {cfg.root} is inside the image folder data.source {source}, which "
                              "prepare-data reads; choose a data.root outside it")
    with output_lock(dataset_dir(cfg), "prepare-data"):
        return _prepare_files(cfg, Path(source)) if spec.files else _prepare(cfg, spec, source)


def _prepare(cfg: DataConfig, spec: DatasetSpec, source) -> dict:
    loaded = {split: spec.load(cfg, source, split) for split in SPLITS}  # every raw file read before anything is made
    out = dataset_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": cfg.dataset, "source": str(source), "splits": {}}
    for split in SPLITS:
        images, labels, classes = loaded[split]
        limit = cfg.train_limit if split == "train" else cfg.test_limit
        images, labels = images[:limit], labels[:limit].astype(np.int64)
        _save_array(out / f"{split}_images.npy", images.astype(np.uint8))
        _save_array(out / f"{split}_labels.npy", labels)
        meta["splits"][split] = {"count": int(len(labels)), "fingerprint": fingerprint(images, labels)}
        if split == "train":
            meta["mean"], meta["std"] = _statistics(spec, images)
    meta.update(classes=classes, num_classes=len(classes), channels=int(images.shape[1]), image_size=list(images.shape[2:]))
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    _atomic_write_text(out / "config.json", json.dumps({"data": cfg.model_dump(mode="json")}, indent=2) + "\n")
    return meta


def _prepare_files(cfg: DataConfig, source: Path) -> dict:
    """An image folder: every split scanned, subset and indexed (each file hashed, its size read from its header)
    before anything is written; statistics from a seeded sample of training images, decoded one at a time."""
    classes = _image_folder_classes(source, cfg.folders)
    scanned = {split: imagefiles.scan(source, source / cfg.folders[split], classes) for split in SPLITS}
    indexes = {}
    for split, (paths, labels) in scanned.items():
        rows = imagefiles.stratified(labels, cfg.train_limit if split == "train" else cfg.test_limit, cfg.subset_seed)
        indexes[split] = imagefiles.build_index(source, [paths[i] for i in rows], labels[rows])
    mean, std = imagefiles.streaming_statistics(source, indexes["train"], cfg.stats_images, cfg.subset_seed)
    out = dataset_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": cfg.dataset, "source": str(source), "files": True, "decoder": imagefiles.decoder(),
            "splits": {}, "mean": mean, "std": std, "classes": classes, "num_classes": len(classes), "channels": 3,
            "image_size": None}
    for split, index in indexes.items():
        index.save(out / f"{split}_index.npz")
        meta["splits"][split] = {"count": len(index), "fingerprint": index.fingerprint()}
    _atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    _atomic_write_text(out / "config.json", json.dumps({"data": cfg.model_dump(mode="json")}, indent=2) + "\n")
    return meta


def _statistics(spec: DatasetSpec, train_images: np.ndarray) -> tuple[list[float], list[float]]:
    if spec.mean is not None:
        return list(spec.mean), list(spec.std)
    pixels = train_images.astype(np.float64) / 255.0
    return pixels.mean(axis=(0, 2, 3)).round(4).tolist(), pixels.std(axis=(0, 2, 3)).round(4).tolist()


def _save_array(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Split:
    """One prepared split, held in memory as uint8 (N, C, H, W) with its identity."""

    dataset: str
    name: str
    images: torch.Tensor
    labels: torch.Tensor
    fingerprint: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    @property
    def is_files(self) -> bool:
        return False

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) (height, width) of every original image."""
        return np.tile(np.asarray(self.images.shape[2:], dtype=np.int32), (len(self), 1))

    def read(self, i: int) -> torch.Tensor:
        """Sample i's original uint8 (C, H, W) image."""
        return self.images[i]

    def identity(self) -> dict:
        """What a cache records to prove which data made it."""
        return {"name": self.dataset, "split": self.name, "count": len(self), "fingerprint": self.fingerprint}


def load_split(cfg: DataConfig, split: str) -> Split:
    """Load a prepared split; refuses when prepare-data has not run or its files were changed."""
    folder = dataset_dir(cfg)
    meta = _read_meta(cfg)
    if meta.get("files"):
        return _file_split(meta, folder, split)
    images, labels = (_read_array(folder / f"{split}_{part}.npy") for part in ("images", "labels"))
    expected = meta["splits"][split]["fingerprint"]
    if fingerprint(images, labels) != expected:
        raise LogitcacheError(f"prepared {split} split in {folder} does not match its meta.json fingerprint; rerun prepare-data")
    return Split(
        dataset=meta["dataset"], name=split, images=torch.from_numpy(images), labels=torch.from_numpy(labels),
        fingerprint=expected, num_classes=meta["num_classes"], mean=tuple(meta["mean"]), std=tuple(meta["std"]),
    )


def _file_split(meta: dict, folder: Path, split: str) -> imagefiles.FileSplit:
    index = imagefiles.FileIndex.load(folder / f"{split}_index.npz")
    expected = meta["splits"][split]["fingerprint"]
    if index.fingerprint() != expected:
        raise LogitcacheError(f"prepared {split} index in {folder} does not match its meta.json fingerprint; rerun "
                              "prepare-data")
    return imagefiles.FileSplit(meta["dataset"], split, Path(meta["source"]), index, expected, meta["num_classes"],
                                tuple(meta["mean"]), tuple(meta["std"]))


def split_identity(cfg: DataConfig, split: str) -> dict:
    """A prepared split's identity from meta.json alone, as `Split.identity` gives it, without reading its arrays."""
    meta = _read_meta(cfg)
    entry = meta["splits"][split]
    return {"name": meta["dataset"], "split": split, "count": entry["count"], "fingerprint": entry["fingerprint"]}


def check_prepared(cfg: DataConfig) -> None:
    """Every prepared split's files are there, whole, and hold the counts meta.json records: a run refuses damaged
    data before its first step, not when it reaches the test split. Only the arrays' headers are read (the test
    split's content is read once, after training, where its fingerprint is checked)."""
    meta, folder = _read_meta(cfg), dataset_dir(cfg)
    for split in SPLITS:
        if meta.get("files"):
            if len(imagefiles.FileIndex.load(folder / f"{split}_index.npz")) != meta["splits"][split]["count"]:
                raise LogitcacheError(f"prepared index {folder / f'{split}_index.npz'} does not hold the "
                                      f"{meta['splits'][split]['count']} rows meta.json records; rerun "
                                      "`logitcache prepare-data`")
            continue
        for part in ("images", "labels"):
            path = folder / f"{split}_{part}.npy"
            if _array_rows(path) != meta["splits"][split]["count"]:
                raise LogitcacheError(f"prepared data file {path} does not hold the {meta['splits'][split]['count']} "
                                      "rows meta.json records; rerun `logitcache prepare-data`")


def _array_rows(path: Path) -> int:
    """The row count of a .npy file from its header, after checking the file is as long as the header says."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            whole = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize == os.fstat(f.fileno()).st_size
    except (OSError, ValueError, EOFError) as e:
        what = "is missing" if not path.exists() else f"is damaged ({str(e)[:80]})"
        raise LogitcacheError(f"prepared data file {path} {what}; rerun `logitcache prepare-data`") from None
    if not whole or not shape:
        raise LogitcacheError(f"prepared data file {path} is damaged (truncated); rerun `logitcache prepare-data`")
    return shape[0]


PREPARED_BY = ("train_limit", "test_limit")  # data settings only prepare-data applies
PREPARED_FILES_BY = (*PREPARED_BY, "folders", "subset_seed", "stats_images")  # an image folder's


def _read_meta(cfg: DataConfig) -> dict:
    folder = dataset_dir(cfg)
    if not (folder / "meta.json").is_file():
        raise LogitcacheError(f"no prepared data at {folder}; run `logitcache prepare-data` first")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        made = json.loads((folder / "config.json").read_text())["data"] if (folder / "config.json").is_file() else {}
        meta["splits"]["train"]["fingerprint"], meta["splits"]["test"]["fingerprint"], meta["num_classes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LogitcacheError(f"prepared data {folder}: meta.json or config.json is damaged ({type(e).__name__}: "
                              f"{str(e)[:80]}); rerun `logitcache prepare-data`") from None
    keys = PREPARED_FILES_BY if DATASETS[cfg.dataset].files else PREPARED_BY
    changed = [key for key in keys if key in made and made[key] != getattr(cfg, key)]
    if changed:
        now = " ".join(f"-S data.{key}={getattr(cfg, key)}" for key in changed)
        raise LogitcacheError(f"data was prepared with {', '.join(f'{k}={made[k]}' for k in changed)}, the run asks "
                              f"for {', '.join(f'{k}={getattr(cfg, k)}' for k in changed)}; run `logitcache "
                              f"prepare-data {now}` first")
    return meta


def _read_array(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        what = "is missing" if not path.exists() else f"is damaged ({str(e)[:80]})"
        raise LogitcacheError(f"prepared data file {path} {what}; rerun `logitcache prepare-data`") from None


def holdout(cfg: DataConfig, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of a training split of n rows: `cfg.validation` rows, drawn with
    `validation_seed`, are held out from every model's training and score its epochs instead."""
    if cfg.validation > n // 2:
        raise LogitcacheError(f"data.validation {cfg.validation} would hold out more than half of the {n} training "
                              f"rows; lower it, e.g. -S data.validation={n // 10}")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(cfg.validation_seed).permutation(n)[:cfg.validation]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


class IndexedDataset(Dataset):
    """Yields (image, label, index): the index is the sample's stable row in its split."""

    def __init__(self, split: Split, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.transform(self.split.read(i)), self.split.labels[i], i
