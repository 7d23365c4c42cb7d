"""Reliability and security: every fault is injected for real and its outcome checked.

Outcome everywhere: one line `error: <what is wrong>; <what to do>`, exit code 2 through the
CLI, no traceback without --debug, and nothing half-written (docs/reliability.md lists them).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from logitcache.cache.reader import Cache
from logitcache.cli import main
from logitcache.core.config import validate
from logitcache.core.data import IndexedDataset, fingerprint, load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import save_checkpoint
from logitcache.core.models import build_model
from logitcache.core.training import make_loader
from logitcache.core.views import ViewSpec
from logitcache.student.train import train_student
from logitcache.teacher import dump
from logitcache.teacher.dump import dump_teacher

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def data_args(data_cfg) -> list[str]:
    return ["-S", f"data.root={data_cfg.root}", "-S", "data.train_limit=600", "-S", "data.test_limit=300", "-S", "data.validation=60"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *words):
    """Exit 2, exactly one line `error: ...` naming `words`, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output


def assert_one_line(error: LogitcacheError, *words):
    assert "\n" not in str(error), str(error)
    for word in words:
        assert word in str(error)


def run_cli(*args, cwd, **kwargs):
    """The real command in a fresh interpreter (the package from this checkout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "logitcache", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, **kwargs)


def hold_open(path: Path, mode: str) -> subprocess.Popen:
    """Another process holding `path` open with h5py until its stdin closes."""
    code = "import h5py, sys; f = h5py.File(sys.argv[1], sys.argv[2]); print('open', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_cache(cache_dir, tmp_path, name="train.h5") -> Path:
    dst = tmp_path / name
    shutil.copy(cache_dir / name, dst)
    return dst


def dump_params(data_cfg, teacher_ckpt, out, **dump_settings):
    settings = {"teacher": str(teacher_ckpt), "out": str(out), "views": 3, "layers": ["layer2"],
                "feature_pool": 2, "batch_size": 96, "workers": 0, "splits": ["train"], **dump_settings}
    return validate({"data": data_cfg.model_dump(), "dump": settings})


def student_params(data_cfg, cache_dir, out, **student):
    settings = {"model": "cnn_tiny", "epochs": 1, "batch_size": 64, "workers": 0,
                "caches": [str(cache_dir / "train.h5")], "test_cache": None, "out": str(out), **student}
    return validate({"data": data_cfg.model_dump(), "students": {"s": settings}})


def content(path: Path):
    with h5py.File(path, "r") as f:
        arrays = {}
        f.visititems(lambda n, o: arrays.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        return dict(f.attrs), arrays


def assert_same_content(a: Path, b: Path) -> None:
    attrs_a, arrays_a = content(a)
    attrs_b, arrays_b = content(b)
    assert attrs_a == attrs_b and arrays_a.keys() == arrays_b.keys()
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def prepared_copy(data_cfg, tmp_path, edit):
    """A copy of the prepared data with `edit(folder)` applied: data that changed under a cache."""
    root = tmp_path / "prepared"
    shutil.copytree(data_cfg.root, root)
    edit(root / data_cfg.dataset)
    return data_cfg.model_copy(update={"root": str(root)})


# ---------------------------------------------------------------- 1. damaged caches


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _set_attr(name: str, text: str):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            f.attrs[name] = text
    return damage


def _delete(name: str):
    def damage(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            del f[name]
    return damage


DAMAGE = {
    "truncated": (_truncate, ["cannot be opened as HDF5", "truncated", "re-dump it"]),
    "schema version": (_set_attr("schema_version", "3"), ["schema version 3, this logitcache reads 2; re-dump it"]),
    "schema version 1": (_set_attr("schema_version", "1"), ["schema version 1, this logitcache reads 2 (since version 2,",
                                                            "); re-dump it"]),
    "labels missing": (_delete("labels"), ["dataset(s) labels missing; the file is damaged, re-dump it"]),
    "view codes missing": (_delete("views/code"), ["dataset(s) views/code missing; the file is damaged"]),
    "stored form missing": (_delete("features/layer2"), ["dataset(s) features/layer2 missing; the file is damaged"]),
    "logits missing": (_delete("logits"), ["dataset(s) logits missing"]),
    "attribute not JSON": (_set_attr("dataset", "{name: fashion"),
                           ["attribute 'dataset' is not valid JSON; the file is damaged, re-dump it"]),
    "attribute of wrong shape": (_set_attr("teacher", '["resnet8"]'),
                                 ["attribute 'teacher' lacks model, checkpoint_sha256", "re-dump it"]),
    "layers of wrong shape": (_set_attr("layers", '["layer2"]'), ["attribute 'layers' is not a list of layer records"]),
    "layer record of schema 1": (_set_attr("layers", '[{"name": "layer2", "shape": [32, 2, 2], "pooled_to": 2, '
                                                     '"activation": "after"}]'),
                                 ["attribute 'layers' is not a list of layer records", "re-dump it"]),
    "unknown form": (_set_attr("layers", '[{"name": "layer2", "activation": "after", "forms": {"gram": {"shape": [4]}}}]'),
                     ["attribute 'layers' is not a list of layer records", "re-dump it"]),
    "not a cache": (_set_attr("format", '"something-else"'), ["not a logitcache cache"]),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_cache_is_refused_by_reader_inspect_and_verify(case, data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                              monkeypatch):
    damage, words = DAMAGE[case]
    path = copy_cache(cache_dir, tmp_path)
    damage(path)
    with pytest.raises(LogitcacheError) as e:
        Cache(path)
    assert_one_line(e.value, *words)
    monkeypatch.chdir(tmp_path)
    assert_refused(cli("inspect", path), *words)
    assert_refused(cli("inspect", path, "--verify", "--teacher", teacher_ckpt, *data_args(data_cfg)), *words)


def _flip_bytes(path: Path, dataset: str, row: int) -> None:
    """Invert 8 bytes in the middle of the stored chunk that holds `row`, behind HDF5's back."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        info = ds.id.get_chunk_info_by_coord((row // ds.chunks[0] * ds.chunks[0],) + (0,) * (ds.ndim - 1))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        raw = fh.read(8)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in raw))


