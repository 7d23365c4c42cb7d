"""Image folders read in place (logitcache/core/imagefiles.py): the index, its fingerprint and refusals, seeded
stratified subsets, decoding on demand, and box views of the original files replayed byte for byte."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from logitcache.cli import main
from logitcache.core.config import DataConfig, validate
from logitcache.core.data import load_split, prepare_data
from logitcache.core.errors import LogitcacheError
from logitcache.core.imagefiles import stratified

CLASSES = ("cat", "dog", "eel")


def make_tree(root: Path, per_class: dict[str, int], seed: int = 0, side: tuple[int, int] = (40, 120)) -> Path:
    """JPEG trees of varied sizes and aspect ratios; the first image of each class is grey-scale, the second a PNG."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(*side, size=2))
                image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                if i == 0:
                    image.convert("L").save(folder / f"{i}.jpg", quality=90)
                elif i == 1:
                    image.save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i}.jpg", quality=90)
    return root


def data_config(tree: Path, out: Path, **extra) -> DataConfig:
    return DataConfig(dataset="imagefolder", source=str(tree), root=str(out), folders={"train": "train", "test": "val"},
                      validation=2, **extra)


def prepare_args(tree: Path, out: Path) -> list[str]:
    return ["prepare-data", "--dataset", "imagefolder", "--source", str(tree), "-S", f"data.root={out}",
            "-S", "data.folders={train: train, test: val}"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"), {"train": 6, "val": 3})


def test_the_index_records_every_file_and_decodes_as_pil_does(tree, tmp_path):
    cfg = data_config(tree, tmp_path / "prep")
    prepare_data(cfg)
    files = sorted(p.name for p in (tmp_path / "prep" / "imagefolder").iterdir())
    assert files == ["config.json", "meta.json", "test_index.npz", "train_index.npz"]  # no pixel array
    train = load_split(cfg, "train")
    assert len(train) == 18 and train.is_files and train.channels == 3
    for i in (0, 1, 5, 17):
        path = tree / train.index.paths[i].decode()
        expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(train.read(i), expected)
        assert tuple(train.sizes[i]) == tuple(expected.shape[1:])
        assert train.index.sha256[i].tobytes() == hashlib.sha256(path.read_bytes()).digest()
    assert train.labels.tolist() == [c for c in range(3) for _ in range(6)]
    assert load_split(cfg, "test").identity()["count"] == 9


def test_one_changed_byte_of_one_file_changes_the_fingerprint(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 3, "val": 2})
    prepare_data(data_config(tree, tmp_path / "a"))
    victim = tree / "train" / "dog" / "2.jpg"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    prepare_data(data_config(tree, tmp_path / "b"))
    meta = [json.loads((tmp_path / x / "imagefolder" / "meta.json").read_text()) for x in ("a", "b")]
    assert meta[0]["splits"]["train"]["fingerprint"] != meta[1]["splits"]["train"]["fingerprint"]
    assert meta[0]["splits"]["test"]["fingerprint"] == meta[1]["splits"]["test"]["fingerprint"]
    before = load_split(data_config(tree, tmp_path / "a"), "train")  # indexed before the change
    row = before.index.paths.tolist().index(b"train/dog/2.jpg")
    with pytest.raises(LogitcacheError, match=f"image {victim} changed since prepare-data"):
        before.read(row)


def test_an_unreadable_image_is_one_line_naming_it_and_nothing_is_written(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 2, "val": 2})
    bad = tree / "val" / "eel" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    result = CliRunner().invoke(main, prepare_args(tree, tmp_path / "prep"))
    assert result.exit_code == 2
    assert result.output == f"error: image {bad} cannot be read (UnidentifiedImageError); remove or replace it\n"
    assert not (tmp_path / "prep" / "imagefolder" / "meta.json").exists()


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    tree = make_tree(tmp_path / "tree", {"train": 2, "val": 2})
    for image in (tree / "train" / "dog").iterdir():
        image.unlink()
    result = CliRunner().invoke(main, prepare_args(tree, tmp_path / "prep"))
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "Found no valid file for the classes dog" in result.output and str(tree / "train") in result.output


def test_a_missing_split_folder_names_the_folders_setting(tree, tmp_path):
    result = CliRunner().invoke(main, ["prepare-data", "--dataset", "imagefolder", "--source", str(tree),
                                       "-S", f"data.root={tmp_path}"])  # test folder defaults to "test"
    assert result.exit_code == 2
    assert result.output.startswith(f"error: image folder split {tree / 'test'} is missing") and "data.folders" in \
        result.output


def test_a_limit_takes_a_seeded_subset_with_each_class_share():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    rows = stratified(labels, 10, seed=3)
    assert np.bincount(labels[rows]).tolist() == [5, 3, 2] and (np.diff(rows) > 0).all()
    assert not np.array_equal(rows, stratified(labels, 10, seed=4))
    assert np.array_equal(rows, stratified(labels, 10, seed=3))
    odd = stratified(labels, 7, seed=0)  # quotas 3.5, 2.1, 1.4: the largest remainders get the row left over
    assert np.bincount(labels[odd]).tolist() == [4, 2, 1]


def test_a_limited_tree_is_indexed_without_reading_the_other_files(tree, tmp_path, monkeypatch):
    import logitcache.core.imagefiles as imagefiles

    seen = []
    describe = imagefiles._describe
    monkeypatch.setattr(imagefiles, "_describe", lambda source, rel: seen.append(rel) or describe(source, rel))
    prepare_data(data_config(tree, tmp_path / "prep", train_limit=6, test_limit=3))
    assert len(seen) == 9
    train = load_split(data_config(tree, tmp_path / "prep", train_limit=6, test_limit=3), "train")
    assert np.bincount(train.index.labels).tolist() == [2, 2, 2]


