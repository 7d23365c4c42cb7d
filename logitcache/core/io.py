"""Files written whole or not at all, and checkpoints that load without unpickling code."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
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


OWNER_FILE = ".logitcache-outputs.json"  # in a folder logitcache writes into: file name -> the command that wrote it
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_name(value: str, key: str) -> str:
    """A name that becomes one file or folder name: never a path that leaves the folder it is put in."""
    if not isinstance(value, str) or not _PLAIN_NAME.fullmatch(value):
        raise LogitcacheError(f"{key} {value!r} is not a plain name; use letters, digits, '.', '_' and '-', starting "
                              "with a letter or digit (no '/', not '.' or '..')")
    return value


def check_not_input(output: str | Path, inputs: dict[str, str | Path], key: str) -> None:
    """Refuse an output that is one of the command's own inputs (writing it would destroy what is read)."""
    for what, path in inputs.items():
        if os.path.exists(output) and os.path.exists(path) and os.path.samefile(output, path):
            raise LogitcacheError(f"{key}: {output} is the {what} this command reads; give another output path")


def owned_files(folder: str | Path) -> dict[str, str]:
    """The files of `folder` that logitcache wrote, each with the command that wrote it (empty when none is recorded)."""
    try:
        owned = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in owned.items() if isinstance(v, str)} if isinstance(owned, dict) else {}


def claim_files(folder: str | Path, names, command: str, key: str) -> None:
    """Refuse, before any work, to replace a file of `folder` that `command` did not write itself."""
    folder, owned = Path(folder), owned_files(folder)
    foreign = sorted(name for name in names if os.path.lexists(folder / name) and owned.get(name) != command)
    if foreign:
        raise LogitcacheError(f"{key}: {folder} already holds {', '.join(foreign)}, which `logitcache {command}` did "
                              "not write there; move them away or choose another output")


def record_files(folder: str | Path, names, command: str) -> None:
    """Note in `folder`'s owner file that `command` wrote `names` (so that a rerun may replace them)."""
    write_json(Path(folder) / OWNER_FILE, {**owned_files(folder), **{name: command for name in names}})


@contextlib.contextmanager
def atomic_folder(path: str | Path, command: str, key: str, names=()):
    """Fill a temporary folder, then put it in place of `path`: never a folder with only some of its files.

    Only files `command` wrote into `path` before are replaced or dropped; any other file there (a .gitignore,
    the user's own) is kept, and one in the way of a file to be written is refused, before the work when
    `names` (the files it will write) are given and in any case before anything is touched.
    """
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise LogitcacheError(f"{key}: {path} is a file, not a folder; give a folder path")
    claim_files(path, names, command, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        _put_in_place(tmp, path, command, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _put_in_place(tmp: Path, path: Path, command: str, key: str) -> None:
    """Move `tmp` to `path`, carrying over (as hard links) every file of `path` that `command` does not own."""
    written = sorted(p.name for p in tmp.iterdir())
    kept = {}
    if path.exists():
        claim_files(path, written, command, key)
        owned = owned_files(path)
        for entry in path.iterdir():
            if entry.name != OWNER_FILE and entry.name not in written and owned.get(entry.name) != command:
                _link(entry, tmp / entry.name)
                if entry.name in owned:
                    kept[entry.name] = owned[entry.name]
    write_json(tmp / OWNER_FILE, {**kept, **{name: command for name in written}})
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".replaced", dir=path.parent))
    os.replace(path, old)  # onto the empty folder just made; a kill from here on leaves every file in old or tmp
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _link(source: Path, target: Path) -> None:
    """`source` at `target` too, without copying data where the file system allows hard links."""
    def link(src, dst):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    else:
        link(source, target)


@contextlib.contextmanager
def output_lock(path: str | Path, key: str, hold: bool = True):
    """Hold the output `path` alone while the block runs; a second process gets a one-line error naming us.

    The lock is an fcntl.flock on a file named after the output's real path in the system's temporary folder
    (so nothing is added to the user's folders and no folder is made early); the kernel releases it when the
    process ends, also on kill -9. `hold=False` (a rank other than 0) takes no lock.
    """
    if not hold:
        yield
        return
    real = os.path.realpath(path)
    locks = Path(tempfile.gettempdir()) / "logitcache-locks"
    if not locks.is_dir():
        locks.mkdir(exist_ok=True)
        with contextlib.suppress(OSError):
            locks.chmod(0o1777)  # shared by every user, like the temporary folder itself
    lock = locks / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".lock")
    fd = _acquire(lock, real, key)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still held: a process that opened it meanwhile sees it gone and retries
        os.close(fd)


def _acquire(lock: Path, real: str, key: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 100).decode(errors="replace").split(" ", 1)[0] or "unknown"
            os.close(fd)
            raise LogitcacheError(f"{key}: {real} is being written by another process (pid {holder}); wait for it to "
                                  "finish or stop it, or choose another output") from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {real}\n".encode())
            return fd
        os.close(fd)  # the holder removed it as we opened it: take the file now in its place


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise LogitcacheError(f"checkpoint {path} does not exist or is not a file")
    try:
        with warnings.catch_warnings():  # torch's advice on a refused file is replaced by our one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickle carrying code, or a damaged file
        raise LogitcacheError(f"checkpoint {path} {_load_failure(e)}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt:
        raise LogitcacheError(f"checkpoint {path} is not a logitcache checkpoint (no state_dict/config)")
    try:
        ckpt["config"] = json.loads(ckpt["config"])
    except (TypeError, ValueError):
        ckpt["config"] = None
    if not isinstance(ckpt["config"], dict):
        raise LogitcacheError(f"checkpoint {path}: its config is not a JSON object; the file is damaged or was not "
                              "written by logitcache: retrain it or copy it again")
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
