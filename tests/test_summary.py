"""`summarize`: one table of one teacher and data, export figures only beside their own checkpoint, and damaged
metrics files refused in one line before anything is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from logitcache.core.config import validate
from logitcache.core.data import split_identity
from logitcache.core.errors import LogitcacheError
from logitcache.summary import summarize

EXPORT = {"pytorch": {"latency_ms": 0.3}, "onnx_fp32": {"bytes": 40960, "latency_ms": 0.1},
          "onnx_int8": {"bytes": 20480, "acc_drop": 0.003, "latency_ms": 0.08}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(
        content if isinstance(content, str) else json.dumps(content))


def _params(tmp_path, students, data=None):
    return validate({"teacher": {"out": str(tmp_path / "teacher")}, "export": {"out": str(tmp_path / "deploy")},
                     **({"data": data} if data else {}),
                     "students": {name: {"model": "cnn_tiny", "epochs": 1, "out": str(tmp_path / name)}
                                  for name in students}})


def _rows(tmp_path, students: dict, data=None) -> tuple[dict, str]:
    _write(tmp_path / "teacher" / "teacher.pt", b"the teacher")
    _write(tmp_path / "teacher" / "metrics.json", {"test_acc": 0.9, "params": 77754})
    for name, metrics in students.items():
        _write(tmp_path / name / "metrics.json", {"test_acc": 0.8, "params": 9640, **metrics})
    flat = summarize(_params(tmp_path, students, data), tmp_path / "summary")
    return flat, (tmp_path / "summary" / "summary.md").read_text()


def test_only_rows_of_the_teacher_checkpoint_share_the_table_the_others_are_listed_with_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flat, table = _rows(tmp_path, {
        "kd": {"teacher_sha256": sha(b"the teacher"), "caches": {}, "data_fingerprint": None},
        "ce": {"teacher_sha256": None, "caches": {}, "data_fingerprint": None},
        "dkd": {"teacher_sha256": sha(b"another teacher"), "caches": {}, "data_fingerprint": None},
        "old": {}})
    assert sorted(flat) == ["ce", "kd", "teacher"]
    assert f"- dkd: not in the table: distilled from another teacher checkpoint (sha256 {sha(b'another teacher')[:16]}…, " \
           f"teacher.pt is {sha(b'the teacher')[:16]}…); retrain it on the current cache" in table
    assert "- old: not in the table: its metrics.json records no teacher checkpoint or data" in table
    assert "| dkd |" not in table and "| old |" not in table and "| kd |" in table


def test_rows_of_other_data_are_listed_apart(data_cfg, tmp_path):
    fingerprint = split_identity(data_cfg, "train")["fingerprint"]
    flat, table = _rows(tmp_path, {
        "kd": {"teacher_sha256": None, "caches": {}, "data_fingerprint": fingerprint},
        "full": {"teacher_sha256": None, "caches": {}, "data_fingerprint": "f" * 64}}, data=data_cfg.model_dump())
    assert sorted(flat) == ["kd", "teacher"] and "- full: not in the table: trained on other data" in table


def test_export_figures_of_another_checkpoint_are_left_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    origin = {"teacher_sha256": None, "caches": {}, "data_fingerprint": None}
    _write(tmp_path / "kd" / "runs" / "seed0" / "student.pt", b"kd weights")
    _write(tmp_path / "deploy" / "kd" / "metrics.json", {**EXPORT, "checkpoint_sha256": sha(b"kd weights")})
    _write(tmp_path / "deploy" / "teacher" / "metrics.json", {**EXPORT, "checkpoint_sha256": sha(b"an old teacher")})
    flat, table = _rows(tmp_path, {"kd": origin})
    assert flat["kd"]["onnx_bytes"] == 40960 and "onnx_bytes" not in flat["teacher"]
    assert (f"- teacher: export figures in {tmp_path / 'deploy' / 'teacher' / 'metrics.json'} left out: they were "
            "measured on another checkpoint (or record none); rerun logitcache export") in table


def test_a_damaged_student_metrics_file_is_one_line_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "teacher" / "metrics.json", {"test_acc": 0.9, "params": 77754})
    for content, words in (('{"test_acc": 0.9, "par', "is not valid JSON"),
                           ('{"test_acc": "abc"}', "test_acc is not a finite number"),
                           ("[0.9, 0.8]", "holds list, not an object of metrics")):
        _write(tmp_path / "kd" / "metrics.json", content)
        with pytest.raises(LogitcacheError) as e:
            summarize(_params(tmp_path, ["kd"]), tmp_path / "summary")
        assert words in str(e.value) and "\n" not in str(e.value) and str(tmp_path / "kd" / "metrics.json") in str(e.value)
        assert not (tmp_path / "summary").exists()


def test_a_student_run_without_latency_shows_none(tmp_path, monkeypatch):
    """students.NAME.latency: false records latency_ms as null: the summary leaves it out and shows a dash."""
    monkeypatch.chdir(tmp_path)
    origin = {"teacher_sha256": None, "caches": {}, "data_fingerprint": None}
    flat, table = _rows(tmp_path, {"kd": {**origin, "latency_ms": None, "latency_p90_ms": None},
                                   "ce": {**origin, "latency_ms": 0.25}})
    assert "latency_ms" not in flat["kd"] and flat["ce"]["latency_ms"] == 0.25
    kd, ce = (next(line for line in table.splitlines() if line.startswith(f"| {name} |")) for name in ("kd", "ce"))
    assert "0.250" in ce and "0.250" not in kd and "–" in kd
