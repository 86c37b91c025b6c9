"""Turn SIGTERM / SIGINT (SLURM preemption, Ctrl-C, kill) into a request the loop honours."""

import signal
import threading
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

from runner.config.errors import RunnerError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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


# The request of the whole process, once ``catch_stop_signals`` made one.
_PROCESS: List[StopRequest] = []


def catch_stop_signals() -> None:
    """From now until the process ends, the first SIGTERM or SIGINT sets one request that every
    run of the process honours, also one that comes before a run starts (``python -m runner``
    calls this first: Python's own KeyboardInterrupt, raised wherever the process is, was lost
    when it came inside a garbage-collector callback or an extension's import, and the run
    trained to its end). A second signal then does what Python does by default (raises
    KeyboardInterrupt, terminates), so a stuck process can still be stopped."""
    if _PROCESS or threading.current_thread() is not threading.main_thread():
        return
    _PROCESS.append(StopRequest())
    _catch(_PROCESS[0], {signal.SIGTERM: signal.SIG_DFL,
                         signal.SIGINT: signal.default_int_handler})


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """While inside, SIGTERM and SIGINT set ``request.signal_name`` instead of killing the
    process; a second signal acts as usual (so a stuck run can still be stopped). Off the main
    thread (signals cannot be caught there) nothing is installed. After ``catch_stop_signals``
    the request is the process's, and may be set already."""
    if _PROCESS:
        yield _PROCESS[0]
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _catch(request, previous)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_if_requested(when: str, request: Optional[StopRequest] = None) -> None:
    """Raise ``Interrupted`` (at step 0: nothing was saved) when a signal set ``request`` (by
    default the process's, see ``catch_stop_signals``) before ``when`` ("before the run
    started")."""
    request = request or (_PROCESS[0] if _PROCESS else StopRequest())
    if request.requested:
        raise Interrupted(f"stopped by {request.signal_name} {when}", 0)


def _catch(request: StopRequest, then: Dict[int, Any]) -> None:
    """Make each of ``then``'s signals set ``request``; the first one puts ``then``'s actions
    back."""
    def handler(signum, frame):
        request.signal_name = signal.Signals(signum).name
        for sig, action in then.items():
            signal.signal(sig, action)

    for sig in then:
        signal.signal(sig, handler)