def test_flipped_bytes_in_a_logits_chunk_fail_their_checksum_everywhere(data_cfg, teacher_ckpt, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr("logitcache.teacher.writer.CHUNK_BYTES", 6000)  # 100 rows of logits per chunk
    [path] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "cache", layers=[]))
    with h5py.File(path, "r") as f:
        assert f["logits"].chunks[0] == 100 and f["logits"].fletcher32
    _flip_bytes(path, "logits", row=250)
    with Cache(path) as cache:
        assert cache.logits(slice(0, 200)).shape == (200, 3, 10)  # other chunks still read
        with pytest.raises(LogitcacheError) as e:
            cache.logits(slice(240, 260))
    assert_one_line(e.value, "dataset /logits failed its checksum", "the file is damaged, re-dump it")
    monkeypatch.chdir(tmp_path)
    # one sampled row is unlikely to fall in the damaged chunk: --verify reads every chunk anyway
    verify = cli("inspect", path, "--verify", "--samples", 1, "--teacher", teacher_ckpt, *data_args(data_cfg))
    assert_refused(verify, "dataset /logits failed its checksum")
    with pytest.raises(LogitcacheError, match="failed its checksum"):
        train_student(student_params(data_cfg, path.parent, tmp_path / "student"), "s")
    assert not (tmp_path / "student" / "student.pt").exists()
    # lazily read in a DataLoader worker, the error still reaches the user as its own single line
    lazy = cli("train-student", "s", *data_args(data_cfg), "-S", f"students.s.caches=[{path}]",
               "-S", "students.s.model=cnn_tiny", "-S", "students.s.epochs=1", "-S", "students.s.workers=1",
               "-S", "students.s.feature_budget_mb=0", "-S", "students.s.test_cache=null",
               "-S", f"students.s.out={tmp_path / 'lazy'}")
    assert lazy.exit_code == 2, lazy.output
    errors = [line for line in lazy.output.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in lazy.output, lazy.output
    assert errors[0].split("error: ", 1)[1].startswith(f"{path}: dataset /logits failed its checksum")


def test_cache_of_another_split_data_set_or_content_is_refused(data_cfg, cache_dir, tmp_path):
    train = load_split(data_cfg, "train")
    with Cache(cache_dir / "test.h5") as other_split, pytest.raises(LogitcacheError) as e:
        other_split.check_matches(train)
    assert_one_line(e.value, "cache was made from split 'test', the training data has split 'train'",
                    "dump the teacher on this data")

    renamed = copy_cache(cache_dir, tmp_path)
    with h5py.File(renamed, "r+") as f:
        identity = json.loads(f.attrs["dataset"])
        f.attrs["dataset"] = json.dumps({**identity, "name": "cifar10"})
    with pytest.raises(LogitcacheError) as e:
        train_student(student_params(data_cfg, cache_dir, tmp_path / "a", caches=[str(renamed)]), "s")
    assert_one_line(e.value, "cache was made from name 'cifar10', the training data has name 'fashion_mnist'")

    def change_one_pixel(folder: Path) -> None:  # same name, split and count: only the content differs
        images = np.load(folder / "train_images.npy")
        images[7, 0, 14, 14] ^= 0xFF
        np.save(folder / "train_images.npy", images)
        meta = json.loads((folder / "meta.json").read_text())
        meta["splits"]["train"]["fingerprint"] = fingerprint(images, np.load(folder / "train_labels.npy"))
        (folder / "meta.json").write_text(json.dumps(meta))

    changed = prepared_copy(data_cfg, tmp_path, change_one_pixel)
    with pytest.raises(LogitcacheError) as e:
        train_student(student_params(changed, cache_dir, tmp_path / "b"), "s")
    assert_one_line(e.value, "cache was made from fingerprint", "the training data has fingerprint")
    assert not files_under(tmp_path / "b")


def test_cache_or_teacher_of_another_normalisation_is_refused(data_cfg, teacher_ckpt, cache_dir, tmp_path):
    """'Another transform': the data now normalises differently from how the teacher saw its inputs."""
    def renormalise(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "mean": [0.5], "std": [0.25]}))

    other = prepared_copy(data_cfg, tmp_path, renormalise)
    with Cache(cache_dir / "train.h5") as cache, pytest.raises(LogitcacheError) as e:
        cache.check_matches(load_split(other, "train"))
    assert_one_line(e.value, "cache was made with normalisation mean [0.286] std [0.353], "
                             "the training data has mean [0.5] std [0.25]; dump the teacher on this data")
    with pytest.raises(LogitcacheError, match="made with normalisation"):
        train_student(student_params(other, cache_dir, tmp_path / "s"), "s")
    with pytest.raises(LogitcacheError) as e:
        dump_teacher(dump_params(other, teacher_ckpt, tmp_path / "cache"))
    assert_one_line(e.value, "was trained with normalisation mean [0.286] std [0.353], the data has mean [0.5]",
                    "retrain the teacher on this data")
    assert not (tmp_path / "cache").exists()


