"""One writer per output: every command that writes holds its output alone for its whole run (an fcntl.flock,
released by the kernel however the holder ends); a second process gets one line naming the holder's pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.cli import main
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import output_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys\nfrom logitcache.core.io import output_lock\nwith output_lock(sys.argv[1], 'x'):\n" \
       "    print('held', flush=True)\n    sys.stdin.read()\n"


def hold(path: Path) -> subprocess.Popen:
    """Another process holding the output `path` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_second_process_on_a_held_output_gets_one_line_naming_the_holders_pid(tmp_path):
    holder = hold(tmp_path / "out")
    try:
        with pytest.raises(LogitcacheError) as caught, output_lock(tmp_path / "out", "train-student"):
            pytest.fail("took a lock another process holds")
        message = str(caught.value)
        assert "\n" not in message and f"(pid {holder.pid})" in message and str(tmp_path / "out") in message
    finally:
        release(holder)
    with output_lock(tmp_path / "out", "train-student"):  # released when the holder ended
        pass
    assert sorted(tmp_path.iterdir()) == []  # the lock lives outside the user's folders


def test_the_lock_of_a_process_killed_with_sigkill_is_released(tmp_path):
    holder = hold(tmp_path / "out")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with output_lock(tmp_path / "out", "train-student"):
        with pytest.raises(LogitcacheError, match=f"pid {os.getpid()}"):  # held again, now by this process
            with output_lock(tmp_path / "sub" / ".." / "out", "train-student"):  # the same folder by another path
                pass


def _commands(tmp_path: Path, data_root: str, teacher_ckpt: Path) -> dict[str, tuple[list, Path]]:
    """Each writing command with valid arguments, and the output it holds."""
    data = ["-S", f"data.root={data_root}", "-S", "data.train_limit=600", "-S", "data.test_limit=300"]
    return {
        "prepare-data": (["prepare-data", "-S", f"data.root={tmp_path / 'root'}"], tmp_path / "root" / "fashion_mnist"),
        "train-teacher": (["train-teacher", *data, "--out", tmp_path / "teacher"], tmp_path / "teacher"),
        "dump-teacher": (["dump-teacher", *data, "--teacher", teacher_ckpt, "--out", tmp_path / "cache"],
                         tmp_path / "cache"),
        "train-student": (["train-student", "s", *data, "-S", f"students.s.out={tmp_path / 's'}"], tmp_path / "s"),
        "export": (["export", teacher_ckpt, "--name", "m", "--out", tmp_path / "deploy"], tmp_path / "deploy" / "m"),
        "prune": (["prune", teacher_ckpt, "--out", tmp_path / "p.pt"], tmp_path / "p.pt"),
        "summarize": (["summarize", "--out", tmp_path / "summary"], tmp_path / "summary"),
    }


@pytest.mark.parametrize("command", ["prepare-data", "train-teacher", "dump-teacher", "train-student", "export",
                                     "prune", "summarize"])
def test_every_command_that_writes_refuses_an_output_another_process_holds(command, data_cfg, teacher_ckpt, tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml
    work = tmp_path / "work"
    work.mkdir()
    args, output = _commands(work, data_cfg.root, teacher_ckpt)[command]
    holder = hold(output)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        release(holder)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert f"is being written by another process (pid {holder.pid})" in result.output
    assert list(work.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_two_students_started_together_on_one_output_one_trains_the_other_is_refused(data_cfg, cache_dir, tmp_path):
    out = tmp_path / "s"
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": data_cfg.model_dump(mode="json"), "students": {"s": {
        "model": "cnn_tiny", "epochs": 8, "workers": 0, "caches": [str(cache_dir / "train.h5")],
        "test_cache": str(cache_dir / "test.h5"), "out": str(out)}}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "logitcache", "train-student", "s", "--params", str(params),
                               "-S", f"students.s.lr={lr}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for lr in (0.01, 0.02)]
    results = [(proc.pid, *proc.communicate(timeout=300), proc.returncode) for proc in procs]
    assert sorted(code for *_, code in results) == [0, 2], results
    (winner, _, _, _), = [r for r in results if r[3] == 0]
    (_, _, refused, _), = [r for r in results if r[3] == 2]
    assert refused.startswith("error: ") and refused.count("\n") == 1 and f"(pid {winner})" in refused, refused
    lr = json.loads((out / "config.json").read_text())["student"]["lr"]
    assert f"students.s.lr={lr}" in " ".join(procs[[p.pid for p in procs].index(winner)].args)
