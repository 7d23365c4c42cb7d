"""logitcache export: a checkpoint as ONNX, a torch.export program and int8 ONNX, each checked and measured.

Every artifact is checked on the whole test split against the PyTorch model it came
from, and written into a temporary folder that replaces <export.out>/<name> only when
everything passed: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from logitcache.core import provenance
from logitcache.core.config import DataConfig, ExportConfig, Params, validate
from logitcache.core.data import load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import (atomic_folder, check_output_folder, claim_files, load_model, output_lock, plain_name,
                                write_json)
from logitcache.core.preprocess import BoxInput, model_input
from logitcache.core.runtimes import RUNTIMES, RuntimeSpec
from logitcache.deploy.measure import Runtime, onnx_runtime, predict, speed, torch_runtime
from logitcache.deploy.quantize import calibration_images, quantize

INPUT = "images"


@dataclass
class ExportJob:
    """What every runtime's build reads: the model and its inputs, the folder being written, the settings."""

    model: nn.Module
    example: torch.Tensor  # two test images, the traced input
    folder: Path  # the export's temporary folder, renamed to <export.out>/<name> when everything passed
    cfg: ExportConfig
    arch: str
    threads: int
    calibration: np.ndarray | None  # replayed training views for static int8; None = dynamic
    notes: dict = field(default_factory=dict)  # what a build reports beside its runtime (e.g. int8_method)


def export_checkpoint(params: Params, checkpoint: str | Path, name: str) -> dict:
    """Export, check and time CHECKPOINT into <export.out>/<name>/, one runtime of RUNTIMES after the other;
    returns its metrics.

    Only the files an earlier export wrote there are replaced; others in that folder are kept.
    """
    out = Path(params.export.out) / plain_name(name, "export --name")
    check_output_folder(out, "export.out")
    files = output_files()
    claim_files(out, files, "export", "export --name")
    with output_lock(out, "export"):
        return _export(params, checkpoint, out, files)


def output_files() -> tuple[str, ...]:
    """What an export writes into its folder: each runtime's file, then metrics.json."""
    return (*(spec.file for spec in RUNTIMES.values() if spec.file is not None), "metrics.json")


def _export(params: Params, checkpoint: str | Path, out: Path, files: tuple[str, ...]) -> dict:
    cfg = params.export
    threads = _set_threads(cfg)
    model, ckpt = load_model(checkpoint)
    arch = ckpt["model_info"]["model"]
    data = checkpoint_data(ckpt, checkpoint)
    test = load_split(data, "test")
    view = model_input(ckpt["model_info"], test)
    images = view.inputs(test, range(len(test))).numpy()
    labels = test.labels.numpy()
    reference = predict(eager_runtime_of(model), images)
    calibration = (calibration_images(cfg.calibration_cache, load_split(data, "train"), cfg.calibration_images,
                                      cfg.calibration_seed, view.prepare,
                                      BoxInput.from_json(ckpt["model_info"]["box_input"])
                                      if "box_input" in ckpt["model_info"] else None) if cfg.calibration_cache else None)
    with atomic_folder(out, "export", "export --name", files) as tmp:
        job = ExportJob(model, torch.from_numpy(images[:2]), tmp, cfg, arch, threads, calibration)
        runtimes = {key: _runtime_metrics(job, spec, images, reference, labels, Path(checkpoint))
                    for key, spec in RUNTIMES.items()}
        metrics = {"model": arch, "checkpoint": str(checkpoint),
                   "checkpoint_sha256": hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest(),
                   "params": sum(p.numel() for p in model.parameters()),
                   "test_images": len(labels), "threads": threads, "latency_runs": cfg.latency_runs,
                   "throughput_runs": cfg.throughput_runs, "opset": cfg.opset, "atol": cfg.atol,
                   **job.notes, "calibration_images": 0 if calibration is None else len(calibration), **runtimes,
                   provenance.KEY: provenance.environment().as_dict()}
        write_json(tmp / "metrics.json", metrics)
    return metrics