def test_cache_of_another_teacher_is_refused_by_online_and_verify(data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                                 monkeypatch):
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["state_dict"]["fc.bias"] += 0.01  # a retrained teacher: same architecture, other weights
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(LogitcacheError) as e:
        train_student(student_params(data_cfg, cache_dir, tmp_path / "s", online=True, teacher=str(other)), "s")
    assert_one_line(e.value, f"--online teacher {other} is not the checkpoint the cache was made from")
    assert not (tmp_path / "s" / "student.pt").exists()
    monkeypatch.chdir(tmp_path)
    verify = cli("inspect", cache_dir / "train.h5", "--verify", "--teacher", other, *data_args(data_cfg))
    assert_refused(verify, "was made by another teacher checkpoint")


# ---------------------------------------------------------------- 2. bad parameters and arguments

BAD_ARGS = [
    (["train-teacher", "-S", "teacher.epochs=abc"], "invalid -S teacher.epochs=abc: Input should be a valid integer"),
    (["train-teacher", "-S", "teacher.epochs=-1"], "invalid -S teacher.epochs=-1: Input should be greater than or equal to 1"),
    (["train-teacher", "-S", "teacher.colour=red"], "unknown key 'teacher.colour'"),
    (["train-teacher", "--model", "resnet21"], "unknown model 'resnet21' (did you mean"),
    (["train-teacher", "-S", "teacher.out={file}"], "invalid -S teacher.out={file}: is a file, not a folder"),
    (["train-student", "s", "-S", "students.s.loss.kd.temperature=0"], "students.s.loss.kd.temperature: must be > 0"),
    (["train-student", "s", "-S", "students.s.loss.kd.temperature={{start: 4, end: -1, kind: linear}}"],
     "students.s.loss.kd.temperature: must be > 0 (at every point of its schedule)"),
    (["train-student", "s", "-S", "students.s.loss.kd.weight=-0.1"], "students.s.loss.kd.weight: must be >= 0"),
    (["train-student", "s", "-S", "students.s.ce_weight=-1"], "invalid -S students.s.ce_weight=-1: must be >= 0"),
    (["train-student", "s", "-S", "students.s.loss.kd.student_layer=block2"],
     "students.s.loss.kd: unknown key 'student_layer'; kd takes weight, temperature, combine"),
    (["train-student", "s", "-S", "students.s.epochs=-1"], "invalid -S students.s.epochs=-1: Input should be greater than or equal"),
    (["train-student", "s", "-S", "students.s.loss={{distil: {{}}}}"], "students.s.loss: unknown method 'distil'"),
    (["train-student", "s", "-S", "students.s.model=nosuchnet"], "unknown model 'nosuchnet'"),
    (["train-student", "nobody"], "no student 'nobody' in params"),
    (["train-student", "s", "-S", "students.s.seeds=[0, 1, 0]"], "invalid -S students.s.seeds=[0, 1, 0]: seeds must "
     "differ: each trains into <out>/runs/seed<N>/ and the spread is taken over them, got [0, 1, 0]"),
    (["train-student", "s", "-S", "students.s.labeled_indices={dir}"], "invalid -S students.s.labeled_indices={dir}: is a directory; give a file"),
    (["train-student", "s", "-S", "students.s.out={file}"], "invalid -S students.s.out={file}: is a file, not a folder"),
    (["train-student", "s", "{data}", "-S", "students.s.caches=[{dir}]", "-S", "students.s.out={out}"],
     "is a directory; give the .h5 file"),
    (["train-student", "s", "{data}", "-S", "students.s.caches=[missing.h5]", "-S", "students.s.out={out}"],
     "cache missing.h5 does not exist; run `logitcache dump-teacher` first"),
    (["train-student", "s", "{data}", "-S", "students.s.caches=[{cache}]", "-S", "students.s.out={out}",
      "-S", "students.s.labeled_indices=missing.json"], "labeled_indices file missing.json does not exist"),
    (["train-student", "s", "{data}", "-S", "students.s.caches=[{cache}]", "-S", "students.s.out={out}",
      "-S", "students.s.loss={{fitnets: {{pairs: [[block2, layer9]]}}}}"], "does not store layer9:map (cached: layer2:map)"),
    (["dump-teacher", "--views", "0"], "invalid --views (dump.views): views must be >= 1 or 'all', got 0"),
    (["dump-teacher", "--views", "some"], "dump.views"),
    (["dump-teacher", "--topk", "0"], "invalid --topk (dump.topk): Input should be greater than or equal to 1"),
    (["dump-teacher", "-S", "dump.viewz=3"], "unknown key 'dump.viewz'"),
    (["dump-teacher", "-S", "dump.views=0"], "invalid -S dump.views=0: views must be >= 1 or 'all', got 0"),
    (["dump-teacher", "--views", "2", "-S", "dump.views=0"], "invalid -S dump.views=0: views must be"),
    (["dump-teacher", "-S", "dump.augment={{crop_padding: -1}}"],  # {{ }}: braces through str.format
     "invalid -S dump.augment={{crop_padding: -1}}: dump.augment.crop_padding: Input should be greater than or equal"),
    (["dump-teacher", "--out", "{file}"], "invalid --out (dump.out): is a file, not a folder"),
    (["dump-teacher", "--teacher", "{dir}"], "invalid --teacher (dump.teacher): is a directory; give a file path"),
    (["dump-teacher", "{data}", "--teacher", "missing.pt", "--out", "{out}"], "checkpoint missing.pt does not exist"),
    (["dump-teacher", "{data}", "--teacher", "{teacher}", "--out", "{out}", "--topk", "10"],
     "dump.topk=10 must be below the class count 10"),
    (["dump-teacher", "{data}", "--teacher", "{teacher}", "--out", "{out}", "--layers", "layer9"],
     "unknown layer(s) layer9; valid names: "),
    (["prepare-data", "-S", "data.dataset=mnist3"], "invalid -S data.dataset=mnist3: unknown data set 'mnist3'; choose one of fashion_mnist, "),
    (["prepare-data", "--source", "missing-dir", "--root", "{out}"], "data source missing-dir does not exist"),
    (["prepare-data", "--root", "{file}"], "invalid --root (data.root): is a file, not a folder"),
    (["prepare-data", "--params", "{dir}"], "params file {dir} is a directory"),
    (["prepare-data", "--params", "missing.yaml"], "params file missing.yaml does not exist"),
    (["evaluate", "missing.pt"], "checkpoint missing.pt does not exist or is not a file"),
    (["evaluate", "{dir}"], "checkpoint {dir} does not exist or is not a file"),
    (["inspect", "missing.h5"], "cache missing.h5 does not exist"),
    (["inspect", "{dir}"], "cache {dir} is a directory; give the .h5 file"),
    (["layers", "resnet21"], "unknown model 'resnet21'"),
]


