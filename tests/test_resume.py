"""Killed and interrupted training runs: nothing claims to be complete, and --resume continues to the same bits."""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
import yaml

from logitcache.cache.reader import Cache
from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_checkpoint
from logitcache.core.training import RESUME
from logitcache.student.batches import CachedColumn
from logitcache.student.train import train_student
from logitcache.teacher.train import train_teacher


def teacher_settings(tmp_path, epochs=4):
    return {"model": "resnet8", "epochs": epochs, "batch_size": 32, "lr": 0.05, "workers": 1,
            "out": str(tmp_path / "teacher")}


def student_settings(cache_dir, tmp_path, **extra):
    return {"model": "cnn_tiny", "epochs": 4, "batch_size": 32, "lr": 0.05, "workers": 1,
            "caches": [str(cache_dir / "train.h5")], "test_cache": str(cache_dir / "test.h5"),
            "out": str(tmp_path / "student"), **extra}


def write_params(tmp_path, raw: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def start(args, params_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "logitcache", *args, "--params", str(params_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def stop_after_an_epoch(proc, resume_file, sig, timeout=240.0):
    """Wait until an epoch's resumable state exists, wait a random moment more, then send `sig`."""
    deadline = time.monotonic() + timeout
    while not resume_file.exists():
        assert proc.poll() is None, f"run ended before its first epoch was saved: {proc.communicate()}"
        assert time.monotonic() < deadline, "no resume.pt in time"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.8))
    assert proc.poll() is None, "run finished before it could be stopped; raise its epochs"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def same_weights(a, b):
    sa, sb = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "img_per_s")} for h in history]


