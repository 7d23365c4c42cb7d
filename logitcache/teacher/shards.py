"""Sharded dumps under torchrun: one shard file per rank, merged by rank 0 into the one final cache.

A split of N samples is cut into the batches a single-process dump would run
(`per_batch` samples each); rank r of W takes a contiguous run of whole batches, so
every batch holds the same samples as in a single-process run. Shard r is written by
its own `CacheWriter` to `<out>/<split>.shards/<split>-0000r-of-0000W.h5` (atomic and
resumable like any cache), and rank 0 copies the complete shards block-wise into the
final `<out>/<split>.h5`: one plain self-contained file, indistinguishable from a
single-process cache. See docs/cache-format.md, "Sharded dumps".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from logitcache.cache.format import get_attr, open_h5, read_rows
from logitcache.core.distributed import Dist
from logitcache.core.errors import LogitcacheError
from logitcache.teacher.writer import CacheWriter

T = TypeVar("T")
HeartbeatFn = Callable[[], None]  # called by a rank after each unit of its work (see Heartbeat)


def no_heartbeat() -> None:
    """Nobody to meet: a world of one, or a direct call outside a torchrun phase."""


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    start: int  # first sample (row of the final cache)
    stop: int
    path: Path

    @property
    def size(self) -> int:
        return self.stop - self.start

    def run_key(self, base_key: str) -> str:
        """The dump's run_key (record, batch, device, amp, compression) plus this shard's place and range."""
        return _hash({"run": base_key, "shard": [self.rank, self.world, self.start, self.stop]})

    def describe(self, base_key: str) -> dict:
        return {"rank": self.rank, "world": self.world, "start": self.start, "stop": self.stop,
                "run_key": self.run_key(base_key)}


def shard_dir(final: Path) -> Path:
    return final.with_name(final.stem + ".shards")


def plan(final: Path, n: int, per_batch: int, world: int) -> list[Shard]:
    """Rank r's rows: whole batches only, batch counts differing by at most one (a rank may get none)."""
    batches = -(-n // per_batch)
    folder = shard_dir(final)
    bounds = [min(n, (r * batches // world) * per_batch) for r in range(world + 1)]
    return [Shard(r, world, bounds[r], bounds[r + 1], folder / f"{final.stem}-{r:05d}-of-{world:05d}.h5")
            for r in range(world)]


def merge_key(base_key: str, world: int) -> str:
    return _hash({"run": base_key, "merge_of": world})


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def finished(shard: Shard, base_key: str) -> bool:
    """True when the shard's file is complete and was written by this very command."""
    try:
        _check(shard, base_key)
    except LogitcacheError:
        return False
    return True


def check(shards: list[Shard], base_key: str) -> None:
    """Refuse to merge unless every non-empty shard is complete and made by this command: one line naming it."""
    for shard in shards:
        if shard.size:
            _check(shard, base_key)


def _check(shard: Shard, base_key: str) -> None:
    path = shard.path
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        state = "incomplete (its .partial is still there)" if partial.exists() else "missing"
        raise LogitcacheError(f"shard {path} is {state}; rerun the same torchrun command to resume it")
    with open_h5(path, kind="shard", busy="is open in another process; wait for it",
                 remedy="delete it and rerun the same torchrun command") as f:
        complete = get_attr(f, "complete", path) if "complete" in f.attrs else False
        made = get_attr(f, "shard", path) if "shard" in f.attrs else {}
    if complete is not True:
        raise LogitcacheError(f"shard {path} is incomplete; rerun the same torchrun command to resume it")
    if made.get("run_key") != shard.run_key(base_key):
        raise LogitcacheError(f"shard {path} was written by another dump (other arguments or process count); "
                              "rerun the same torchrun command to redo it")


def copy_into(writer: CacheWriter, shards: list[Shard], heartbeat: HeartbeatFn = no_heartbeat) -> None:
    """Copy the shards' rows, in blocks aligned to the final file's chunks, from where the writer stands."""
    step = 8 * min(writer.file[name].chunks[0] for name in writer.arrays)
    for shard in shards:
        if not shard.size or shard.stop <= writer.rows_done:
            continue
        with open_h5(shard.path, kind="shard") as f:
            lo = max(shard.start, writer.rows_done)
            while lo < shard.stop:
                hi = min(shard.stop, (lo // step + 1) * step)
                rows = slice(lo - shard.start, hi - shard.start)
                writer.write(lo, {name: read_rows(f[name], rows, shard.path) for name in writer.arrays})
                heartbeat()
                lo = hi


def remove(final: Path) -> None:
    """Delete every shard file (of any process count) of this cache, then the folder if it is empty."""
    folder = shard_dir(final)
    if not folder.is_dir():
        return
    name = re.compile(rf"{re.escape(final.stem)}-\d{{5}}-of-\d{{5}}\.h5(\.partial|\.reserve)?")
    for path in folder.iterdir():
        if name.fullmatch(path.name):
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


class Heartbeat:
    """Ranks meet after every unit of work (a batch, a block) instead of once at the end of a phase.

    No collective then waits longer than one unit of another rank's work, however long
    the phase (a resumed run where one shard is complete and another has hours to go
    would otherwise outlast the process group's timeout), and a failure on one rank
    stops the others at their next unit. A world of one never communicates.
    """

    def __init__(self, dist: Dist):
        self.dist = dist
        self.stopped = False

    def __call__(self) -> None:
        """One unit of this rank's work is done; raises when another rank has failed."""
        self._meet(working=True)

    def _meet(self, working: bool) -> bool:
        """Exchange (still working, failed) with every rank; True while any rank is still working."""
        if not self.dist.active:
            return False
        try:
            busy, failures = self.dist.sum([float(working), 0.0])
        except RuntimeError as e:  # a rank died without a word (killed, out of memory): the collective broke
            self.stopped = True
            raise LogitcacheError(f"rank {self.dist.rank}: lost contact with another rank ({str(e).splitlines()[0]}); "
                                  "rerun the same torchrun command to resume") from None
        if failures:
            self.stopped = True
            raise LogitcacheError(f"rank {self.dist.rank}: stopped because another rank failed (its error is above); "
                                  "fix it and rerun the same torchrun command to resume")
        return busy > 0

    def done(self) -> None:
        """This rank's part is over: keep meeting the others until every rank is done."""
        while self._meet(working=False):
            pass

    def fail(self) -> None:
        """Tell the others this rank failed (they stop at their next meeting)."""
        if self.dist.active and not self.stopped:
            self.stopped = True
            with contextlib.suppress(Exception):  # the others may be gone already
                self.dist.sum([0.0, 1.0])


def on_every_rank(dist: Dist, step: Callable[[Heartbeat], T]) -> T:
    """Run `step(heartbeat)` on this rank (it calls heartbeat() after each unit of work), then wait for the others.

    When any rank fails, every rank stops: the failing one with its own error, the others
    with a line pointing to it, so no rank waits for one that is gone.
    """
    heartbeat = Heartbeat(dist)
    try:
        result = step(heartbeat)
    except Exception:
        heartbeat.fail()
        raise
    heartbeat.done()
    return result


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
