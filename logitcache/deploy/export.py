"""logitcache export: a checkpoint as ONNX, a torch.export program and int8 ONNX, each checked and measured.

Every artifact is checked on the whole test split against the PyTorch model it came
from, and written into a temporary folder that replaces <export.out>/<name> only when
everything passed: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from logitcache.core import provenance
from logitcache.core.config import DataConfig, ExportConfig, Params, validate
from logitcache.core.data import load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import atomic_folder, load_model, write_json
from logitcache.core.views import Normalizer
from logitcache.deploy.measure import Runtime, onnx_runtime, predict, speed, torch_runtime
from logitcache.deploy.quantize import calibration_images, quantize

INPUT = "images"


def export_checkpoint(params: Params, checkpoint: str | Path, name: str) -> dict:
    """Export, check and time CHECKPOINT into <export.out>/<name>/; returns its metrics."""
    cfg = params.export
    threads = _set_threads(cfg)
    model, ckpt = load_model(checkpoint)
    arch = ckpt["model_info"]["model"]
    data = checkpoint_data(ckpt, checkpoint)
    test = load_split(data, "test")
    images = Normalizer(test.mean, test.std)(test.images).numpy()
    labels = test.labels.numpy()
    eager = torch_runtime(model.eval())
    reference = predict(eager, images)
    calibration = (calibration_images(cfg.calibration_cache, load_split(data, "train"), cfg.calibration_images,
                                      cfg.calibration_seed) if cfg.calibration_cache else None)

    def timed(run: Runtime) -> dict:
        return speed(run, images[0], cfg.latency_runs, cfg.throughput_runs, cfg.warmup_runs)

    with atomic_folder(Path(cfg.out) / name) as tmp:
        example = torch.from_numpy(images[:2])
        export_onnx(model, example, tmp / "model.onnx", cfg.opset, arch)
        export_program(model, example, tmp / "model.pt2", arch)
        fp32 = onnx_runtime(tmp / "model.onnx", threads)
        program = torch_runtime(torch.export.load(tmp / "model.pt2").module())
        int8_method = quantize(tmp / "model.onnx", tmp / "model.int8.onnx", INPUT, calibration)
        int8 = onnx_runtime(tmp / "model.int8.onnx", threads)
        pytorch_acc = _accuracy(reference, labels)
        runtimes = {
            "pytorch": {"file": Path(checkpoint).name, "bytes": Path(checkpoint).stat().st_size,
                        "test_acc": pytorch_acc, **timed(eager)},
            "pt2": {"file": "model.pt2", **_checked(program, images, reference, labels, cfg.atol, f"{arch} .pt2")},
            "onnx_fp32": {"file": "model.onnx", **_checked(fp32, images, reference, labels, cfg.atol, f"{arch} ONNX"),
                          **timed(fp32)},
            "onnx_int8": {"file": "model.int8.onnx", **_compared(int8, images, reference, labels), **timed(int8)},
        }
        for key in ("pt2", "onnx_fp32", "onnx_int8"):
            runtimes[key]["bytes"] = (tmp / runtimes[key]["file"]).stat().st_size
        runtimes["onnx_int8"]["acc_drop"] = pytorch_acc - runtimes["onnx_int8"]["test_acc"]
        metrics = {"model": arch, "checkpoint": str(checkpoint), "params": sum(p.numel() for p in model.parameters()),
                   "test_images": len(labels), "threads": threads, "latency_runs": cfg.latency_runs,
                   "throughput_runs": cfg.throughput_runs, "opset": cfg.opset, "atol": cfg.atol,
                   "int8_method": int8_method, "calibration_images": 0 if calibration is None else len(calibration),
                   **runtimes, provenance.KEY: provenance.environment().as_dict()}
        write_json(tmp / "metrics.json", metrics)
    return metrics


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