@pytest.mark.parametrize("args, words", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_arguments_are_refused_before_any_work(args, words, data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: built-in defaults plus the arguments
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("not a folder\n")
    slots = {"dir": "a-dir", "file": "a-file", "out": "out", "teacher": str(teacher_ckpt),
             "cache": str(cache_dir / "train.h5")}
    expanded = []
    for arg in args:
        expanded += data_args(data_cfg) if arg == "{data}" else [arg.format(**slots)]
    before = set(tmp_path.rglob("*"))
    assert_refused(cli(*expanded), words.format(**slots))
    created = set(tmp_path.rglob("*")) - before
    assert not created, created  # no file, not even an empty output folder


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(cli("evaluate", "missing.pt"), "checkpoint missing.pt does not exist")
    debug = run_cli("--debug", "evaluate", "missing.pt", cwd=tmp_path)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "LogitcacheError: checkpoint missing.pt does not exist" in debug.stderr


# ---------------------------------------------------------------- 3. checkpoints


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_checkpoint_that_would_run_code_is_refused_and_never_runs(data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                                  monkeypatch):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    torch.save({**ckpt, "extra": _RunsCode(marker)}, evil)
    monkeypatch.chdir(tmp_path)
    words = f"checkpoint {evil} holds objects other than tensors and plain data (posix.system); it was refused"
    assert_refused(cli("evaluate", evil), words)
    assert_refused(cli("dump-teacher", "--teacher", evil, "--out", tmp_path / "out", *data_args(data_cfg)), words)
    assert_refused(cli("inspect", cache_dir / "test.h5", "--verify", "--teacher", evil, *data_args(data_cfg)), words)
    with pytest.raises(LogitcacheError, match="refused without running any of it"):
        train_student(student_params(data_cfg, cache_dir, tmp_path / "s", online=True, teacher=str(evil)), "s")
    assert not marker.exists() and not (tmp_path / "out").exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


def _checkpoint(path: Path, data_cfg, model: str, classes: int, *, claims: str | None = None, channels: int = 1):
    """A logitcache checkpoint of `model`, whose model_info names `claims` (default: the model itself)."""
    net = build_model(model, channels, classes)
    info = {"model": claims or model, "in_channels": channels, "num_classes": classes,
            "dataset": {"name": "fashion_mnist"}}
    save_checkpoint(path, net.state_dict(), {"data": data_cfg.model_dump(mode="json")}, model_info=info)
    return path


@pytest.mark.parametrize("model, classes, claims, words", [
    ("resnet20", 10, None, "holds a resnet20 but teacher.model is resnet8; set teacher.model=resnet20 or retrain"),
    ("resnet8", 5, None, "has 5 classes/1 channels, data has 10/1; retrain the teacher on this data"),
    ("cnn_tiny", 10, "resnet8", "does not fit model resnet8"),
])
def test_teacher_checkpoint_that_does_not_match_is_refused(model, classes, claims, words, data_cfg, tmp_path,
                                                          monkeypatch):
    ckpt = _checkpoint(tmp_path / "teacher.pt", data_cfg, model, classes, claims=claims)
    monkeypatch.chdir(tmp_path)
    assert_refused(cli("dump-teacher", "--teacher", ckpt, "--out", tmp_path / "out", *data_args(data_cfg)), words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, classes, claims, words", [
    ("cnn_tiny", 5, None, "checkpoint model cnn_tiny has 5 classes and 1 channel(s), the test data fashion_mnist "
                          "has 10 classes and 1 channel(s); evaluate it on the data it was trained on"),
    ("cnn_small", 10, "cnn_tiny", "does not fit model cnn_tiny"),
])
def test_student_checkpoint_that_does_not_match_is_refused(model, classes, claims, words, data_cfg, tmp_path,
                                                          monkeypatch):
    ckpt = _checkpoint(tmp_path / "student.pt", data_cfg, model, classes, claims=claims)
    monkeypatch.chdir(tmp_path)
    assert_refused(cli("evaluate", ckpt), words)


# ---------------------------------------------------------------- 4. concurrency


def _no_file_locking() -> bool:
    return os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() in ("FALSE", "0")


@pytest.mark.slow
def test_two_students_read_one_cache_at_the_same_time(data_cfg, cache_dir, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": data_cfg.model_dump(mode="json"), "students": {"s": {
        "model": "cnn_tiny", "epochs": 1, "batch_size": 64, "workers": 0, "feature_budget_mb": 0,
        "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5")}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "logitcache", "train-student", "s", "--params", str(params),
                               "-S", f"students.s.out={tmp_path / name}"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("a", "b"))
    assert a["test_acc"] == b["test_acc"] and a["agreement"] == b["agreement"]


