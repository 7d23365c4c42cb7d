"""End to end: the project's dvc.yaml and params.yaml, shrunk through params, in a temporary git repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.xdist_group("pipeline")  # one repository, edited and rebuilt test after test: one worker

ROOT = Path(__file__).resolve().parents[1]
# a fresh CI machine has no git identity
GIT_ENV = {"GIT_AUTHOR_NAME": "logitcache test", "GIT_AUTHOR_EMAIL": "test@logitcache.invalid",
           "GIT_COMMITTER_NAME": "logitcache test", "GIT_COMMITTER_EMAIL": "test@logitcache.invalid"}


def run(repo: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args] if args[0] != "git" else list(args), cwd=repo,
                            capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout + result.stderr


SHRUNK = ("ce", "kd")  # the students kept, besides pruned


def shrink_stages(dvc_yaml: str) -> str:
    """dvc.yaml with a train_student stage for the kept students only."""
    spec = yaml.safe_load(dvc_yaml)
    assert set(SHRUNK) <= set(spec["stages"]["train_student"]["foreach"])
    return dvc_yaml.replace(f"foreach: [{', '.join(spec['stages']['train_student']['foreach'])}]",
                            f"foreach: [{', '.join(SHRUNK)}]", 1)


def shrink(params: dict) -> dict:
    params["data"].update(train_limit=400, test_limit=200, validation=40)
    params["teacher"].update(epochs=1, batch_size=64, workers=0)
    params["dump"].update(views=2, workers=0, batch_size=256)
    params["students"] = {**{name: {**params["students"][name], "steps": 6, "evaluations": 2, "seeds": [0, 1],
                                    "workers": 0} for name in SHRUNK},
                          "pruned": {**params["students"]["pruned"], "epochs": 1, "workers": 0}}
    params["export"].update(latency_runs=5, warmup_runs=1, throughput_runs=1, calibration_images=32)
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    (repo / "dvc.yaml").write_text(shrink_stages((ROOT / "dvc.yaml").read_text()))
    shutil.copy(ROOT / ".dvcignore", repo)
    shutil.copytree(ROOT / "logitcache", repo / "logitcache", ignore=shutil.ignore_patterns("__pycache__"))
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    run(repo, "init", "-q")
    run(repo, "config", "core.analytics", "false")
    run(repo, "repro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline")
    return repo


@pytest.mark.slow
def test_repro_builds_every_stage_with_metrics_and_summary(repo):
    summary = json.loads((repo / "data/summary/metrics.json").read_text())
    assert set(summary) == {"teacher", "ce", "kd", "pruned"}
    assert summary["pruned"]["params"] < summary["teacher"]["params"] and summary["kd"]["onnx_bytes"] > 0
    kd = json.loads((repo / "data/students/kd/metrics.json").read_text())
    assert kd["seeds"] == [0, 1] and "test_acc_std" in kd and set(kd["per_seed"]) == {"0", "1"}
    assert "| kd | cnn_tiny | kd |" in (repo / "data/summary/summary.md").read_text()
    shown = run(repo, "metrics", "show")
    assert "data/students/kd/metrics.json" in shown and "data/teacher/metrics.json" in shown
    assert "confusion.json" in run(repo, "plots", "show", "--json")


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(run(repo, "status", "--json").strip().splitlines()[-1]))


@pytest.mark.parametrize(("edited", "expected"), [
    ("logitcache/student/train.py", {"train_student@ce", "train_student@kd", "train_student_init@pruned"}),
    ("logitcache/core/models.py", {"prepare_data", "train_teacher", "dump_teacher", "train_student@ce",
                                   "train_student@kd", "prune_teacher", "train_student_init@pruned", "export@teacher",
                                   "export@kd", "export@pruned", "summary"}),
])
@pytest.mark.slow
def test_editing_code_marks_the_stages_that_run_it(repo, edited, expected):
    assert changed_stages(repo) == set()
    path = repo / edited
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        assert changed_stages(repo) == expected
    finally:
        path.write_text(original)
    assert changed_stages(repo) == set()


@pytest.mark.slow
def test_changing_one_student_reruns_it_and_the_summary_only(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["students"]["kd"]["loss"]["kd"]["temperature"] = 8.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run(repo, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_student@kd", "export@kd", "summary"}
    diff = run(repo, "metrics", "diff")
    assert "data/students/kd/metrics.json" in diff and "data/deploy/kd/metrics.json" in diff
    assert "data/students/ce/metrics.json" not in diff
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "kd at T=8")


@pytest.mark.slow
def test_exp_run_with_set_param(repo):
    run(repo, "exp", "run", "-S", "students.kd.loss.kd.weight=0.5")
    shown = run(repo, "exp", "show", "--json")
    assert '"weight": 0.5' in shown and "data/students/kd/metrics.json" in shown


@pytest.mark.slow
def test_cache_shared_through_a_local_remote(repo, tmp_path):
    run(repo, "remote", "add", "-d", "team", str(tmp_path / "remote"))
    run(repo, "push", "dump_teacher")
    original = (repo / "data/cache/train.h5").read_bytes()
    shutil.rmtree(repo / "data/cache")
    shutil.rmtree(repo / ".dvc/cache")
    run(repo, "pull", "dump_teacher")
    assert (repo / "data/cache/train.h5").read_bytes() == original
