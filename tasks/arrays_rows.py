"""Examples of a ``.npy`` file read by index: positioned reads (``os.preadv``) in file order,
consecutive rows in one read, split over a few threads.

Why not a memory map: with the pages evicted, a random gather from a memory-mapped 2.2 GB
``.npy`` read 11-12k examples/s here (each fault reads ahead far more than the row it needs),
these reads 42-63k/s on 8 threads; cached, the map gathered ~3x faster, but a file cut short
under a map kills the process (SIGBUS) where a positioned read ends the run with one line. The
file's size and modification time are also checked at every read
(``docs/benchmarks.md``).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple

import numpy as np

from runner.config.errors import RunnerError, os_reason
from runner.tasks.arrays_io import npy_layout


class Rows:
    """Rows (examples) of one C-ordered ``.npy`` file, read by index on ``threads`` threads;
    ``stamp``: its size and modification time (ns) when the run read it first, checked at
    every read."""

    def __init__(self, path: Path, threads: int, stamp: Tuple[int, int]):
        self.path, self.stamp = path, stamp
        self.fd = os.open(path, os.O_RDONLY)
        with os.fdopen(os.dup(self.fd), "rb") as f:  # task=arrays refused a Fortran order
            (self.length, self.row_shape, self.dtype, self.offset,
             self.row_bytes) = npy_layout(f)
        self.check_unchanged()
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="runner-rows")
        self.threads = max(1, threads)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The rows at ``indices`` (any order; repeats allowed), ``[len(indices), ...]``, read
        in file order. Where the distinct rows form far fewer runs of consecutive rows than
        there are indices (a small file: repeats and neighbours), each run is read once into a
        buffer and the rows gathered from it; else each row is read straight into its place,
        consecutive rows bound for consecutive places in one read."""
        self.check_unchanged()
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.length):
            raise RunnerError(f"{self.path}: row {int(indices.max())} asked for, the file "
                              f"holds {self.length}")
        unique, inverse = np.unique(indices, return_inverse=True)
        runs = _run_starts(unique)
        if 2 * len(runs) < len(indices):
            buffer = np.empty((len(unique), *self.row_shape), self.dtype)
            self._read_all(buffer, unique[runs], runs, np.diff(np.append(runs, len(unique))))
            return buffer[inverse]
        out = np.empty((len(indices), *self.row_shape), self.dtype)
        order = np.argsort(indices, kind="stable")
        rows = indices[order]
        starts = np.flatnonzero(np.concatenate(
            [[True], (np.diff(rows) != 1) | (np.diff(order) != 1)]))
        self._read_all(out, rows[starts], order[starts], np.diff(np.append(starts, len(rows))))
        return out

    def _read_all(self, out: np.ndarray, first_rows: np.ndarray, places: np.ndarray,
                  counts: np.ndarray) -> None:
        """Read ``counts`` rows from each of ``first_rows`` into ``out`` at ``places``."""
        if not len(first_rows):
            return
        rb = self.row_bytes
        # Python ints: per-read arithmetic on numpy scalars cost more than the reads (cached)
        reads = list(zip((self.offset + first_rows * rb).tolist(), (places * rb).tolist(),
                         (counts * rb).tolist()))
        view = memoryview(out.reshape(-1).view(np.uint8))
        parts = [reads[i::self.threads] for i in range(min(self.threads, len(reads)))]
        list(self.pool.map(lambda part: self._read_into(view, part), parts))

    def _read_into(self, view: memoryview, reads: List[Tuple[int, int, int]]) -> None:
        fd, preadv = self.fd, os.preadv
        for offset, at, length in reads:
            try:
                got = preadv(fd, [view[at:at + length]], offset)
            except OSError as err:  # e.g. EIO: an unreadable page
                raise RunnerError(f"{self.path}: cannot read rows from "
                                  f"{(offset - self.offset) // self.row_bytes} "
                                  f"({os_reason(err)})") from None
            if got != length:  # the file shrank under the read
                raise RunnerError(f"{self.path}: rows from "
                                  f"{(offset - self.offset) // self.row_bytes} cut short ({got} "
                                  f"of {length} bytes): the file changed during the run")

    def check_unchanged(self) -> None:
        stat = os.fstat(self.fd)
        if (stat.st_size, stat.st_mtime_ns) != self.stamp:
            raise RunnerError(f"{self.path}: changed during the run (size {self.stamp[0]} -> "
                              f"{stat.st_size} bytes, or its modification time): the run "
                              f"needs the data it started with")


def _run_starts(unique: np.ndarray) -> np.ndarray:
    """Where each run of consecutive values of sorted ``unique`` starts."""
    return np.flatnonzero(np.concatenate([[True], np.diff(unique) != 1]))


_OPEN = {}  # (path, threads, stamp) -> Rows: the runs of a process (a sweep's jobs) share one
_OPENING = threading.Lock()  # reading threads of several runs (a fused group) open readers


def rows(path: Path, threads: int, stamp: Tuple[int, int]) -> Rows:
    """The reader of ``path`` as ``stamp`` says it was, opened once per process."""
    key = (str(path), threads, *stamp)
    with _OPENING:
        if key not in _OPEN:
            _OPEN[key] = Rows(path, threads, stamp)
        return _OPEN[key]
