"""Files written whole or not at all, and checkpoints that load without unpickling code."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from logitcache.core.errors import LogitcacheError


def save_checkpoint(path: str | Path, state_dict: dict, config: dict, **extra) -> None:
    """state_dict + config as JSON text: loadable with torch.load(weights_only=True). Written atomically."""
    with atomic_write(path) as tmp:
        torch.save({"state_dict": state_dict, "config": json.dumps(config, sort_keys=True), **extra}, tmp)


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Write to a temporary name, then rename: a kill or an error never leaves a half-written file under `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_folder(path: str | Path, key: str) -> None:
    """Refuse, before any work, an output folder that could not be created or written; creates nothing.

    Finds the deepest part of `path` that exists and makes (and at once removes) a folder in it:
    that fails as the run itself would, for a file in the way, a read-only or virtual file
    system (/proc) or a missing write permission.
    """
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if os.path.lexists(p)), Path("."))
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
        raise LogitcacheError(f"{key}: {path} {where}, not a folder; give a folder path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".logitcache-check-", dir=existing))
    except OSError as e:
        raise LogitcacheError(f"{key}: cannot create or write {path} (no folder can be made in {existing}: {e.strerror}); "
                              "give a folder you can write to") from None


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """Fill a temporary folder, then put it in place of `path`: never a folder with only some of its files."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise LogitcacheError(f"checkpoint {path} does not exist or is not a file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickle carrying code, or a damaged file
        raise LogitcacheError(f"checkpoint {path} {_load_failure(e)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise LogitcacheError(f"checkpoint {path} is not a logitcache checkpoint (no state_dict/config)")
    ckpt["config"] = json.loads(ckpt["config"])
    return ckpt


def _load_failure(error: Exception, remedy: str = "use only checkpoints written by logitcache") -> str:
    """Why torch.load(weights_only=True) refused a file, without torch's advice to turn the safety off."""
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text)
    if found:
        return (f"holds objects other than tensors and plain data ({found.group(1)}); it was refused without running "
                f"any of it: {remedy}")
    detail = next((line.strip() for line in text.splitlines()[1:] if line.strip() and "weights_only" not in line
                   and "Weights only" not in line), text.splitlines()[0] if text else type(error).__name__)
    return f"cannot be read ({detail}); it is damaged or not a torch checkpoint: retrain or copy it again"


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The model a logitcache checkpoint describes, with its weights, and the checkpoint itself."""
    from logitcache.core.models import model_from_info, resize_layers

    ckpt = load_checkpoint(path)
    info = ckpt.get("model_info")
    if not isinstance(info, dict):
        raise LogitcacheError(f"checkpoint {path} has no model_info; it was not written by logitcache (a plain "
                              "state_dict or safetensors file: convert it with `logitcache import-teacher`)")
    model = model_from_info(info)
    if info.get("channels"):  # a pruned model: the base architecture with fewer channels
        resize_layers(model, info["channels"], ckpt["state_dict"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()[:200]
        raise LogitcacheError(f"checkpoint {path} does not fit model {info['model']} ({detail}); it is damaged or was "
                              "saved for another architecture: retrain it") from None
    return model, ckpt


def write_json(path: str | Path, data) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_confusion(path: Path, labels: torch.Tensor, predicted: torch.Tensor) -> None:
    """One {actual, predicted} row per test sample: DVC's confusion-matrix plot template reads it."""
    rows = [{"actual": int(a), "predicted": int(p)} for a, p in zip(labels.tolist(), predicted.tolist())]
    write_json(path, rows)