@pytest.mark.slow
def test_teacher_sigkill_then_resume_equals_an_uninterrupted_run_to_the_bit(data_cfg, tmp_path):
    reference = train_teacher(validate({"data": data_cfg.model_dump(), "teacher": teacher_settings(tmp_path / "ref")}))
    run = tmp_path / "run"
    run.mkdir()
    params_path = write_params(run, {"data": data_cfg.model_dump(), "teacher": teacher_settings(run)})
    code, _, _ = stop_after_an_epoch(start(["train-teacher"], params_path), run / "teacher" / RESUME, signal.SIGKILL)
    assert code == -signal.SIGKILL
    out = run / "teacher"
    assert not (out / "teacher.pt").exists() and not (out / "metrics.json").exists()
    assert not list(out.glob("*.tmp"))
    saved_epoch = load_checkpoint(out / RESUME)["epoch"]
    assert 1 <= saved_epoch < 4

    resumed = subprocess.run([sys.executable, "-m", "logitcache", "train-teacher", "--resume", "--params",
                              str(params_path)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{out / RESUME}: resuming at epoch {saved_epoch + 1} of 4" in resumed.stdout  # continued, not restarted
    assert f"epoch {saved_epoch}/4" not in resumed.stdout and "epoch 4/4" in resumed.stdout
    assert same_weights(out / "teacher.pt", tmp_path / "ref" / "teacher" / "teacher.pt")
    assert json.loads((out / "metrics.json").read_text())["test_acc"] == reference["test_acc"]
    ref_history = json.loads((tmp_path / "ref" / "teacher" / "history.json").read_text())
    assert without_timing(json.loads((out / "history.json").read_text())) == without_timing(ref_history)
    assert not (out / RESUME).exists()  # finished: nothing left to resume


@pytest.mark.slow
def test_teacher_sigint_exits_130_with_one_line_and_leaves_only_resumable_state(data_cfg, tmp_path):
    params_path = write_params(tmp_path, {"data": data_cfg.model_dump(), "teacher": teacher_settings(tmp_path)})
    code, _, err = stop_after_an_epoch(start(["train-teacher"], params_path), tmp_path / "teacher" / RESUME,
                                       signal.SIGINT)
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
    out = tmp_path / "teacher"
    assert sorted(p.name for p in out.iterdir()) == [RESUME]
    assert load_checkpoint(out / RESUME)["epoch"] >= 1


@pytest.mark.slow
def test_student_sigkill_keeps_finished_seeds_and_resumes_the_rest_to_the_bit(data_cfg, cache_dir, tmp_path):
    ref = validate({"data": data_cfg.model_dump(),
                    "students": {"kd": student_settings(cache_dir, tmp_path / "ref", seeds=[0, 1])}})
    reference = train_student(ref, "kd")
    run = tmp_path / "run"
    run.mkdir()
    params_path = write_params(run, {"data": data_cfg.model_dump(),
                                     "students": {"kd": student_settings(cache_dir, run, seeds=[0, 1])}})
    out = run / "student"
    code, _, _ = stop_after_an_epoch(start(["train-student", "kd"], params_path), out / "runs" / "seed1" / RESUME,
                                     signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not (out / "metrics.json").exists() and not (out / "runs" / "seed1" / "student.pt").exists()
    finished = (out / "runs" / "seed0" / "student.pt").stat().st_mtime_ns
    killed = out / "runs" / "seed1" / RESUME
    saved_epoch = load_checkpoint(killed)["epoch"]
    assert 1 <= saved_epoch < 4

    resumed = subprocess.run([sys.executable, "-m", "logitcache", "train-student", "kd", "--resume", "--params",
                              str(params_path)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"kd seed 0 already finished, kept ({out / 'runs' / 'seed0'})" in resumed.stdout
    assert f"{killed}: resuming at evaluation {saved_epoch + 1} of 4" in resumed.stdout  # the killed seed continues
    assert (out / "runs" / "seed0" / "student.pt").stat().st_mtime_ns == finished  # seed 0 was not retrained
    for seed in (0, 1):
        assert same_weights(out / "runs" / f"seed{seed}" / "student.pt",
                            tmp_path / "ref" / "student" / "runs" / f"seed{seed}" / "student.pt")
    again = json.loads((out / "metrics.json").read_text())
    assert again["per_seed"] == reference["per_seed"]


@pytest.mark.slow
def test_student_sigint_leaves_no_finished_outputs(data_cfg, cache_dir, tmp_path):
    params_path = write_params(tmp_path, {"data": data_cfg.model_dump(),
                                          "students": {"kd": student_settings(cache_dir, tmp_path, epochs=10)}})
    code, _, err = stop_after_an_epoch(start(["train-student", "kd"], params_path), tmp_path / "student" / RESUME,
                                       signal.SIGINT)
    assert code == 130 and err.strip().splitlines()[-1].startswith("error: interrupted")
    assert sorted(p.name for p in (tmp_path / "student").iterdir()) == [RESUME]


def test_resume_with_other_settings_is_refused_naming_them(data_cfg, cache_dir, tmp_path):
    settings = student_settings(cache_dir, tmp_path, epochs=1, workers=0)
    params = validate({"data": data_cfg.model_dump(), "students": {"kd": settings}})
    out = tmp_path / "student"
    out.mkdir()
    torch.save({"state_dict": {}, "config": json.dumps({"data": {}, "student": {}, "name": "kd"}), "epoch": 1},
               out / RESUME)
    with pytest.raises(LogitcacheError, match=r"other settings \(.*student\.lr.*\); rerun without --resume"):
        train_student(params, "kd", resume=True)


@pytest.mark.slow
def test_a_run_without_resume_starts_over_and_removes_stale_state(data_cfg, cache_dir, tmp_path):
    params = validate({"data": data_cfg.model_dump(),
                       "students": {"kd": student_settings(cache_dir, tmp_path, epochs=1, workers=0)}})
    out = tmp_path / "student"
    out.mkdir()
    (out / RESUME).write_bytes(b"stale")
    metrics = train_student(params, "kd")
    assert metrics["test_acc"] > 0 and not (out / RESUME).exists() and (out / "student.pt").is_file()


@pytest.mark.slow
def test_non_finite_student_loss_stops_naming_the_step_and_writes_no_model(data_cfg, cache_dir, tmp_path,
                                                                                monkeypatch):
    params = validate({"data": data_cfg.model_dump(),
                       "students": {"kd": student_settings(cache_dir, tmp_path, epochs=2, workers=0)}})
    take, calls = CachedColumn.take, []

    def poisoned(self, rows, views):  # the third batch of the second epoch gets a NaN teacher target
        calls.append(1)
        values = take(self, rows, views)
        return values.fill_(float("nan")) if len(calls) == 17 + 3 else values  # 540 training rows: 17 batches

    monkeypatch.setattr(CachedColumn, "take", poisoned)
    with pytest.raises(LogitcacheError, match=r"non-finite at step 20; nothing was saved since step 17 "):
        train_student(params, "kd")
    assert not (tmp_path / "student" / "student.pt").exists()
    assert not (tmp_path / "student" / "metrics.json").exists()
    assert load_checkpoint(tmp_path / "student" / RESUME)["epoch"] == 1  # the last good epoch stays resumable


@pytest.mark.slow
def test_seeds_trained_at_once_give_the_bits_of_seeds_trained_in_turn_and_a_moved_run_is_kept(
        data_cfg, cache_dir, tmp_path, capfd):
    def params(folder, **extra):
        return validate({"data": data_cfg.model_dump(),
                         "students": {"kd": student_settings(cache_dir, folder, seeds=[0, 1], epochs=2, **extra)}})

    at_once = train_student(params(tmp_path / "once"), "kd", jobs=2)
    printed = capfd.readouterr().out
    assert "kd seed 0 step" in printed and "kd seed 1 step" in printed  # each worker's lines name its seed
    assert at_once["threads"] == max(1, torch.get_num_threads() // 2)  # the jobs share this process's threads
    threads = torch.get_num_threads()
    torch.set_num_threads(int(at_once["threads"]))  # bits depend on a run's thread count, not on other jobs
    try:
        in_turn = train_student(params(tmp_path / "turn"), "kd")
    finally:
        torch.set_num_threads(threads)
    for seed in (0, 1):
        assert same_weights(tmp_path / "once" / "student" / "runs" / f"seed{seed}" / "student.pt",
                            tmp_path / "turn" / "student" / "runs" / f"seed{seed}" / "student.pt")
    assert at_once["per_seed"] == in_turn["per_seed"]

    (tmp_path / "once" / "student").rename(tmp_path / "moved")  # other folder, same settings: nothing retrained
    again = train_student(params(tmp_path / "moved_parent", out=str(tmp_path / "moved")), "kd", resume=True)
    printed = capfd.readouterr().out
    assert all(f"kd seed {s} already finished, kept ({tmp_path / 'moved' / 'runs' / f'seed{s}'})" in printed
               for s in (0, 1))
    assert again["per_seed"] == in_turn["per_seed"]
    with pytest.raises(LogitcacheError, match="under torchrun leave it at 1"):
        from logitcache.core.distributed import Dist
        train_student(params(tmp_path / "ddp"), "kd", jobs=2, dist=Dist(rank=0, world_size=2, local_rank=0))


def workers_of(pid: int) -> list[int]:
    """The processes `pid` spawned to train seeds (not its resource tracker), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_seeds_trained_at_once_stop_with_their_parent(data_cfg, cache_dir, tmp_path, sig):
    """A signal to the parent alone (as a scheduler or `kill` sends it): SIGINT stops every seed at its next step,
    SIGKILL leaves workers that exit at once; no seed trains on to its end either way."""
    params_path = write_params(tmp_path, {"data": data_cfg.model_dump(), "students": {
        "kd": student_settings(cache_dir, tmp_path, seeds=[0, 1], epochs=500)}})
    proc = start(["train-student", "kd", "--jobs", "2"], params_path)
    runs = tmp_path / "student" / "runs"
    deadline = time.monotonic() + 240
    while not all((runs / f"seed{s}" / RESUME).exists() for s in (0, 1)):  # both seeds are training
        assert proc.poll() is None, f"run ended before both seeds saved an epoch: {proc.communicate()}"
        assert time.monotonic() < deadline, "no resume.pt for both seeds in time"
        time.sleep(0.05)
    workers = workers_of(proc.pid)
    assert len(workers) == 2
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    deadline = time.monotonic() + 30
    while not all(ended(w) for w in workers):
        assert time.monotonic() < deadline, "the workers train on without their parent"
        time.sleep(0.1)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted")
    else:
        assert proc.returncode == -signal.SIGKILL
    for s in (0, 1):  # stopped mid-run: resumable state, never a finished-looking seed
        assert (runs / f"seed{s}" / RESUME).exists() and not (runs / f"seed{s}" / "student.pt").exists()
        assert load_checkpoint(runs / f"seed{s}" / RESUME)["epoch"] < 500


def test_a_finished_seed_is_retrained_on_resume_after_the_cache_is_dumped_again(data_cfg, cache_dir, tmp_path, capfd):
    cache, test_cache = tmp_path / "train.h5", tmp_path / "test.h5"
    shutil.copyfile(cache_dir / "train.h5", cache)
    shutil.copyfile(cache_dir / "test.h5", test_cache)
    params = validate({"data": data_cfg.model_dump(),
                       "students": {"kd": student_settings(cache_dir, tmp_path, caches=[str(cache)], seeds=[0],
                                                           test_cache=str(test_cache), epochs=1, workers=0)}})
    seed0 = tmp_path / "student" / "runs" / "seed0"
    train_student(params, "kd")
    train_student(params, "kd", resume=True)
    assert f"kd seed 0 already finished, kept ({seed0})" in capfd.readouterr().out

    for path in (cache, test_cache):  # as if both splits were dumped again from another teacher checkpoint
        with h5py.File(path, "r+") as f:
            teacher = json.loads(f.attrs["teacher"])
            f.attrs["teacher"] = json.dumps({**teacher, "checkpoint_sha256": "0" * 64}, sort_keys=True)
    train_student(params, "kd", resume=True)
    printed = capfd.readouterr().out
    assert "already finished" not in printed and "kd seed 0 step" in printed  # trained again, from its first step
    kept = load_checkpoint(seed0 / "student.pt")["config"]["caches"]
    with Cache(cache) as reopened:
        assert kept[str(cache)] == reopened.identity == hashlib.sha256(json.dumps(
            {k: v for k, v in reopened.meta.items() if k != "logitcache_version"}, sort_keys=True).encode()).hexdigest()


def test_a_ce_student_needs_no_training_cache_and_is_kept_on_resume(data_cfg, cache_dir, tmp_path, capfd):
    params = validate({"data": data_cfg.model_dump(),
                       "students": {"ce": student_settings(cache_dir, tmp_path, caches=[str(tmp_path / "none.h5")],
                                                           loss={}, seeds=[0], epochs=1, workers=0)}})
    train_student(params, "ce")  # a CE student reads no training cache: one that was never dumped is no error
    train_student(params, "ce", resume=True)
    assert f"ce seed 0 already finished, kept ({tmp_path / 'student' / 'runs' / 'seed0'})" in capfd.readouterr().out


def test_a_resume_file_of_an_older_layout_is_refused_in_one_line(data_cfg, cache_dir, tmp_path):
    """resume.pt written before its state was renamed (e.g. the learner's parts) is refused, not loaded half-way."""
    from logitcache.core.io import save_checkpoint

    settings = student_settings(cache_dir, tmp_path, epochs=1, workers=0)
    params = validate({"data": data_cfg.model_dump(), "students": {"kd": settings}})
    out = tmp_path / "student"
    out.mkdir()
    train_student(params, "kd")
    saved = load_checkpoint(out / "student.pt")["config"]
    (out / "student.pt").unlink()
    old = {**saved, "world_size": 1}  # the settings an older logitcache recorded: no layout
    save_checkpoint(out / RESUME, {"learner": {"extractor.conv.weight": torch.zeros(1)}}, old, epoch=1, history="[]")
    with pytest.raises(LogitcacheError, match=r"resume.pt was saved with other settings \(resume_layout\); rerun "
                                              "without --resume"):
        train_student(params, "kd", resume=True)
