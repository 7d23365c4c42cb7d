"""Test-split metrics of a trained model, the same whether called after training or by `logitcache evaluate`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from logitcache.cache.reader import Cache
from logitcache.core.config import DataConfig, validate
from logitcache.core.data import Split, load_split
from logitcache.core.errors import LogitcacheError
from logitcache.core.io import load_model, write_confusion
from logitcache.core.preprocess import model_input
from logitcache.core.speed import latency, torch_runtime
from logitcache.core.training import place, score_split, select_device, topk_accuracy

LATENCY_RUNS, WARMUP_RUNS = 30, 5  # batch-1 timings of a trained model: a cheap figure, export times it at length


def evaluate_model(model: nn.Module, data: DataConfig, device: torch.device, test_cache: str | None, *,
                   confusion: Path | None = None, model_info: dict | None = None, view_info: dict | None = None,
                   timed: bool = True) -> dict:
    """Accuracy, agreement and KL with the teacher (from the test cache), size and, when `timed`, batch-1 latency
    (else null; throughput and other runtimes are `logitcache export`'s). `view_info` is how a student takes its
    input (`StudentView.info`), for one that has no checkpoint yet."""
    test = load_split(data, "test")
    if model_info is not None:
        _check_fits(model_info, test)
    view = model_input({**(model_info or {}), **(view_info or {})}, test)
    scored = score_split(model, test, device, view)
    logits, labels = scored.logits, scored.labels
    if confusion is not None:
        write_confusion(confusion, labels, logits.argmax(1))
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {**scored.accuracy(), "params": n_params, "agreement": None, "kl_to_teacher": None, "compression": None,
               "teacher_test_acc": None}
    if test_cache and Path(test_cache).exists():
        with Cache(test_cache) as cache:
            cache.check_matches(test)
            teacher = cache.logits()[:, cache.eval_view]
            teacher_params = cache.teacher_params
        metrics["agreement"] = (teacher.argmax(1) == logits.argmax(1)).float().mean().item()
        metrics["kl_to_teacher"] = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher, 1), log_target=True,
                                            reduction="batchmean").item()
        metrics["teacher_test_acc"] = topk_accuracy(teacher, labels, 1)
        metrics["compression"] = teacher_params / n_params if teacher_params else None
    metrics.update(batch1_latency(model, view.inputs(test, [0]).numpy()[0], device) if timed else
                   {"latency_ms": None, "latency_p90_ms": None})
    return metrics


def batch1_latency(model: nn.Module, image, device: torch.device) -> dict:
    """Median and p90 (ms) of LATENCY_RUNS eager runs on one image."""
    return latency(torch_runtime(model.eval(), device), image, LATENCY_RUNS, WARMUP_RUNS)


def _check_fits(info: dict, test: Split) -> None:
    """A model for other classes or channels would be scored against the wrong labels, or crash mid-run."""
    channels = test.channels if "preprocess" in info else info["in_channels"]  # a teacher converts grey to RGB
    if (info["num_classes"], channels) != (test.num_classes, test.channels):
        raise LogitcacheError(f"checkpoint model {info['model']} has {info['num_classes']} classes and "
                              f"{info['in_channels']} channel(s), the test data {test.dataset} has {test.num_classes} "
                              f"classes and {test.channels} channel(s); evaluate it on the data it was trained on")


def evaluate_checkpoint(path: str | Path, device: str = "auto", test_cache: str | None = None) -> dict:
    """Judge a student checkpoint on its own: same metrics as at the end of its training run."""
    if test_cache is not None and not Path(test_cache).is_file():
        raise LogitcacheError(f"--test-cache {test_cache} does not exist or is not a file; give the test-split cache "
                              "from dump-teacher, or leave --test-cache out to use the run's")
    model, ckpt = load_model(path)
    dev = select_device(device)
    if not isinstance(ckpt["config"].get("data"), dict):
        raise LogitcacheError(f"checkpoint {path} records no data config; give a student.pt from train-student")
    data = validate({"data": ckpt["config"]["data"]}, source=f"data config of checkpoint {path}").data
    student = ckpt["config"].get("student", {})
    if test_cache is not None:
        _check_teacher(test_cache, ckpt.get("teacher_sha256"), path)
    return evaluate_model(place(model, dev), data, dev, test_cache or student.get("test_cache"),
                          model_info=ckpt["model_info"])


def _check_teacher(test_cache: str, teacher_sha256: str | None, path: str | Path) -> None:
    """Agreement and KL are against a teacher: a test cache of another teacher than the one the student was
    distilled from would score it against the wrong targets. (A student without a recorded teacher, trained by
    cross-entropy alone or by an older logitcache, is scored against any.)"""
    if teacher_sha256 is None:
        return
    with Cache(test_cache) as cache:
        if cache.teacher_sha256 != teacher_sha256:
            raise LogitcacheError(f"--test-cache {test_cache} was made by another teacher checkpoint (sha256 "
                                  f"{cache.teacher_sha256[:16]}…) than the one {path} was distilled from "
                                  f"({teacher_sha256[:16]}…); give the test cache dumped with that teacher")
