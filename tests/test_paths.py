"""Paths that stay where they belong: a name never leaves its folder, a command replaces only files it wrote,
and an output is never one of the command's inputs. Every case runs against a folder of the user's own files
that must survive untouched (docs/reliability.md, "Paths and ownership")."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from logitcache.core.config import validate
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import OWNER_FILE, atomic_folder

from refusals import assert_refused, cli

FAST_EXPORT = ["-S", "export.calibration_cache=null", "-S", "export.latency_runs=1", "-S", "export.warmup_runs=0",
               "-S", "export.throughput_runs=1"]
EXPORTED = ["metrics.json", "model.int8.onnx", "model.onnx", "model.pt2"]


def users_files(folder: Path) -> Path:
    """A folder of the user's own files, one of them hidden and one in a subfolder."""
    (folder / "notes").mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work\n")
    (folder / ".gitignore").write_text("/model.onnx\n")
    (folder / "notes" / "ideas.md").write_text("more work\n")
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its content (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("name", ["..", ".", "", "../sandbox", "a/b", "ABSOLUTE"])
def test_an_export_name_that_is_not_one_plain_name_is_refused_and_the_users_files_survive(name, teacher_ckpt,
                                                                                          tmp_path):
    sandbox = users_files(tmp_path / "sandbox")
    users_files(sandbox / "deploy")
    elsewhere = users_files(tmp_path / "elsewhere")
    name = str(elsewhere) if name == "ABSOLUTE" else name
    before, before_elsewhere = snapshot(sandbox), snapshot(elsewhere)
    result = cli("export", teacher_ckpt, "--name", name, "--out", sandbox / "deploy", *FAST_EXPORT)
    assert_refused(result, "export --name", "is not a plain name")
    assert snapshot(sandbox) == before and snapshot(elsewhere) == before_elsewhere


@pytest.mark.slow
def test_export_keeps_the_files_it_did_not_write_and_replaces_its_own_on_a_rerun(teacher_ckpt, tmp_path):
    folder = users_files(tmp_path / "deploy" / "kd")
    before = snapshot(folder)
    for _ in range(2):
        result = cli("export", teacher_ckpt, "--name", "kd", "--out", tmp_path / "deploy", *FAST_EXPORT)
        assert result.exit_code == 0, result.output
        after = snapshot(folder)
        assert {k: v for k, v in after.items() if k in before} == before
        assert sorted(set(after) - set(before)) == sorted([*EXPORTED, OWNER_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy"]
    assert sorted(p.name for p in (tmp_path / "deploy").iterdir()) == ["kd"]  # no .partial or .replaced left


def test_export_refuses_a_folder_holding_a_file_it_would_write_but_did_not_and_leaves_it(teacher_ckpt, tmp_path):
    folder = users_files(tmp_path / "deploy" / "kd")
    (folder / "metrics.json").write_text('{"mine": true}\n')
    before = snapshot(tmp_path)
    result = cli("export", teacher_ckpt, "--name", "kd", "--out", tmp_path / "deploy", *FAST_EXPORT)
    assert_refused(result, "already holds metrics.json", "move them away")
    assert snapshot(tmp_path) == before


def test_a_failed_folder_fill_leaves_the_folder_and_the_users_files_untouched(tmp_path):
    folder = users_files(tmp_path / "out")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), atomic_folder(folder, "export", "export --name") as tmp:
        (tmp / "model.onnx").write_text("half")
        raise RuntimeError("the exporter failed")
    assert snapshot(tmp_path) == before


def test_a_folder_fill_drops_only_files_its_command_wrote_before(tmp_path):
    folder = users_files(tmp_path / "out")
    with atomic_folder(folder, "export", "export --name") as tmp:
        (tmp / "old.onnx").write_text("first run")
        (tmp / "model.onnx").write_text("first run")
    with atomic_folder(folder, "export", "export --name") as tmp:
        (tmp / "model.onnx").write_text("second run")
    assert (folder / "model.onnx").read_text() == "second run" and not (folder / "old.onnx").exists()
    assert (folder / "thesis.tex").read_text() == "years of work\n" and (folder / ".gitignore").exists()
    with pytest.raises(LogitcacheError, match="already holds thesis.tex"):  # refused before any work
        with atomic_folder(folder, "export", "export --name", ["thesis.tex"]):
            pytest.fail("the work ran")


# ---------------------------------------------------------------- prune


def _teacher_folder(teacher_ckpt, tmp_path) -> Path:
    """The user's teacher folder: checkpoint, its metrics and their own notes."""
    folder = users_files(tmp_path / "teacher")
    for name in ("teacher.pt", "metrics.json"):
        shutil.copy(teacher_ckpt.parent / name, folder / name)
    return folder


@pytest.mark.parametrize("out, words", [
    ("teacher.pt", ["prune.out", "is the checkpoint this command reads"]),  # the checkpoint it reads
    ("x.pt", ["already holds metrics.json", "`logitcache prune` did not write"]),  # beside the teacher's metrics
])
def test_prune_refuses_to_write_onto_its_input_or_another_commands_metrics(out, words, teacher_ckpt, tmp_path):
    folder = _teacher_folder(teacher_ckpt, tmp_path)
    before = snapshot(folder)
    assert_refused(cli("prune", folder / "teacher.pt", "--out", folder / out), *words)
    assert snapshot(folder) == before


def test_prune_run_again_replaces_its_own_outputs_and_keeps_the_users_files(teacher_ckpt, tmp_path):
    folder = users_files(tmp_path / "pruned")
    before = snapshot(folder)
    for ratio in ("0.4", "0.5"):
        result = cli("prune", teacher_ckpt, "--ratio", ratio, "--out", folder / "teacher.pt")
        assert result.exit_code == 0, result.output
    assert {k: v for k, v in snapshot(folder).items() if k in before} == before
    assert '"ratio": 0.5' in (folder / "metrics.json").read_text()


# ---------------------------------------------------------------- outputs that cannot be written


@pytest.mark.parametrize("command", ["prune", "export"])
@pytest.mark.parametrize("where", ["/proc/x", "AFILE/sub"])
def test_an_output_of_export_or_prune_that_cannot_be_written_is_one_line_and_nothing_is_made(command, where,
                                                                                             teacher_ckpt, tmp_path):
    (tmp_path / "afile").write_text("a file")
    out = where.replace("AFILE", str(tmp_path / "afile"))
    out = f"{out}/p.pt" if command == "prune" else out
    before = snapshot(tmp_path)
    result = cli(command, teacher_ckpt, "--out", out, *(FAST_EXPORT if command == "export" else []))
    assert_refused(result, f"{command}.out" if command == "prune" else "export.out")
    assert snapshot(tmp_path) == before


def test_a_student_name_that_is_not_a_plain_name_is_refused():
    for name in ("..", "../kd", "a/b", ""):
        with pytest.raises(LogitcacheError, match="student name .* is not a plain name"):
            validate({"students": {name: {}}})
