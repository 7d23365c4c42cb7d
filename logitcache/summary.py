"""The comparison of every model in params.yaml: one metrics file and one Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.core.config import Params
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import check_output_folder, write_json

COLUMNS = ("test_acc", "agreement", "kl_to_teacher", "params", "compression", "latency_ms", "seconds_per_epoch")


def summarize(params: Params, out: str | Path = "data/summary") -> dict:
    """Collect the teacher's and every student's metrics.json; write <out>/metrics.json and summary.md."""
    check_output_folder(out, "summarize --out")
    rows = {"teacher": {"model": params.teacher.model, "mode": "teacher", **_read(Path(params.teacher.out))}}
    for name, cfg in params.students.items():
        rows[name] = {"model": cfg.model, **_read(Path(cfg.out))}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {name: {k: row.get(k) for k in (*COLUMNS, "test_acc_std") if row.get(k) is not None} for name, row in rows.items()}
    write_json(out / "metrics.json", flat)
    (out / "summary.md").write_text(markdown(rows))
    return flat


def _read(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise LogitcacheError(f"{path} is missing; train that model first (dvc repro, or logitcache train-student)")
    return json.loads(path.read_text())


def markdown(rows: dict[str, dict]) -> str:
    head = "| model | arch | mode | test acc (%) | agreement (%) | KL to teacher | params | compression | latency (ms) | s/epoch | seeds |"
    lines = [head, "|" + "---|" * 11]
    for name, r in rows.items():
        acc = f"{100 * r['test_acc']:.2f}" + (f" ± {100 * r['test_acc_std']:.2f}" if r.get("test_acc_std") else "")
        lines.append("| " + " | ".join([
            name, r["model"], r.get("mode", ""), acc, _pct(r.get("agreement")), _num(r.get("kl_to_teacher"), ".4f"),
            f"{int(r.get('params', 0)):,}", _num(r.get("compression"), ".1f", "×"), _num(r.get("latency_ms"), ".2f"),
            _num(r.get("seconds_per_epoch"), ".1f"), str(len(r.get("seeds", [])) or 1)]) + " |")
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _num(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"
