"""The comparison of every model in params.yaml: one metrics file and one Markdown table.

Only rows of one teacher and one data set share the table: a student whose metrics.json records another
teacher checkpoint or other training data (or records neither) is listed below it with the reason, and an
export's figures are shown only beside the checkpoint they were measured on.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from logitcache.core import provenance
from logitcache.core.config import Params
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import atomic_write, check_output_folder, output_lock, write_json
from logitcache.core.runtimes import RUNTIMES, RuntimeSpec

COLUMNS = ("test_acc", "val_acc", "agreement", "kl_to_teacher", "params", "compression", "latency_ms", "steps",
           "train_seconds",
           *(f"{spec.short}_{name}" for spec in RUNTIMES.values() for name in ("bytes", "acc_drop", "latency_ms")))


def summarize(params: Params, out: str | Path = "data/summary") -> dict:
    """Collect the teacher's and every student's metrics.json, and their exports' where exported (logitcache
    export --name <row>); write <out>/metrics.json and summary.md."""
    check_output_folder(out, "summarize --out")
    with output_lock(out, "summarize"):
        return _summarize(params, out)


def _summarize(params: Params, out: str | Path) -> dict:
    teacher_pt = Path(params.teacher.out) / "teacher.pt"
    rows = {"teacher": {"model": params.teacher.model, "mode": "teacher", **_read(Path(params.teacher.out))}}
    folders = {"teacher": Path(params.teacher.out)}
    for name, cfg in params.students.items():
        rows[name] = {"model": cfg.model + (" (pruned)" if cfg.init else ""), **_read(Path(cfg.out))}
        folders[name] = Path(cfg.out)
    reference = {"teacher_sha256": _sha256(teacher_pt) if teacher_pt.is_file() else None,
                 "data_fingerprint": _data_fingerprint(params)}
    apart = {name: why for name, row in rows.items() if name != "teacher" and (why := _other_origin(row, reference))}
    notes = [f"- {name}: not in the table: {why}" for name, why in apart.items()]
    rows = {name: row for name, row in rows.items() if name not in apart}
    for name, row in rows.items():
        figures, note = _deployment(Path(params.export.out) / name / "metrics.json", _checkpoints(folders[name]))
        row.update(figures)
        notes += [f"- {name}: {note}"] if note else []
    flat = {name: {k: row.get(k) for k in (*COLUMNS, "test_acc_std", "val_acc_std", provenance.KEY)
                   if row.get(k) is not None} for name, row in rows.items()}
    table = markdown(rows) + ("\n" + "\n".join(notes) + "\n" if notes else "")  # rendered before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", flat)
    _write_text(out / "summary.md", table)
    return flat


def _write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _read(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise LogitcacheError(f"{path} is missing; train that model first (dvc repro, or logitcache train-student)")
    return _metrics(path, COLUMNS)


def _metrics(path: Path, numeric) -> dict:
    """A metrics.json that parses, holds an object and a number (or null) under every `numeric` key it has."""
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LogitcacheError(f"{path} is not valid JSON ({e}); it is damaged: rerun the stage that wrote it") from None
    if not isinstance(m, dict):
        raise LogitcacheError(f"{path} holds {type(m).__name__}, not an object of metrics; rerun the stage that wrote it")
    bad = [key for key in numeric if key in m and m[key] is not None and not _number(m[key])]
    if bad:
        raise LogitcacheError(f"{path}: {', '.join(bad)} is not a finite number; it is damaged: rerun the stage that "
                              "wrote it")
    return m


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_fingerprint(params: Params) -> str | None:
    from logitcache.core.data import split_identity

    try:
        return split_identity(params.data, "train")["fingerprint"]
    except LogitcacheError:  # no prepared data here: rows are not compared by data
        return None


def _other_origin(row: dict, reference: dict) -> str | None:
    """Why a student's row does not belong beside the teacher's: another teacher checkpoint or other data."""
    if "teacher_sha256" not in row:
        return "its metrics.json records no teacher checkpoint or data (written before logitcache recorded them); retrain it"
    if row["teacher_sha256"] and reference["teacher_sha256"] and row["teacher_sha256"] != reference["teacher_sha256"]:
        return (f"distilled from another teacher checkpoint (sha256 {row['teacher_sha256'][:16]}…, teacher.pt is "
                f"{reference['teacher_sha256'][:16]}…); retrain it on the current cache")
    if row.get("data_fingerprint") and reference["data_fingerprint"] and \
            row["data_fingerprint"] != reference["data_fingerprint"]:
        return "trained on other data (its training split's fingerprint differs); retrain it on the current data"
    return None


def _checkpoints(folder: Path) -> set[str]:
    """sha256 of every checkpoint a row's folder holds (teacher.pt, student.pt, each seed's)."""
    files = [*folder.glob("*.pt"), *folder.glob("runs/*/student.pt")]
    return {_sha256(path) for path in files if path.name != "resume.pt"}


def _deployment(path: Path, checkpoints: set[str]) -> tuple[dict, str | None]:
    """Size on disk, accuracy drop and batch-1 latency per runtime of a model's export (`<short>_bytes`,
    `<short>_acc_drop`, `<short>_latency_ms`), when it has one of the row's own checkpoints; else a note saying
    why its figures are left out."""
    if not path.is_file():
        return {}, None
    m = _metrics(path, ())
    if m.get("checkpoint_sha256") not in checkpoints:
        return {}, (f"export figures in {path} left out: they were measured on another checkpoint (or record none); "
                    "rerun logitcache export")
    figures = {}
    for key, spec in RUNTIMES.items():
        r = m.get(key, {})
        if not isinstance(r, dict):
            raise LogitcacheError(f"{path}: {key} is not an object of an export's metrics; it is damaged: rerun "
                                  "logitcache export")
        figures.update({f"{spec.short}_{name}": r[name] for name in ("bytes", "acc_drop", "latency_ms") if name in r})
    if not all(_number(v) for v in figures.values()):
        raise LogitcacheError(f"{path}: an export figure is not a finite number; it is damaged: rerun logitcache export")
    return figures, None


def _exported(kind: str) -> list[RuntimeSpec]:
    """The runtimes the summary shows: those with a file of their own (sizes), or those timed (latencies)."""
    return [spec for spec in RUNTIMES.values() if (spec.file if kind == "sizes" else spec.timed)]


def markdown(rows: dict[str, dict]) -> str:
    head = ("| model | arch | mode | test acc (%) | val acc (%) | checkpoint | agreement (%) | KL to teacher | params "
            f"| compression | steps | train time (s) | seeds | {' / '.join(s.short for s in _exported('sizes'))} (KiB) "
            f"| {' / '.join(s.short for s in RUNTIMES.values() if s.check == 'compared')} acc drop (pts) "
            f"| batch-1 ms: {' / '.join(s.short for s in _exported('latencies'))} |")
    lines = [head, "|" + "---|" * 16]
    for name, r in rows.items():
        lines.append("| " + " | ".join([
            name, r["model"], r.get("mode", ""), _mean_std(r, "test_acc"), _mean_std(r, "val_acc"), _checkpoint(r),
            _pct(r.get("agreement")), _num(r.get("kl_to_teacher"), ".4f"),
            f"{int(r.get('params', 0)):,}", _num(r.get("compression"), ".1f", "×"),
            _num(r.get("steps"), ",.0f"), _num(r.get("train_seconds"), ".0f"), str(len(r.get("seeds", [])) or 1), _sizes(r),
            _drops(r), _latencies(r)]) + " |")
    return "\n".join(lines) + "\n"


def _mean_std(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "–"
    return f"{100 * r[key]:.2f}" + (f" ± {100 * r[f'{key}_std']:.2f}" if r.get(f"{key}_std") else "")


def _checkpoint(r: dict) -> str:
    """Which weights were scored on the test split: the best on validation or the last; the step of each seed's."""
    if "select" not in r:
        return "–"
    if "per_seed" in r:
        where = "steps " + ", ".join(f"{s['selected_step']:,}" for s in r["per_seed"].values())
    elif "selected_step" in r:
        where = f"step {r['selected_step']:,}"
    else:
        where = f"epoch {r['selected']}"
    return f"{r['select']} on val ({where})"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _num(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _sizes(r: dict) -> str:
    keys = [f"{spec.short}_bytes" for spec in _exported("sizes")]
    return "–" if not any(k in r for k in keys) else " / ".join(f"{r[k] / 1024:.1f}" if k in r else "–" for k in keys)


def _drops(r: dict) -> str:
    keys = [f"{spec.short}_acc_drop" for spec in RUNTIMES.values() if spec.check == "compared"]
    return " / ".join("–" if r.get(k) is None else f"{100 * r[k]:.2f}" for k in keys)


def _latencies(r: dict) -> str:
    """Each runtime's batch-1 latency, from the model's export (timed at length) or, for a model not exported, the
    eager figure its run measured: one figure per runtime, never two of one."""
    keys = [f"{spec.short}_latency_ms" for spec in _exported("latencies")]
    if keys[0] not in r:
        return "–" if r.get("latency_ms") is None else " / ".join([f"{r['latency_ms']:.3f}", *["–"] * (len(keys) - 1)])
    return " / ".join(f"{r[k]:.3f}" if k in r else "–" for k in keys)
