"""dump-teacher under real torchrun (2 processes, gloo on the CPU): shards, merge, resume, errors."""

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from logitcache.cache.format import set_attr
from logitcache.cli import main
from logitcache.core.config import validate
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.core.features import load_teacher
from logitcache.teacher import shards
from logitcache.teacher.dump import dump_shard, dump_teacher, merge_shards, prepare_split
from logitcache.teacher.writer import CacheWriter, _committed_rows_read

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def settings(teacher_ckpt, out, **extra) -> dict:
    return {"teacher": str(teacher_ckpt), "out": str(out), "views": 3, "feature_pool": 2,
            "layers": ["layer1", {"name": "layer2", "forms": ["map", "attention", "embedding"], "p": 3}],
            "workers": 0, "device": "cpu", "batch_size": 64, **extra}  # 21 samples a batch: 15 batches a shard


def write_params(tmp_path, data_cfg, teacher_ckpt, out, **extra) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"data": data_cfg.model_dump(mode="json"),
                                    "dump": settings(teacher_ckpt, out, **extra)}))
    return path


def torchrun(params: Path) -> list[str]:
    return ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "logitcache", "dump-teacher",
            "--params", str(params)]


@pytest.fixture
def one_thread():
    """Each torchrun worker computes on one thread (OMP_NUM_THREADS=1): compare like with like."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(data_cfg, teacher_ckpt, shared_folder):
    """The single-process dump of both splits, made in-process on one thread."""
    def make(out):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            dump_teacher(validate({"data": data_cfg.model_dump(), "dump": settings(teacher_ckpt, out)}))
        finally:
            torch.set_num_threads(threads)

    return shared_folder("reference", make)


def content(path: Path):
    """Every attribute and every dataset (values and storage layout) of an HDF5 file."""
    with h5py.File(path, "r") as f:
        arrays, layout = {}, {}

        def take(name, obj):
            if isinstance(obj, h5py.Dataset):
                arrays[name] = obj[()]
                layout[name] = (obj.shape, obj.dtype, obj.chunks, obj.fletcher32, obj.compression)

        f.visititems(take)
        return dict(f.attrs), arrays, layout


def assert_same_cache(a: Path, b: Path) -> None:
    attrs_a, arrays_a, layout_a = content(a)
    attrs_b, arrays_b, layout_b = content(b)
    assert attrs_a == attrs_b
    assert layout_a == layout_b
    for name in ("logits", "features/layer1", "features/layer2", "attention/layer2", "embedding/layer2", "views/code",
                 "index", "labels"):
        assert name in arrays_a
    for name in arrays_a:
        assert np.array_equal(arrays_a[name], arrays_b[name]), name


def no_shards_left(out: Path) -> bool:
    return not list(out.glob("*.shards"))


@pytest.mark.slow
def test_torchrun_dump_equals_the_single_process_dump_bit_for_bit(data_cfg, teacher_ckpt, reference, tmp_path):
    out = tmp_path / "cache"
    params = write_params(tmp_path, data_cfg, teacher_ckpt, out)
    run = subprocess.run(torchrun(params), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 2  # rank 0 alone reports, once per split
    for split in ("train", "test"):
        assert_same_cache(reference / f"{split}.h5", out / f"{split}.h5")
    assert sorted(p.name for p in out.iterdir()) == ["test.h5", "train.h5"]  # shards and partials are gone
    verified = CliRunner().invoke(main, ["inspect", str(out / "train.h5"), "--verify", "--params", str(params)])
    assert verified.exit_code == 0, verified.output
    assert "-> OK" in verified.output


@pytest.mark.slow
def test_invalid_input_fails_on_every_rank_with_the_same_one_line_error(data_cfg, teacher_ckpt, tmp_path):
    params = write_params(tmp_path, data_cfg, teacher_ckpt, tmp_path / "cache", layers=["layer9"])
    run = subprocess.run(torchrun(params), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and errors[0] == errors[1], run.stderr[-3000:]
    assert errors[0].startswith("error: unknown layer(s) layer9; valid names:")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.h5*"))


def _worker(torchrun_pid: int, rank: int) -> int | None:
    """The pid of the torchrun child that runs `rank` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _rows_done(partial: Path) -> tuple[int, bool]:
    """rows_done of a partial written by a stopped process, and whether its committed rows read back."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["rows_done"]), _committed_rows_read(f)
    except (OSError, KeyError):
        return 0, False


def _wait(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_rank_resumes_its_own_shard_and_a_complete_shard_is_kept(data_cfg, teacher_ckpt, reference,
                                                                          tmp_path, one_thread):
    out = tmp_path / "cache"
    params = write_params(tmp_path, data_cfg, teacher_ckpt, out, splits=["train"])
    shard0, shard1 = (out / "train.shards" / f"train-0000{r}-of-00002.h5" for r in (0, 1))
    partial1 = shard1.with_name(shard1.name + ".partial")
    job = subprocess.Popen(torchrun(params), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        _wait(lambda: _worker(job.pid, 1) is not None, 60, "rank 1 to start")
        rank1 = _worker(job.pid, 1)
        deadline = time.time() + 120
        while True:  # freeze rank 1 at a moment where its partial holds some committed rows that read back
            assert time.time() < deadline, "rank 1 wrote no rows"
            time.sleep(0.05)
            if not partial1.exists():
                continue
            os.kill(rank1, signal.SIGSTOP)
            _wait(lambda: _state(rank1) == "T", 10, "rank 1 to stop")
            done, readable = _rows_done(partial1)  # the file is still now: what SIGKILL will leave
            if 0 < done < 306 and readable:
                break
            os.kill(rank1, signal.SIGCONT)
        os.kill(rank1, signal.SIGKILL)
        assert job.wait(timeout=120) != 0  # torchrun tears the job down (rank 0 too)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert not (out / "train.h5").exists() and partial1.exists()
    with h5py.File(partial1, "r") as f:
        assert int(f.attrs["rows_done"]) == done
    # ranks meet after every batch, so rank 0 stopped mid-shard too: complete its shard on its own, in-process
    dump_params = validate({"data": data_cfg.model_dump(), "dump": settings(teacher_ckpt, out, splits=["train"])})
    split_job = prepare_split(dump_params, load_teacher(teacher_ckpt), "train", torch.device("cpu"))
    dump_shard(split_job, shards.plan(split_job.path, split_job.n, split_job.per_batch, 2)[0], progress=False)
    assert shard0.exists() and partial1.exists()
    rerun = subprocess.run(torchrun(params), capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"rank 0: {shard0} is complete, kept" in rerun.stderr
    assert f"rank 1: resuming {partial1} at row {done} of 306" in rerun.stderr
    assert_same_cache(reference / "train.h5", out / "train.h5")
    assert no_shards_left(out)


def test_merge_refuses_a_missing_incomplete_or_foreign_shard_naming_it(data_cfg, teacher_ckpt, reference, tmp_path,
                                                                       monkeypatch, capsys, one_thread):
    params = validate({"data": data_cfg.model_dump(), "dump": settings(teacher_ckpt, tmp_path, splits=["train"])})
    job = prepare_split(params, load_teacher(teacher_ckpt), "train", torch.device("cpu"))
    plan = shards.plan(job.path, job.n, job.per_batch, 2)
    assert [(s.start, s.stop) for s in plan] == [(0, 294), (294, 600)]  # whole batches of 21 samples
    dump_shard(job, plan[0], progress=False)

    def refused(state: str):
        return pytest.raises(LogitcacheError, match=f"^shard {re.escape(str(plan[1].path))} is {re.escape(state)}; "
                                                    "rerun the same torchrun command to (resume|redo) it$")

    with refused("missing"):
        merge_shards(job, plan)
    import logitcache.teacher.dump as dump_module

    original, calls = dump_module._rows, []

    def killed_at_third_batch(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return original(*args)

    monkeypatch.setattr(dump_module, "_rows", killed_at_third_batch)
    with pytest.raises(RuntimeError, match="killed"):
        dump_shard(job, plan[1], progress=False)
    monkeypatch.setattr(dump_module, "_rows", original)
    with refused("incomplete (its .partial is still there)"):
        merge_shards(job, plan)
    assert not job.path.exists() and not job.path.with_name("train.h5.partial").exists()

    dump_shard(job, plan[1], progress=False)
    assert f"rank 1: resuming {plan[1].path}.partial at row 42 of 306" in capsys.readouterr().err  # 2 batches of 21
    with h5py.File(plan[1].path, "r+") as f:
        good = f.attrs["shard"]
        set_attr(f, "shard", {"run_key": "another command"})
    with pytest.raises(LogitcacheError, match=f"shard {re.escape(str(plan[1].path))} was written by another dump"):
        merge_shards(job, plan)
    with h5py.File(plan[1].path, "r+") as f:
        f.attrs["shard"] = good
    assert merge_shards(job, plan) == job.path
    assert_same_cache(reference / "train.h5", job.path)
    assert no_shards_left(tmp_path)


def test_unreadable_partial_is_an_error_and_is_kept(tmp_path, monkeypatch):
    arrays = {"index": ((), "int64")}
    CacheWriter(tmp_path / "c.h5", 10, arrays, "key", "none", False).close()
    partial = tmp_path / "c.h5.partial"
    real = h5py.File

    def denied(path, mode="r", *args, **kwargs):
        if mode == "r+":
            raise PermissionError(13, f"Unable to synchronously open file (errno = 13, 'Permission denied') {path}")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr("logitcache.teacher.writer.h5py.File", denied)
    with pytest.raises(LogitcacheError, match=f"^{re.escape(str(partial))} cannot be opened for writing "
                                              r"\(permission denied\); fix its permissions"):
        CacheWriter(tmp_path / "c.h5", 10, arrays, "key", "none", False)
    assert partial.exists()


class Exchange:
    """all_reduce(sum) between threads: stands in for gloo to test the meeting protocol of `shards.on_every_rank`."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=10)  # a protocol mismatch breaks it instead of hanging
        self.values: list = [None] * world
        self.meetings = [0] * world

    def sum(self, rank: int, values: list[float]) -> list[float]:
        self.values[rank] = values
        self.meetings[rank] += 1
        self.barrier.wait()
        total = [sum(v[i] for v in self.values) for i in range(len(values))]
        self.barrier.wait()
        return total


