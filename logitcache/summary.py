"""The comparison of every model in params.yaml: one metrics file and one Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from logitcache.core.config import Params
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import check_output_folder, write_json
from logitcache.core.runtimes import RUNTIMES, RuntimeSpec

COLUMNS = ("test_acc", "val_acc", "agreement", "kl_to_teacher", "params", "compression", "latency_ms", "steps",
           "train_seconds",
           *(f"{spec.short}_{name}" for spec in RUNTIMES.values() for name in ("bytes", "acc_drop", "latency_ms")))


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
    flat = {name: {k: row.get(k) for k in (*COLUMNS, "test_acc_std", "val_acc_std") if row.get(k) is not None}
            for name, row in rows.items()}
    write_json(out / "metrics.json", flat)
    (out / "summary.md").write_text(markdown(rows))
    return flat


def _read(folder: Path) -> dict:
    path = folder / "metrics.json"
    if not path.is_file():
        raise LogitcacheError(f"{path} is missing; train that model first (dvc repro, or logitcache train-student)")
    return json.loads(path.read_text())


def _deployment(path: Path) -> dict:
    """Size on disk, accuracy drop and batch-1 latency per runtime of a model's export (`<short>_bytes`,
    `<short>_acc_drop`, `<short>_latency_ms`), when it has one."""
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    out = {}
    for key, spec in RUNTIMES.items():
        r = m.get(key, {})
        out.update({f"{spec.short}_{name}": r[name] for name in ("bytes", "acc_drop", "latency_ms") if name in r})
    return out


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