def test_overwrite_of_a_cache_another_process_reads_is_refused(data_cfg, teacher_ckpt, cache_dir, tmp_path,
                                                              monkeypatch):
    if _no_file_locking():
        pytest.skip("HDF5_USE_FILE_LOCKING is off: HDF5 cannot see another process's handle")
    (tmp_path / "cache").mkdir()
    path = copy_cache(cache_dir, tmp_path / "cache")
    before = sha256(path)
    monkeypatch.chdir(tmp_path)
    reader = hold_open(path, "r")
    try:
        result = cli("dump-teacher", "--teacher", teacher_ckpt, "--out", path.parent, "--overwrite", "--views", 3,
                     "-S", "dump.splits=[train]", "-S", "dump.feature_pool=2", "-S", "dump.workers=0",
                     *data_args(data_cfg))
    finally:
        release(reader)
    assert_refused(result, f"cache {path} is open in another process; stop it before overwriting")
    assert sha256(path) == before and not path.with_name("train.h5.partial").exists()
    with Cache(path) as cache:
        cache.check_matches(load_split(data_cfg, "train"))


def _fail_writes_after(monkeypatch, calls: int) -> None:
    """HDF5 dataset writes raise ENOSPC after `calls` successful ones: a disk that fills up mid-dump."""
    original = h5py.Dataset.__setitem__
    count = {"n": 0}

    def write(self, key, value):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", write)


