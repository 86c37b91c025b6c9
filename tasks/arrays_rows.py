"""Examples of a ``.npy`` file read by index: positioned reads (``os.preadv``) of the rows in
file order, consecutive rows coalesced into one read, split over a few threads.

Why not the memory map: a random gather from a memory-mapped ``.npy`` whose pages are not
cached reads ~500 examples/s here (each fault reads ahead 8 MB of which one row is used),
sorted positioned reads from 16 threads ~19k/s; with the pages cached both gather faster than
the train step consumes. A positioned read also ends in an error, not a SIGBUS, when the file
shrinks under it, and the file's size and modification time are checked at every read.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

import numpy as np

from runner.config.errors import RunnerError, os_reason


class Rows:
    """Rows (examples) of one C-ordered ``.npy`` file, read by index on ``threads`` threads;
    ``stamp``: its size and modification time (ns) when the run read it first, checked at
    every read."""

    def __init__(self, path: Path, threads: int, stamp: Tuple[int, int]):
        self.path, self.stamp = path, stamp
        self.fd = os.open(path, os.O_RDONLY)
        with os.fdopen(os.dup(self.fd), "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, self.dtype = read_header(f)
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise RunnerError(f"{path}: stored in Fortran order; save it C-ordered "
                              f"(np.save(path, np.ascontiguousarray(a)))")
        self.length, self.row_shape = shape[0], tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.check_unchanged()
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="runner-rows")
        self.threads = max(1, threads)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The rows at ``indices`` (any order; repeats allowed), ``[len(indices), ...]``."""
        self.check_unchanged()
        order = np.argsort(indices, kind="stable")
        ordered = np.asarray(indices, np.int64)[order]
        if len(ordered) and (ordered[0] < 0 or ordered[-1] >= self.length):
            raise RunnerError(f"{self.path}: row {int(ordered[-1])} asked for, the file holds "
                              f"{self.length}")
        unique, inverse = np.unique(ordered, return_inverse=True)
        buffer = np.empty((len(unique), *self.row_shape), self.dtype)
        runs = _runs(unique)
        parts = np.array_split(np.arange(len(runs)), min(self.threads, max(1, len(runs))))
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        list(self.pool.map(lambda part: self._read_runs(view, unique, runs, part), parts))
        out = np.empty((len(indices), *self.row_shape), self.dtype)
        out[order] = buffer[inverse]
        return out

    def _read_runs(self, view: memoryview, unique: np.ndarray,
                   runs: List[Tuple[int, int]], part: np.ndarray) -> None:
        for r in part:
            first, count = runs[r]  # positions in ``unique``: rows unique[first] onwards
            start = first * self.row_bytes
            wanted = count * self.row_bytes
            try:
                got = os.preadv(self.fd, [view[start:start + wanted]],
                                self.offset + int(unique[first]) * self.row_bytes)
            except OSError as err:  # e.g. EIO: an unreadable page
                raise RunnerError(f"{self.path}: cannot read rows from {int(unique[first])} "
                                  f"({os_reason(err)})") from None
            if got != wanted:  # the file shrank under the run
                raise RunnerError(f"{self.path}: rows from {int(unique[first])} cut short "
                                  f"({got} of {wanted} bytes): the file changed during the run")

    def check_unchanged(self) -> None:
        stat = os.fstat(self.fd)
        if (stat.st_size, stat.st_mtime_ns) != self.stamp:
            raise RunnerError(f"{self.path}: changed during the run (size {self.stamp[0]} -> "
                              f"{stat.st_size} bytes, or its modification time): the run "
                              f"needs the data it started with")



_OPEN = {}  # (path, threads, stamp) -> Rows: the runs of a process (a sweep's jobs) share one
_OPENING = threading.Lock()  # reading threads of several runs (a fused group) open readers


def rows(path: Path, threads: int, stamp: Tuple[int, int]) -> Rows:
    """The reader of ``path`` as ``stamp`` says it was, opened once per process."""
    key = (str(path), threads, *stamp)
    with _OPENING:
        if key not in _OPEN:
            _OPEN[key] = Rows(path, threads, stamp)
        return _OPEN[key]


def _runs(unique: np.ndarray) -> List[Tuple[int, int]]:
    """Runs of consecutive values in sorted ``unique``: (first position, length) each."""
    if not len(unique):
        return []
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    lengths = np.diff(np.concatenate([starts, [len(unique)]]))
    return list(zip(starts.tolist(), lengths.tolist()))

