"""DDP training under a real `torchrun` with 2 CPU processes (gloo)."""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import ddp_launch
import numpy as np
import pytest
import torch
import yaml

from logitcache.core import models
from logitcache.core.config import validate
from logitcache.core.distributed import Dist
from logitcache.core.io import load_checkpoint
from logitcache.student.batches import ViewBatchSampler
from logitcache.student.train import train_student

TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH")


def torchrun(args, params_path, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "logitcache", *args,
                           "--params", str(params_path)], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("mode", ["random", "round-robin"])
@pytest.mark.parametrize("rows,batch", [(100, 32), (101, 32), (97, 16)])
def test_ranks_split_each_global_batch_into_the_single_process_batch(mode, rows, batch):
    ids = np.arange(rows)
    single = ViewBatchSampler(ids, 3, batch, mode, seed=5)
    ranks = [ViewBatchSampler(ids, 3, batch, mode, seed=5, dist=Dist(rank=r, world_size=2)) for r in range(2)]
    for epoch in range(2):
        for s in (single, *ranks):
            s.set_epoch(epoch)
        parts = [[[tuple(pair) for pair in batch.tolist()] for batch in r] for r in ranks]
        assert len(parts[0]) == len(parts[1]) == len(ranks[0])  # every rank steps the same number of times
        whole = [[tuple(pair) for pair in b.tolist()] for b in single if len(b) >= 2]
        assert len(whole) == len(parts[0])
        for full, a, b in zip(whole, *parts):
            assert sorted(a + b) == sorted(full) and not set(a) & set(b)


def student_settings(cache_dir, out, **extra):
    return {"model": "cnn_tiny", "epochs": 4, "batch_size": 64, "lr": 0.05, "workers": 0,
            "device": "cpu", "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
            "out": str(out), **extra}


@pytest.mark.slow
def test_one_ddp_step_equals_one_single_process_step_of_the_same_global_batch(data_cfg, cache_dir, tmp_path,
                                                                            monkeypatch):
    """The whole training set in one global batch of 600, one epoch: exactly one optimizer step on 2 ranks
    (300 pairs each, gradients averaged by DDP) and on 1 process. A model without BatchNorm (tests/ddp_launch.py),
    whose forward pass does not depend on how the batch is split, must end with the same weights."""
    def params_for(name):
        settings = student_settings(cache_dir, tmp_path / name, model=ddp_launch.NAME, epochs=1, batch_size=600)
        return {"data": data_cfg.model_dump(), "students": {"kd": settings}}

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params_for("ddp")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node=2", ddp_launch.__file__, "train-student", "kd",
                             "--params", str(params_path)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("student kd (kd): test accuracy") == 1  # rank 0 alone reports and writes
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == \
        ["config.json", "confusion.json", "history.json", "metrics.json", "student.pt"]
    assert [h["epoch"] for h in json.loads((tmp_path / "ddp" / "history.json").read_text())] == [1]

    monkeypatch.setitem(models._MODELS, ddp_launch.NAME, ddp_launch.cnn_tiny_no_bn)
    assert train_student(validate(params_for("one")), "kd")["world_size"] == 1
    ddp = load_checkpoint(tmp_path / "ddp" / "student.pt")["state_dict"]
    one = load_checkpoint(tmp_path / "one" / "student.pt")["state_dict"]
    torch.manual_seed(0)  # the runs seed torch with the student seed, 0, before building the model
    initial = ddp_launch.cnn_tiny_no_bn(1, 10).state_dict()
    assert ddp.keys() == one.keys() == initial.keys() and not any("running" in k for k in ddp)
    for key in ddp:
        assert torch.allclose(ddp[key], one[key], rtol=0, atol=1e-6), key
    assert not torch.allclose(ddp["fc.weight"], initial["fc.weight"], atol=1e-4)  # and that step moved the weights


@pytest.mark.slow
def test_ddp_teacher_trains_and_rank_0_writes_the_checkpoint(data_cfg, tmp_path):
    raw = {"data": data_cfg.model_dump(),
           "teacher": {"model": "resnet8", "epochs": 2, "batch_size": 32, "lr": 0.05, "workers": 0, "device": "cpu",
                       "out": str(tmp_path / "teacher")}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    result = torchrun(["train-teacher"], params_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("teacher resnet8: test accuracy") == 1
    metrics = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test_acc"] > 0.2  # chance is 0.1
    assert not (tmp_path / "teacher" / "resume.pt").exists()


@pytest.mark.slow
def test_batch_size_that_does_not_split_over_ranks_is_one_line_error(data_cfg, tmp_path):
    raw = {"data": data_cfg.model_dump(),
           "teacher": {"model": "resnet8", "epochs": 1, "batch_size": 33, "workers": 0, "device": "cpu",
                       "out": str(tmp_path / "teacher")}}
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw))
    result = torchrun(["train-teacher"], params_path)
    assert result.returncode != 0
    assert "error: batch_size 33 does not split evenly over 2 processes" in result.stderr
    assert not (tmp_path / "teacher" / "teacher.pt").exists()


def children(pid: int) -> list[int]:
    """The pids of a process's children (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _wait_gone(pids: list[int], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        assert time.monotonic() < deadline, f"processes {pids} still alive"
        time.sleep(0.02)


@pytest.mark.slow
def test_ddp_student_killed_then_resumed_equals_an_uninterrupted_ddp_run_to_the_bit(data_cfg, cache_dir, tmp_path):
    def params_for(name, **extra):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"data": data_cfg.model_dump(), "students": {
            "kd": student_settings(cache_dir, tmp_path / name, epochs=6, batch_size=32, **extra)}}))
        return path

    reference = torchrun(["train-student", "kd"], params_for("ref"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "logitcache", "train-student", "kd",
                            "--params", str(params_for("run"))], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "run" / "resume.pt").exists():
        assert job.poll() is None and time.monotonic() < deadline, "no resume.pt before the job ended"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    ranks = children(job.pid)
    assert len(ranks) == 2
    for pid in [*ranks, job.pid]:  # the whole job: the ranks run in sessions of their own, apart from the agent's
        os.kill(pid, signal.SIGKILL)
    job.wait()
    _wait_gone(ranks)
    assert not (tmp_path / "run" / "student.pt").exists()
    saved_epoch = load_checkpoint(tmp_path / "run" / "resume.pt")["epoch"]
    assert 1 <= saved_epoch < 6

    resumed = torchrun(["train-student", "kd", "--resume"], params_for("run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    message = f"{tmp_path / 'run' / 'resume.pt'}: resuming at evaluation {saved_epoch + 1} of 6"
    assert resumed.stdout.count(message) == 1  # continued where the killed job had committed, said once by rank 0
    a = load_checkpoint(tmp_path / "ref" / "student.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "run" / "student.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
