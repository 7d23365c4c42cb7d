"""The comparison of every model in params.yaml: one metrics file and one Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.core import provenance
from logitcache.core.config import Params
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import check_output_folder, write_json

COLUMNS = ("test_acc", "val_acc", "agreement", "kl_to_teacher", "params", "compression", "latency_ms", "steps",
           "train_seconds",
           "onnx_bytes", "int8_bytes", "int8_acc_drop", "eager_latency_ms", "onnx_latency_ms", "int8_latency_ms")


def summarize(params: Params, out: str | Path = "data/summary") -> dict:
    """Collect the teacher's and every student's metrics.json, and their exports' where exported (logitcache
    export --name <row>); write <out>/metrics.json and summary.md."""
    check_output_folder(out, "summarize --out")
    rows = {"teacher": {"model": params.teacher.model, "mode": "teacher", **_read(Path(params.teacher.out))}}
    students = {**params.students, **({"pruned": params.pruned} if params.pruned else {})}
    for name, cfg in students.items():
        rows[name] = {"model": cfg.model + (" (pruned)" if cfg.init else ""), **_read(Path(cfg.out))}
    for name, row in rows.items():
        row.update(_deployment(Path(params.export.out) / name / "metrics.json"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flat = {name: {k: row.get(k) for k in (*COLUMNS, "test_acc_std", "val_acc_std", provenance.KEY)
                   if row.get(k) is not None} for name, row in rows.items()}
    write_json(out / "metrics.json", flat)
    (out / "summary.md").write_text(markdown(rows))
    return flat


def _read(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise LogitcacheError(f"{path} is missing; train that model first (dvc repro, or logitcache train-student)")
    return json.loads(path.read_text())


def _deployment(path: Path) -> dict:
    """Size on disk and latency per runtime of a model's export, when it has one."""
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    return {"onnx_bytes": m["onnx_fp32"]["bytes"], "int8_bytes": m["onnx_int8"]["bytes"],
            "int8_acc_drop": m["onnx_int8"]["acc_drop"], "eager_latency_ms": m["pytorch"]["latency_ms"],
            "onnx_latency_ms": m["onnx_fp32"]["latency_ms"], "int8_latency_ms": m["onnx_int8"]["latency_ms"]}


def markdown(rows: dict[str, dict]) -> str:
    head = ("| model | arch | mode | test acc (%) | val acc (%) | checkpoint | agreement (%) | KL to teacher | params "
            "| compression | latency (ms) | steps | train time (s) | seeds | ONNX / int8 (KiB) | int8 acc drop (pts) "
            "| batch-1 ms: eager / ORT / ORT int8 |")
    lines = [head, "|" + "---|" * 17]
    for name, r in rows.items():
        lines.append("| " + " | ".join([
            name, r["model"], r.get("mode", ""), _mean_std(r, "test_acc"), _mean_std(r, "val_acc"), _checkpoint(r),
            _pct(r.get("agreement")), _num(r.get("kl_to_teacher"), ".4f"),
            f"{int(r.get('params', 0)):,}", _num(r.get("compression"), ".1f", "×"), _num(r.get("latency_ms"), ".2f"),
            _num(r.get("steps"), ",.0f"), _num(r.get("train_seconds"), ".0f"), str(len(r.get("seeds", [])) or 1), _sizes(r),
            _num(None if r.get("int8_acc_drop") is None else 100 * r["int8_acc_drop"], ".2f"), _latencies(r)]) + " |")
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
    return "–" if "onnx_bytes" not in r else f"{r['onnx_bytes'] / 1024:.1f} / {r['int8_bytes'] / 1024:.1f}"


def _latencies(r: dict) -> str:
    keys = ("eager_latency_ms", "onnx_latency_ms", "int8_latency_ms")
    return "–" if keys[0] not in r else " / ".join(f"{r[k]:.3f}" for k in keys)
