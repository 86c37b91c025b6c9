"""One writer per run dir: an OS lock on ``<run_dir>/.lock`` while a process writes into it.

``fcntl.flock`` locks belong to the open file: the kernel releases them when the process
ends, however it ends, so a SIGKILLed run never leaves a stale lock. The file holds the
holder's pid and host, for the message a second process gets.
"""

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Dict, Iterator

from runner.errors import RunnerError, WriteError

LOCK_FILE = ".lock"


class Busy(RunnerError):
    """Another process holds the run dir: nothing may be written into it."""

_held: Dict[Path, int] = {}  # run dir -> the lock file's descriptor, for nested holds


@contextlib.contextmanager
def hold(run_dir: Path, *, signed: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock while inside (a hold nested in this process's own is a no-op);
    RunnerError naming the holder's pid and host when another process holds it. Unless
    ``signed``, the lock file keeps its bytes until ``sign``: a run that may still refuse the
    dir (a resume no checkpoint fits) leaves it as it was."""
    key = Path(run_dir).resolve()
    if key in _held:
        yield
        return
    path = key / LOCK_FILE
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteError(path, err) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        busy = _busy(run_dir, path, fd)
        os.close(fd)
        raise busy from None
    _held[key] = fd
    if signed:
        sign(run_dir)
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def sign(run_dir: Path) -> None:
    """Write this process's name into the lock it holds on ``run_dir``, for the message a
    second process gets."""
    fd = _held[Path(run_dir).resolve()]
    with contextlib.suppress(OSError):  # the holder's name is a courtesy (a full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


def check_free(run_dir: Path) -> None:
    """Busy when another process holds ``run_dir``'s lock. Creates and changes nothing: a
    process that may yet refuse the dir must leave it as it was (the lock file included)."""
    key = Path(run_dir).resolve()
    if key in _held:
        return
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: nobody holds it
        return
    try:
        # A shared lock is refused while another process holds the exclusive one; closing
        # this descriptor drops only this probe's lock.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(run_dir, key / LOCK_FILE, fd) from None
    finally:
        os.close(fd)


def _busy(run_dir: Path, path: Path, fd: int) -> Busy:
    holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
    return Busy(f"{run_dir}: in use by {holder} (it holds {path}); a run dir takes one "
                f"process at a time: wait for that one to end, or stop it")
