"""Data that cannot mislabel or fail late: damaged raw and prepared files are one line before any work, an
imagefolder's splits share the training split's classes, and settings only prepare-data applies are refused."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from logitcache.core.config import DataConfig
from logitcache.core.data import DATASETS, load_split
from logitcache.core.errors import LogitcacheError

from refusals import assert_refused, cli

FMNIST = Path(DATASETS["fashion_mnist"].default_source)
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _prepared(data_cfg, tmp_path, edit=None) -> DataConfig:
    root = tmp_path / "prepared"
    shutil.copytree(data_cfg.root, root)
    if edit:
        edit(root / "fashion_mnist")
    return data_cfg.model_copy(update={"root": str(root)})


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# ---------------------------------------------------------------- damaged prepared data


@pytest.mark.parametrize("damage, words", [
    (lambda d: _truncate(d / "meta.json"), "meta.json or config.json is damaged"),
    (lambda d: _truncate(d / "train_labels.npy"), "train_labels.npy is damaged"),
    (lambda d: (d / "test_images.npy").unlink(), "test_images.npy is missing"),
])
def test_damaged_prepared_data_is_refused_before_the_teacher_trains_a_step(damage, words, data_cfg, tmp_path):
    cfg = _prepared(data_cfg, tmp_path, damage)
    result = cli("train-teacher", "-S", f"data.root={cfg.root}", "-S", "data.train_limit=600", "-S",
                 "data.test_limit=300", "-S", "data.validation=60", "-S", "teacher.epochs=1", "-S", "teacher.workers=0",
                 "--out", tmp_path / "teacher")
    assert_refused(result, words, "rerun `logitcache prepare-data`")
    assert not (tmp_path / "teacher").exists()  # no resume.pt of a trained epoch


def test_a_limit_the_prepared_data_was_not_made_with_is_refused_naming_the_command(data_cfg):
    with pytest.raises(LogitcacheError) as e:
        load_split(data_cfg.model_copy(update={"train_limit": 300}), "train")
    assert str(e.value) == ("data was prepared with train_limit=600, the run asks for train_limit=300; run "
                            "`logitcache prepare-data -S data.train_limit=300` first")


# ---------------------------------------------------------------- damaged raw files


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_damaged_fashion_mnist_file_is_one_line_and_leaves_no_prepared_folder(damage, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem in FILES:
        shutil.copy(FMNIST / f"{stem}.gz", raw / f"{stem}.gz")
    target = raw / "t10k-labels-idx1-ubyte.gz"
    if damage == "truncated":
        _truncate(target)
    else:
        target.write_bytes(b"plain bytes, not gzip")
    result = cli("prepare-data", "--source", raw, "--root", tmp_path / "out")
    assert_refused(result, "cannot be read", "truncated or damaged")
    assert not (tmp_path / "out").exists()


def _image_folder(root: Path, classes: dict[str, list[str]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _prepare_folder(source: Path, out: Path):
    return cli("prepare-data", "--dataset", "imagefolder", "--source", source, "--root", out)


def test_an_imagefolder_test_split_with_other_classes_is_refused_naming_them(tmp_path):
    source = _image_folder(tmp_path / "raw", {"train": ["cat", "dog"], "test": ["ant", "cat"]})
    result = _prepare_folder(source, tmp_path / "out")
    assert_refused(result, "has other classes than", "extra: ant; missing: dog")
    assert not (tmp_path / "out").exists()


def test_an_imagefolder_class_without_images_is_one_line(tmp_path):
    source = _image_folder(tmp_path / "raw", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    for image in (source / "test" / "dog").iterdir():
        image.unlink()
    result = _prepare_folder(source, tmp_path / "out")
    assert_refused(result, "put images in every class folder")
    assert not (tmp_path / "out").exists()


def test_an_unreadable_image_is_one_line_naming_it(tmp_path):
    source = _image_folder(tmp_path / "raw", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    (source / "train" / "dog" / "0.png").write_bytes(b"not an image")
    result = _prepare_folder(source, tmp_path / "out")
    assert_refused(result, f"image {source / 'train' / 'dog' / '0.png'} cannot be read", "remove or replace it")
    assert not (tmp_path / "out").exists()


def test_an_imagefolder_takes_its_classes_from_the_training_split(tmp_path):
    source = _image_folder(tmp_path / "raw", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    result = _prepare_folder(source, tmp_path / "out")
    assert result.exit_code == 0, result.output
    cfg = DataConfig(dataset="imagefolder", source=str(source), root=str(tmp_path / "out"))
    assert load_split(cfg, "test").labels.tolist() == [0, 0, 1, 1]