def _runtime_metrics(job: ExportJob, spec: RuntimeSpec, images: np.ndarray, reference: np.ndarray,
                     labels: np.ndarray, checkpoint: Path) -> dict:
    """Build one runtime, judge its predictions on the test split as its `check` says, time it."""
    build = spec.build if callable(spec.build) else _resolve(spec.build)
    run = build(job)
    path = checkpoint if spec.file is None else job.folder / spec.file
    out: dict = {"file": path.name, "bytes": path.stat().st_size}
    if spec.check == "reference":
        out["test_acc"] = _accuracy(reference, labels)
    elif spec.check == "exact":
        out.update(_checked(run, images, reference, labels, job.cfg.atol, f"{job.arch} {spec.label}"))
    else:
        out.update(_compared(run, images, reference, labels))
        out["acc_drop"] = _accuracy(reference, labels) - out["test_acc"]
    if spec.timed:
        out.update(speed(run, images[0], job.cfg.latency_runs, job.cfg.throughput_runs, job.cfg.warmup_runs))
    return out


def _resolve(name: str):
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def eager_runtime_of(model: nn.Module) -> Runtime:
    return torch_runtime(model.eval())


def eager_runtime(job: ExportJob) -> Runtime:
    return eager_runtime_of(job.model)


def program_runtime(job: ExportJob) -> Runtime:
    export_program(job.model, job.example, job.folder / RUNTIMES["pt2"].file, job.arch)
    return torch_runtime(torch.export.load(job.folder / RUNTIMES["pt2"].file).module())


def onnx_fp32_runtime(job: ExportJob) -> Runtime:
    export_onnx(job.model, job.example, job.folder / RUNTIMES["onnx_fp32"].file, job.cfg.opset, job.arch)
    return onnx_runtime(job.folder / RUNTIMES["onnx_fp32"].file, job.threads)


def onnx_int8_runtime(job: ExportJob) -> Runtime:
    """int8 from the fp32 ONNX file (built first: RUNTIMES is in order), static when calibrated."""
    path = job.folder / RUNTIMES["onnx_int8"].file
    job.notes["int8_method"] = quantize(job.folder / RUNTIMES["onnx_fp32"].file, path, INPUT, job.calibration)
    return onnx_runtime(path, job.threads)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int, arch: str) -> None:
    """ONNX through torch.export (dynamo), batch axis dynamic, weights inside the one file."""
    batch = torch.export.Dim("batch", min=1)
    with _exporter_errors(arch, "ONNX"):
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                    output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
        program.save(str(path), external_data=False)


def export_program(model: nn.Module, example: torch.Tensor, path: Path, arch: str) -> None:
    """The PyTorch-native artifact: a torch.export program with a dynamic batch axis (load with torch.export.load)."""
    batch = torch.export.Dim("batch", min=1)
    with _exporter_errors(arch, "torch.export"):
        torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)), str(path))


@contextlib.contextmanager
def _exporter_errors(arch: str, exporter: str):
    """An exporter's failure as one line naming the model and the exporter's reason."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    except Exception as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise LogitcacheError(f"model {arch} cannot be exported with {exporter}: {reason[:200]}") from None


def _compared(run: Runtime, images: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    logits = predict(run, images)
    return {"test_acc": _accuracy(logits, labels), "max_abs_logit_diff": float(np.abs(logits - reference).max()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}


def _checked(run: Runtime, images, reference, labels, atol: float, what: str) -> dict:
    """The comparison with PyTorch, refused beyond `atol`."""
    result = _compared(run, images, reference, labels)
    if not result["max_abs_logit_diff"] <= atol:
        raise LogitcacheError(f"{what} export differs from PyTorch by up to {result['max_abs_logit_diff']:.2e} in a "
                              f"logit on the test split (allowed {atol:g}, predictions agree on "
                              f"{100 * result['agreement']:.2f} %); nothing was written; raise export.atol only if "
                              "that difference is acceptable")
    return result


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _set_threads(cfg: ExportConfig) -> int:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.get_num_threads()


def checkpoint_data(ckpt: dict, path) -> DataConfig:
    """The data the checkpoint was trained on, as recorded in it."""
    if not isinstance(ckpt["config"].get("data"), dict):
        raise LogitcacheError(f"checkpoint {path} records no data config; give a checkpoint written by logitcache")
    return validate({"data": ckpt["config"]["data"]}, source=f"data config of checkpoint {path}").data
