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
from typing import Dict, Iterator, Optional

from runner.config.errors import RunnerError, WriteError

LOCK_FILE = ".lock"


class Busy(RunnerError):
    """Another process holds the run dir: nothing may be written into it."""

_held: Dict[Path, int] = {}  # run dir -> the lock file's descriptor, for nested holds


@contextlib.contextmanager
def hold(run_dir: Path) -> Iterator[bytes]:
    """Hold ``run_dir``'s lock while inside (a hold nested in this process's own is a no-op);
    RunnerError naming the holder's pid and host when another process holds it. Yields the
    lock file's bytes from before (``sign`` puts them back, for a run that refuses the dir
    after all: it leaves the dir as it was)."""
    key = Path(run_dir).resolve()
    if key in _held:
        yield os.pread(_held[key], 256, 0)
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
    before = os.pread(fd, 256, 0)
    sign(run_dir)
    try:
        yield before
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def sign(run_dir: Path, text: Optional[bytes] = None) -> None:
    """Write this process's name (or ``text``) into the lock it holds on ``run_dir``, for the
    message a second process gets."""
    fd = _held[Path(run_dir).resolve()]
    text = f"pid {os.getpid()} on {socket.gethostname()}\n".encode() if text is None else text
    with contextlib.suppress(OSError):  # the holder's name is a courtesy (a full disk)
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)


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
