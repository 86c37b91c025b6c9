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
def hold(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock while inside (a hold nested in this process's own is a no-op);
    RunnerError naming the holder's pid and host when another process holds it."""
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
        holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise Busy(f"{run_dir}: in use by {holder} (it holds {path}); a run dir takes "
                          f"one process at a time: wait for that one to end, or stop it") \
            from None
    with contextlib.suppress(OSError):  # the holder's name is a courtesy (a full disk)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)  # releases the lock