def _spy_on_resume(monkeypatch) -> list[int]:
    """Record rows_done of the writer the dump starts filling from."""
    seen: list[int] = []
    original = dump._fill

    def fill(writer, *args, **kwargs):
        seen.append(writer.rows_done)
        return original(writer, *args, **kwargs)

    monkeypatch.setattr(dump, "_fill", fill)
    return seen


def test_dump_onto_a_partial_another_process_writes_is_refused(data_cfg, teacher_ckpt, tmp_path, monkeypatch):
    if _no_file_locking():
        pytest.skip("HDF5_USE_FILE_LOCKING is off: HDF5 cannot see another process's handle")
    params = dump_params(data_cfg, teacher_ckpt, tmp_path / "cache")
    with monkeypatch.context() as m:  # a genuine half-done dump
        _fail_writes_after(m, 5 * 3)
        with pytest.raises(LogitcacheError):
            dump_teacher(params)
    partial = tmp_path / "cache" / "train.h5.partial"
    writer = hold_open(partial, "r+")
    try:
        before = sha256(partial)
        with pytest.raises(LogitcacheError) as e:
            dump_teacher(params)
        assert sha256(partial) == before
        with pytest.raises(LogitcacheError, match="is being written by another process; wait for the dump to finish"):
            Cache(partial)
        assert_refused(cli("inspect", partial), "is being written by another process")
    finally:
        release(writer)
    assert_one_line(e.value, f"{partial} is open in another process (a dump is running); wait for it")
    assert not (tmp_path / "cache" / "train.h5").exists()
    seen = _spy_on_resume(monkeypatch)
    dump_teacher(params)  # once the other process is gone, the same command resumes
    assert seen[0] > 0 and (tmp_path / "cache" / "train.h5").exists() and not partial.exists()