@dataclass(frozen=True)
class ThreadDist(Dist):
    exchange: Exchange | None = None

    def sum(self, values: list[float]) -> list[float]:
        try:
            return self.exchange.sum(self.rank, values)
        except threading.BrokenBarrierError:
            raise RuntimeError("Connection closed by peer") from None  # what gloo says when a rank died


def run_ranks(work: dict):
    """Run shards.on_every_rank(dist, work[rank]) on one thread per rank; each rank's result or exception."""
    exchange, results = Exchange(len(work)), {}

    def rank_main(rank):
        try:
            results[rank] = shards.on_every_rank(ThreadDist(rank, len(work), rank, exchange=exchange), work[rank])
        except Exception as e:
            results[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, exchange


def test_ranks_meet_after_every_unit_of_work_and_one_failure_stops_all():
    def units(count, fail_at=None):
        def step(heartbeat):
            for i in range(count):
                if i == fail_at:
                    raise LogitcacheError(f"bad sample {i}")
                heartbeat()
            return count
        return step

    # a rank with little left to do (a resumed shard) waits in many short meetings, never in one long one
    results, exchange = run_ranks({0: units(2), 1: units(7)})
    assert results == {0: 2, 1: 7}
    assert exchange.meetings == [8, 8]  # 7 beats of the busy rank and the final "all done"
    results, _ = run_ranks({0: units(50), 1: units(7, fail_at=3)})
    assert str(results[1]) == "bad sample 3"
    assert isinstance(results[0], LogitcacheError) and "another rank failed" in str(results[0])
    results, _ = run_ranks({0: units(0, fail_at=None), 1: units(1, fail_at=0)})  # failure during validation
    assert str(results[1]) == "bad sample 0" and "another rank failed" in str(results[0])

    def dies(heartbeat):  # killed without a word: it never meets again
        heartbeat()
        heartbeat.dist.exchange.barrier.abort()
        raise ProcessLookupError("killed")

    results, _ = run_ranks({0: units(5), 1: dies})
    assert str(results[0]).startswith("rank 0: lost contact with another rank (Connection closed by peer); rerun")
