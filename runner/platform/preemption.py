"""Turn SIGTERM / SIGINT (SLURM preemption, Ctrl-C, kill) into a request the loop honours."""

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from runner.config.errors import RunnerError


class Interrupted(RunnerError):
    """The run stopped on a signal after saving a checkpoint at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class StopRequest:
    signal_name: Optional[str] = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While inside, SIGTERM and SIGINT set ``request.signal_name`` instead of killing the
    process; a second signal acts as usual (so a stuck run can still be stopped). Off the main
    thread (signals cannot be caught there) nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, frame):
        request.signal_name = signal.Signals(signum).name
        for sig, old in previous.items():
            signal.signal(sig, old)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
