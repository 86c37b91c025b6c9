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
        """The rows at ``indices`` (any order; repeats allowed), ``[len(indices), ...]``: each
        read straight into its place, consecutive rows bound for consecutive places in one
        call (a whole range: one read)."""
        self.check_unchanged()
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.length):
            raise RunnerError(f"{self.path}: row {int(indices.max())} asked for, the file "
                              f"holds {self.length}")
        out = np.empty((len(indices), *self.row_shape), self.dtype)
        if not len(indices):
            return out
        order = np.argsort(indices, kind="stable")  # file order: readahead and disks like it
        rows = indices[order]
        starts = np.flatnonzero(np.concatenate(
            [[True], (np.diff(rows) != 1) | (np.diff(order) != 1)]))
        lengths = np.diff(np.append(starts, len(rows))) * self.row_bytes
        # Python ints: per-read arithmetic on numpy scalars cost more than the reads (cached)
        reads = list(zip((self.offset + rows[starts] * self.row_bytes).tolist(),
                         (order[starts] * self.row_bytes).tolist(), lengths.tolist()))
        view = memoryview(out.reshape(-1).view(np.uint8))
        parts = [reads[i::self.threads] for i in range(min(self.threads, len(reads)))]
        list(self.pool.map(lambda part: self._read_into(view, part), parts))
        return out

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


_OPEN = {}  # (path, threads, stamp) -> Rows: the runs of a process (a sweep's jobs) share one
_OPENING = threading.Lock()  # reading threads of several runs (a fused group) open readers


def rows(path: Path, threads: int, stamp: Tuple[int, int]) -> Rows:
    """The reader of ``path`` as ``stamp`` says it was, opened once per process."""
    key = (str(path), threads, *stamp)
    with _OPENING:
        if key not in _OPEN:
            _OPEN[key] = Rows(path, threads, stamp)
        return _OPEN[key]
