"""A student run checks before its work: every seed's saved state against the settings, both prepared splits,
a test cache of the same teacher; and its metrics.json says which teacher, caches and data it used."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import pytest

from logitcache.cache.reader import Cache
from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.student.run import Run
from logitcache.student.train import train_student


def _params(data_cfg, cache_dir, out, **student):
    settings = {"model": "cnn_tiny", "steps": 6, "evaluations": 2, "batch_size": 64, "workers": 0,
                "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"), "out": str(out),
                **student}
    return validate({"data": data_cfg.model_dump(), "students": {"s": settings}})


def test_resume_with_a_changed_setting_is_refused_before_any_seed_is_trained(data_cfg, cache_dir, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "s"
    params = _params(data_cfg, cache_dir, out, seeds=[0, 1])
    train = Run.train_until_evaluation

    def interrupted_in_seed_1(self, evaluation):
        if self.job.cfg.seed == 1 and evaluation == 1:
            raise KeyboardInterrupt
        return train(self, evaluation)

    monkeypatch.setattr(Run, "train_until_evaluation", interrupted_in_seed_1)
    with pytest.raises(KeyboardInterrupt):
        train_student(params, "s")
    monkeypatch.setattr(Run, "train_until_evaluation", train)
    seed0 = (out / "runs" / "seed0" / "student.pt").read_bytes()
    assert (out / "runs" / "seed1" / "resume.pt").is_file()

    changed = _params(data_cfg, cache_dir, out, seeds=[0, 1], lr=0.2)
    with pytest.raises(LogitcacheError) as e:
        train_student(changed, "s", resume=True)
    assert str(e.value) == (f"{out / 'runs' / 'seed1' / 'resume.pt'} was saved with other settings (student.lr); "
                            "rerun without --resume to start over")
    assert (out / "runs" / "seed0" / "student.pt").read_bytes() == seed0  # the finished seed was not retrained


def test_resume_with_nothing_to_resume_says_it_starts_over(data_cfg, cache_dir, tmp_path, capsys):
    train_student(_params(data_cfg, cache_dir, tmp_path / "s", steps=2, evaluations=1), "s", resume=True)
    assert "resume.pt not found: nothing to resume, training from the first evaluation" in capsys.readouterr().out


def test_a_test_cache_of_another_teacher_is_refused_before_training(data_cfg, cache_dir, tmp_path):
    other = tmp_path / "test.h5"
    shutil.copy(cache_dir / "test.h5", other)
    with h5py.File(other, "r+") as f:
        teacher = json.loads(f.attrs["teacher"])
        f.attrs["teacher"] = json.dumps({**teacher, "checkpoint_sha256": "0" * 64})
    with pytest.raises(LogitcacheError, match=r"^test cache .*test.h5 was made by another teacher checkpoint \(sha256 "
                                              r"0000000000000000…\) than .*train.h5 .*; dump both splits with the same "
                                              "teacher$"):
        train_student(_params(data_cfg, cache_dir, tmp_path / "s", test_cache=str(other)), "s")
    assert not (tmp_path / "s").exists()


def test_damaged_prepared_test_split_is_refused_before_the_student_trains(data_cfg, cache_dir, tmp_path):
    root = tmp_path / "prepared"
    shutil.copytree(data_cfg.root, root)
    (root / "fashion_mnist" / "test_images.npy").unlink()
    params = _params(data_cfg.model_copy(update={"root": str(root)}), cache_dir, tmp_path / "s")
    with pytest.raises(LogitcacheError, match="test_images.npy is missing; rerun `logitcache prepare-data`"):
        train_student(params, "s")
    assert not (tmp_path / "s").exists()


def test_metrics_record_the_teacher_checkpoint_the_caches_and_the_data(data_cfg, teacher_ckpt, cache_dir, tmp_path):
    out = tmp_path / "s"
    train_student(_params(data_cfg, cache_dir, out, seeds=[0], steps=2, evaluations=1), "s")
    meta = json.loads((Path(data_cfg.root) / "fashion_mnist" / "meta.json").read_text())
    caches = {}
    for path in (cache_dir / "train.h5", cache_dir / "test.h5"):
        with Cache(path) as cache:
            caches[str(path)] = cache.identity
    for metrics in (out / "metrics.json", out / "runs" / "seed0" / "metrics.json"):
        m = json.loads(metrics.read_text())
        assert m["teacher_sha256"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()
        assert m["caches"] == caches and m["data_fingerprint"] == meta["splits"]["train"]["fingerprint"]
