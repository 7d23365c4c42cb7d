import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from logitcache.cli import main


def _commands():
    return sorted(main.commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "Usage:" in result.output


def test_main_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("prepare-data", "train-teacher", "models", "layers"):
        assert command in result.output


def test_models_lists_small_families_and_torchvision():
    result = CliRunner().invoke(main, ["models"])
    names = result.output.split()
    assert {"resnet20", "resnet32x4", "wrn_40_2", "cnn_tiny", "resnet18", "mobilenet_v3_small"} <= set(names)


def test_layers_lists_feature_nodes():
    result = CliRunner().invoke(main, ["layers", "resnet20"])
    assert result.exit_code == 0
    assert {"layer1", "layer2", "layer3"} <= set(result.output.split())


@pytest.mark.parametrize("args, words", [
    (["layers", "resnet21"], "unknown model 'resnet21'"),
    (["train-teacher", "--model", "nosuchnet"], "unknown model 'nosuchnet'"),
    (["train-teacher", "-S", "teacher.lr=-1"], "teacher.lr"),
    (["train-teacher", "-S", "teacher.colour=red"], "unknown key 'teacher.colour'"),
    (["prepare-data", "--params", "does-not-exist.yaml"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output


def test_prepare_data_command(tmp_path):
    result = CliRunner().invoke(main, ["prepare-data", "--root", str(tmp_path), "-S", "data.train_limit=10",
                                       "-S", "data.test_limit=10"])
    assert result.exit_code == 0, result.output
    assert "train: 10 samples" in result.output
    assert (tmp_path / "fashion_mnist" / "meta.json").is_file()


# Every command that writes, with the key and the argument that names its output folder.
OUTPUT_FOLDERS = [
    ("data.root", ["prepare-data", "--root", "{path}"]),
    ("teacher.out", ["train-teacher", "--out", "{path}"]),
    ("dump.out", ["dump-teacher", "--out", "{path}"]),
    ("students.s.out", ["train-student", "s", "-S", "students.s.out={path}"]),
    ("summarize --out", ["summarize", "--out", "{path}"]),
]
OUTPUT_IDS = [args[0] for _, args in OUTPUT_FOLDERS]


def _refused_before_any_work(result, *words):
    """Exit code 2, one line on stderr naming `words`, nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.mark.parametrize("key, args", OUTPUT_FOLDERS, ids=OUTPUT_IDS)
@pytest.mark.parametrize("where", ["a-file/out", "a-file/deeper/out"])
def test_an_output_folder_behind_a_file_is_refused_and_nothing_is_created(key, args, where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml: built-in defaults, so the other inputs are missing too
    (tmp_path / "a-file").write_text("in the way\n")
    result = CliRunner().invoke(main, [arg.format(path=where) for arg in args])
    _refused_before_any_work(result, f"{key}: {where} cannot be made: a-file is a file, not a folder")
    assert [p.name for p in tmp_path.rglob("*")] == ["a-file"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a mounted /proc")
@pytest.mark.parametrize("key, args", OUTPUT_FOLDERS, ids=OUTPUT_IDS)
def test_an_output_folder_on_a_virtual_file_system_is_refused(key, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [arg.format(path="/proc/logitcache-x") for arg in args])
    _refused_before_any_work(result, f"{key}: cannot create or write /proc/logitcache-x (no folder can be made in "
                                     "/proc: No such file or directory)")
    assert list(tmp_path.iterdir()) == [] and not Path("/proc/logitcache-x").exists()


def test_downloading_into_a_folder_that_cannot_be_made_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("in the way\n")
    result = CliRunner().invoke(main, ["prepare-data", "--root", "prepared", "-S", "data.download=true",
                                       "--source", "a-file/raw"])
    _refused_before_any_work(result, "data.source (data.download: true writes the raw files there): a-file/raw "
                                     "cannot be made: a-file is a file")
    assert [p.name for p in tmp_path.rglob("*")] == ["a-file"]


WITHOUT_WRITE_PERMISSION = """
import json, sys
from click.testing import CliRunner
from logitcache.cli import main
results = [CliRunner().invoke(main, args) for args in json.loads(sys.argv[1])]
print(json.dumps([[r.exit_code, r.stdout, r.stderr] for r in results]))
"""


@pytest.mark.slow
def test_an_output_folder_without_write_permission_is_refused(tmp_path):
    """Run as a user without the right to write into `locked`.

    Root writes anywhere, and this machine's Python lives under /root, where user nobody cannot
    run it; so as root the commands run with every capability dropped (setpriv), which subjects
    root to the folder's permission bits like any other user.
    """
    as_user = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv (util-linux): cannot drop the right to write anywhere")
        as_user = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    runs = [[arg.format(path=str(locked / "out")) for arg in args] for _, args in OUTPUT_FOLDERS]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([*as_user, sys.executable, "-c", WITHOUT_WRITE_PERMISSION, json.dumps(runs)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, check=True)
    for (key, _), (exit_code, stdout, stderr) in zip(OUTPUT_FOLDERS, json.loads(done.stdout), strict=True):
        result = SimpleNamespace(exit_code=exit_code, stdout=stdout, stderr=stderr, output=stdout + stderr)
        _refused_before_any_work(result, f"{key}: cannot create or write {locked / 'out'} (no folder can be made in "
                                         f"{locked}: Permission denied)")
    assert list(locked.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["locked"]


@pytest.mark.parametrize("command, patched, advice", [
    ("dump-teacher", "logitcache.teacher.dump.dump_teacher", "rerun the same command (same arguments) to resume the dump"),
    ("export", "logitcache.deploy.export.export_checkpoint", "rerun the same command"),
    ("train-teacher", "logitcache.teacher.train.train_teacher", "rerun the same command with --resume to continue"),
])
def test_the_interrupt_message_tells_how_to_continue_this_command(command, patched, advice, tmp_path, monkeypatch):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module, _, name = patched.rpartition(".")
    monkeypatch.setattr(importlib.import_module(module), name, interrupted)
    monkeypatch.chdir(tmp_path)
    args = [command] + (["ckpt.pt"] if command == "export" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    assert result.output == f"error: interrupted; unfinished outputs were not written; {advice}\n"


def test_an_error_that_stops_a_progress_bar_starts_a_line_of_its_own(tmp_path):
    """A run stopped mid-bar (a refusal, or Ctrl-C) prints its one line after the bar, not at the end of the bar's."""
    script = tmp_path / "stopped.py"
    script.write_text(
        "import click\n"
        "from tqdm import tqdm\n"
        "from logitcache.cli import main\n"
        "from logitcache.core.errors import LogitcacheError\n"
        "@main.command('stopped')\n"
        "def stopped():\n"
        "    bar = tqdm(range(10), desc='teacher 2/4', leave=False)\n"
        "    batches = iter(bar)\n"
        "    next(batches)  # mid-epoch: the bar is still open when the error reaches the CLI\n"
        "    raise LogitcacheError('stopped mid-epoch')\n"
        "main(['stopped'])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "teacher 2/4" in done.stderr and done.stderr.strip().splitlines()[-1] == "error: stopped mid-epoch"
