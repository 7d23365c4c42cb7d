"""Atomic, resumable HDF5 writing.

Rows go into `<cache>.partial`; after each batch the data are flushed and the
`rows_done` attribute records the progress. A rerun with the same `run_key` resumes
from there; anything else starts over. The file is renamed to its final name only
once every row is written, read back (checksums) and the `complete` flag is set.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from pathlib import Path

import h5py
import numpy as np

from logitcache.cache.format import UnreadableFile, dataset_names, open_h5, read_blocks, set_attr
from logitcache.core.errors import LogitcacheError

CHUNK_BYTES = 512 * 1024
RESERVE_BYTES = 1 << 20  # disk space held back so that a full disk still lets HDF5 close the partial cleanly


class CacheWriter:
    def __init__(self, path: str | Path, n: int, arrays: dict[str, tuple[tuple[int, ...], str]],
                 run_key: str, compression: str, overwrite: bool):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.n = n
        self.arrays = arrays
        self.reserve = self.path.with_name(self.path.name + ".reserve")
        refuse_existing(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._resume(run_key) or self._create(run_key, compression)
        # opened once: a dataset handle dropped in the middle of a failed write would flush (and fail) again
        self.datasets = {name: self.file[name] for name in arrays}
        self._hold_reserve()

    def _hold_reserve(self) -> None:
        """Hold RESERVE_BYTES of real blocks beside the partial; a write that finds the disk full releases them,
        so HDF5 can still flush its metadata and close the partial in a resumable state (instead of crashing)."""
        try:
            with open(self.reserve, "wb") as f:
                f.write(bytes(RESERVE_BYTES))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self.reserve.unlink(missing_ok=True)
            self.close()
            raise LogitcacheError(f"not enough free space in {self.path.parent} to write {self.partial} "
                                  f"({_reason(e)}); free disk space and rerun the same command") from None

    @property
    def rows_done(self) -> int:
        return int(self.file.attrs["rows_done"])

    def _resume(self, run_key: str) -> h5py.File | None:
        if not self.partial.exists():
            return None
        try:
            f = open_h5(self.partial, "r+", kind="", busy="is open in another process (a dump is running); "
                        "wait for it")
        except UnreadableFile:  # HDF5 cannot read it (killed mid-write beyond repair): start over
            self.partial.unlink()
            return None
        why = "its committed rows are damaged"
        try:
            if f.attrs.get("run_key") != run_key:
                why = "it was started with other arguments"
            elif all(name in f for name in self.arrays) and _committed_rows_read(f):
                return f
        except Exception:  # metadata damaged by a kill or a full disk: nothing in it can be trusted
            pass
        with contextlib.suppress(Exception):
            f.close()
        self.partial.unlink()
        print(f"{self.partial} not resumed ({why}): dumping from the first row", flush=True)
        return None

    def _create(self, run_key: str, compression: str) -> h5py.File:
        f = h5py.File(self.partial, "w-")
        for name, (tail, dtype) in self.arrays.items():
            row_bytes = max(1, int(np.prod(tail, dtype=np.int64)) * np.dtype(dtype).itemsize)
            chunk_rows = int(min(self.n, max(1, CHUNK_BYTES // row_bytes)))
            f.create_dataset(name, shape=(self.n, *tail), dtype=dtype, chunks=(chunk_rows, *tail),
                             fletcher32=True, compression=None if compression == "none" else compression)
        f.attrs["run_key"] = run_key
        f.attrs["rows_done"] = 0
        f.flush()
        return f

    def write(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Write rows [start, start + len) of every array, then commit the progress."""
        stop = start + len(next(iter(rows.values())))
        try:
            for name, values in rows.items():
                self.datasets[name][start:stop] = values
            self.file.flush()
            self.file.attrs["rows_done"] = stop
            self.file.flush()
        except (OSError, RuntimeError) as e:  # a full disk, typically (h5py raises either): the partial stays
            self.reserve.unlink(missing_ok=True)  # room for close() to leave the partial consistent
            raise LogitcacheError(f"writing {self.partial} failed ({_reason(e)}); "
                                  "free disk space and rerun the same command to resume") from None

    def finish(self, attributes: dict) -> Path:
        """Check every row is there, set the metadata and `complete`, and move the file into place."""
        if self.rows_done != self.n:
            raise LogitcacheError(f"{self.partial}: only {self.rows_done} of {self.n} rows written; rerun to resume")
        self.reserve.unlink(missing_ok=True)  # only metadata are left to write
        try:
            for name, value in attributes.items():
                set_attr(self.file, name, value)
            del self.file.attrs["run_key"], self.file.attrs["rows_done"]
            set_attr(self.file, "complete", True)
            self.file.close()
        except (OSError, RuntimeError) as e:
            raise LogitcacheError(f"finishing {self.partial} failed ({_reason(e)}); free disk space and rerun "
                                  "the same command") from None
        _fsync(self.partial)
        os.replace(self.partial, self.path)
        _fsync(self.path.parent)  # the rename itself survives a power loss
        return self.path

    def close(self) -> None:
        if self.file.id.valid:
            with contextlib.suppress(Exception):  # after a failed write HDF5 may fail to flush again on close
                self.file.close()
        self.reserve.unlink(missing_ok=True)


def _reason(error: Exception) -> str:
    """The system's words (e.g. 'No space left on device') from h5py's multi-line error text."""
    text = str(error)
    found = re.search(r"error message = '([^']+)'", text)
    return found.group(1) if found else text.splitlines()[0] if text else type(error).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _committed_rows_read(f: h5py.File) -> bool:
    """Read every committed row back through its checksum: a kill during a later write can damage a shared chunk."""
    done = int(f.attrs.get("rows_done", 0))
    try:
        for name in dataset_names(f):
            for _ in read_blocks(f[name], f.filename, stop=done):
                pass
    except (LogitcacheError, KeyError, ValueError):
        return False
    return True


def refuse_existing(path: Path, overwrite: bool, check_lock: bool = True) -> None:
    """Refuse a directory, an existing cache without `overwrite`, and (check_lock) one that a reader holds open."""
    if path.is_dir():
        raise LogitcacheError(f"cache path {path} is a directory; give a file path")
    if not path.exists():
        return
    if not overwrite:
        raise LogitcacheError(f"cache {path} already exists; pass --overwrite (dump.overwrite=true) to replace it")
    if not check_lock:
        return
    try:
        h5py.File(path, "r+").close()  # a reader's lock makes this fail: never replace a file in use
    except BlockingIOError:
        raise LogitcacheError(f"cache {path} is open in another process; stop it before overwriting") from None
    except OSError as e:
        if "already open" in str(e):  # held by a reader in this very process
            raise LogitcacheError(f"cache {path} is open in this process; close it before overwriting") from None
        # otherwise damaged: replacing it is the point


class BackgroundWriter:
    """Runs CacheWriter.write on a thread behind a bounded queue, so the teacher never waits for the disk."""

    def __init__(self, writer: CacheWriter, depth: int = 4):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # re-raised in the producer
                    self.error = e

    def submit(self, start: int, rows: dict[str, np.ndarray]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((start, rows))

    def drain(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