MEMORY = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from logitcache.core.config import DataConfig
    from logitcache.core.data import prepare_data
    tree, out = Path(sys.argv[1]), Path(sys.argv[2])
    import torch, torchvision, PIL.Image  # what every run imports, before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepare_data(DataConfig(dataset="imagefolder", source=str(tree), root=str(out), validation=0,
                            folders={"train": "train", "test": "val"}))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


@pytest.mark.slow
def test_preparing_a_tree_holds_no_decoded_image_array(tmp_path):
    """Peak RSS over the imports, for trees of 15 and 150 images of up to 400 x 400: a decoded array of the large
    tree would add about 55 MB."""
    grown = []
    for n in (5, 50):
        tree = make_tree(tmp_path / f"tree{n}", {"train": n, "val": 1}, side=(300, 400))
        done = subprocess.run([sys.executable, "-c", MEMORY, str(tree), str(tmp_path / f"prep{n}")],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        grown.append(int(done.stdout.split()[-1]))
    decoded = 150 * 350 * 350 * 3
    assert grown[1] - grown[0] < decoded / 4, grown


RRC = {"kind": "random_resized_crop", "scale": [0.25, 1.0], "flip": True}


@pytest.mark.slow
def test_box_views_of_image_files_replay_byte_for_byte_for_teacher_and_student(tree, tmp_path):
    from logitcache.core.features import load_teacher
    from logitcache.student.plan import plan_run
    from logitcache.student.sources import make_batches
    from logitcache.student.train import train_student
    from logitcache.teacher.dump import dump_teacher, prepare_split
    from logitcache.teacher.importer import import_teacher

    cfg = data_config(tree, tmp_path / "prep")
    prepare_data(cfg)
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    data = cfg.model_dump()
    import_teacher(validate({"data": data, "teacher": {"model": "torchvision:resnet18", "out": str(tmp_path / "t"),
                                                       "preprocess": {"resize": 40, "crop": 32}}}), weights)
    teacher = tmp_path / "t" / "teacher.pt"
    dump = validate({"data": data, "dump": {"teacher": str(teacher), "out": str(tmp_path / "c"), "views": 3,
                                            "workers": 2, "augment": RRC}})
    dump_teacher(dump)
    with h5py.File(tmp_path / "c" / "train.h5") as f:
        boxes = f["views/box"][:]
        meta = json.loads(f.attrs["transform"])
    assert meta["decoder"]["pillow"] == Image.__version__
    train = load_split(cfg, "train")

    def original(i):
        return torch.from_numpy(np.asarray(Image.open(tree / train.index.paths[i].decode()).convert("RGB")).copy()
                                ).permute(2, 0, 1)

    def independent(i, v, size):
        top, left, h, w, flip = (int(x) for x in boxes[i, v])
        x = TF.resized_crop(original(i), top, left, h, w, [size, size], interpolation=v2.InterpolationMode.BILINEAR,
                            antialias=True)
        return torch.flip(x, [-1]) if flip else x

    job = prepare_split(dump, load_teacher(teacher), "train", torch.device("cpu"))
    for i in (0, 7, 17):
        for v in range(3):
            assert torch.equal(job.dataset[i][0][v], independent(i, v, 32))
    students = validate({"data": data, "students": {"s": {
        "model": "cnn_tiny", "steps": 2, "evaluations": 1, "batch_size": 8, "workers": 0, "image_size": 24,
        "caches": [str(tmp_path / "c" / "train.h5")], "test_cache": str(tmp_path / "c" / "test.h5"),
        "out": str(tmp_path / "s")}}})
    plan = plan_run(students, students.students["s"], "s")
    dataset, sampler = make_batches(students.students["s"], plan)
    sampler.set_epoch(1)
    pairs = next(iter(sampler))
    assert torch.equal(dataset[pairs].images, torch.stack([independent(r, v, 24) for r, v in pairs]))
    assert train_student(students, "s")["test_acc"] is not None


def test_statistics_equal_a_float64_computation_over_the_decoded_training_images(tree, tmp_path):
    prepare_data(data_config(tree, tmp_path / "prep"))
    meta = json.loads((tmp_path / "prep" / "imagefolder" / "meta.json").read_text())
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3)
                             for p in sorted((tree / "train").rglob("*.*"))]).astype(np.float64) / 255.0
    assert meta["mean"] == pixels.mean(axis=0).round(4).tolist()
    assert meta["std"] == pixels.std(axis=0).round(4).tolist()


def test_split_folders_may_be_nested_under_the_source(tmp_path):
    tree = make_tree(tmp_path / "tree" / "images", {"train": 2, "val": 1})
    cfg = DataConfig(dataset="imagefolder", source=str(tmp_path / "tree"), root=str(tmp_path / "prep"), validation=0,
                     folders={"train": "images/train", "test": "images/val"})
    prepare_data(cfg)
    test = load_split(cfg, "test")
    assert test.index.paths[0].decode() == "images/val/cat/0.jpg"
    expected = np.asarray(Image.open(tree / "val" / "cat" / "0.jpg").convert("RGB"))
    assert torch.equal(test.read(0), torch.from_numpy(expected.copy()).permute(2, 0, 1))


def test_preparing_into_the_image_folder_it_reads_is_refused(tree, tmp_path):
    result = CliRunner().invoke(main, prepare_args(tree, tree / "train"))
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert "is inside the image folder data.source" in result.output
    assert not (tree / "train" / "imagefolder").exists()
