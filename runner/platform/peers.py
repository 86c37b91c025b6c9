"""The processes of a multi-process run fail together.

A failure only one process meets (process 0's full disk, its figures, its event file) would
leave the others waiting in the next dispatch's collectives until JAX's multi-minute timeouts.
Instead, host-side work that may fail on one process runs inside ``agree``: every process then
all-gathers whether it failed (a tiny collective the processes reach together), and all stop:
the failing one with its own error, the others with ``PeerFailed``. A process that dies without
reaching it (SIGKILL, a crash) is noticed by JAX's heartbeats (``runner.device`` sets their
timeout) and the others end too.
"""

from typing import Callable, Optional, TypeVar

import jax
import numpy as np

from runner.config.errors import RunnerError

T = TypeVar("T")


class PeerFailed(RunnerError):
    """Another process of the run failed; this one stops too."""


def multi_process() -> bool:
    return jax.distributed.is_initialized() and jax.process_count() > 1


def failed_anywhere(error: Optional[BaseException]) -> Optional[int]:
    """All processes: whether each met an error; the first failed process's index, or None."""
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.array(error is not None)))
    return int(np.argmax(failed)) if failed.any() else None


def check(error: Optional[BaseException], failed: Optional[int]) -> None:
    """Raise this process's own ``error``, or PeerFailed when process ``failed`` met one."""
    if error is not None:
        raise error
    if failed is not None:
        raise PeerFailed(f"process {failed} of this run failed (its reason: its own error "
                         f"line, the run's log and metrics.json); the others stopped with it")


def agree(work: Callable[[], T]) -> T:
    """``work()``; in a multi-process run every process returns or raises together."""
    if not multi_process():
        return work()
    try:
        result, error = work(), None
    except Exception as err:  # noqa: BLE001 (re-raised below, after the others are told)
        result, error = None, err
    check(error, failed_anywhere(error))
    return result