@pytest.mark.slow
def test_sigint_during_the_dump_exits_130_keeps_the_partial_and_a_rerun_resumes(data_cfg, teacher_ckpt, tmp_path,
                                                                               monkeypatch):
    settings = {"views": 8, "layers": ["layer1"], "feature_pool": 14, "batch_size": 64}
    out = tmp_path / "cache"
    partial = out / "train.h5.partial"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "logitcache", "dump-teacher", *data_args(data_cfg), "--teacher",
                             str(teacher_ckpt), "--out", str(out), "-S", "dump.splits=[train]", "-S", "dump.views=8",
                             "-S", "dump.layers=[layer1]", "-S", "dump.feature_pool=14", "-S", "dump.batch_size=64",
                             "-S", "dump.workers=0"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 2_000_000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert not (out / "train.h5").exists(), "the run finished before it was interrupted"
    errors = [line for line in err.splitlines() if "error: " in line]
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1 and "interrupted" in errors[0] and "rerun the same command" in errors[0]
    with h5py.File(partial, "r") as f:
        assert 0 < int(f.attrs["rows_done"]) < 600
    seen = _spy_on_resume(monkeypatch)
    [resumed] = dump_teacher(dump_params(data_cfg, teacher_ckpt, out, **settings))
    [reference] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "reference", **settings))
    assert seen[0] > 0 and not partial.exists()
    assert_same_content(resumed, reference)


# ---------------------------------------------------------------- 5. determinism of loader workers


class _RandomEverywhere:
    """A random transform drawing from torch (crop, flip), numpy and random: every RNG a worker has."""

    def __init__(self, size):
        self.crop_flip = ViewSpec(2, True).random_transform(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        shift = int(np.random.randint(0, 50)) + random.randrange(50)
        return self.crop_flip(image).int() + shift


def test_loader_workers_are_seeded(data_cfg):
    train = load_split(data_cfg, "train")
    small = dataclasses.replace(train, images=train.images[:96], labels=train.labels[:96])
    dataset = IndexedDataset(small, _RandomEverywhere(small.image_size))

    def batches(seed: int) -> list[torch.Tensor]:
        loader = make_loader(dataset, 16, shuffle=True, seed=seed, workers=2, device=torch.device("cpu"))
        return [torch.cat([images.flatten(1), index[:, None]], 1) for images, _, index in loader]

    first = batches(0)
    np.random.seed(1234)  # the parent's RNGs moved on: workers must not inherit them
    random.seed(1234)
    torch.manual_seed(1234)
    again = batches(0)
    other = batches(1)
    assert len(first) == len(again) == 6
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


# ---------------------------------------------------------------- 6. full disk during the dump


def test_full_disk_during_the_dump_keeps_the_partial_and_a_rerun_resumes(data_cfg, teacher_ckpt, tmp_path,
                                                                        monkeypatch):
    [reference] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "reference"))
    params = dump_params(data_cfg, teacher_ckpt, tmp_path / "cache")
    final, partial = tmp_path / "cache" / "train.h5", tmp_path / "cache" / "train.h5.partial"
    with monkeypatch.context() as m:
        _fail_writes_after(m, 5 * 6)  # 5 arrays a batch: the disk fills during the 7th of 19 batches
        with pytest.raises(LogitcacheError) as e:
            dump_teacher(params)
    assert_one_line(e.value, f"writing {partial} failed", "No space left on device",
                    "free disk space and rerun the same command to resume")
    assert not final.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["rows_done"]) == 6 * 32
    seen = _spy_on_resume(monkeypatch)
    dump_teacher(params)
    assert seen == [6 * 32]
    assert not partial.exists()
    assert_same_content(final, reference)


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (needs root and mount permission), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_real_full_disk_during_the_dump(data_cfg, teacher_ckpt, tmp_path, small_disk):
    args = ["dump-teacher", *data_args(data_cfg), "--teacher", teacher_ckpt, "--views", 3, "-S", "dump.splits=[train]",
            "-S", "dump.feature_pool=2", "-S", "dump.batch_size=96", "-S", "dump.workers=0", "--layers", "layer2"]
    [reference] = dump_teacher(dump_params(data_cfg, teacher_ckpt, tmp_path / "reference"))
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 680_000)  # 1.4 MB left: 1 MiB for the writer's reserve, 0.37 MB for a 0.59 MB cache
    full = run_cli(*args, "--out", small_disk / "cache", cwd=tmp_path)
    partial = small_disk / "cache" / "train.h5.partial"
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "rerun" in errors[0]
    assert not (small_disk / "cache" / "train.h5").exists() and partial.exists()
    filler.unlink()
    resumed = run_cli(*args, "--out", small_disk / "cache", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_content(small_disk / "cache" / "train.h5", reference)
