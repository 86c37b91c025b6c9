"""A run's cadence, as one value: how many steps one dispatch fuses (``steps_per_dispatch``,
the only name of that number in runner), the log windows each returns, and every periodic
``every`` the host loop acts on (log, eval, checkpoint, the callbacks'). Computed once, when
the run is built (``Cadence.of``), and passed down to the program, the host loop and the
members; a fused group's members share it (``runner.loop.groups.group_key``).
"""

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

from runner.config.errors import RunnerError

# The automatic dispatch length stays at most this many steps (or log_every, if larger), so a
# stop request (SIGTERM) and the progress bar are not held up by one very long dispatch.
MAX_AUTO_DISPATCH = 1000


@dataclasses.dataclass(frozen=True)
class Cadence:
    """``steps`` (``trainer.steps``) in dispatches of ``steps_per_dispatch`` steps, each
    returning the metrics of ``log_windows`` equal log windows; the periodic work's
    ``log_every``, ``eval_every``, ``checkpoint_every`` (None: only at the end) and
    ``callbacks`` (``(key, every)`` pairs). Every ``every`` is a multiple of
    ``steps_per_dispatch`` (``log_every`` may instead divide it), so periodic work falls on a
    dispatch's end."""

    steps: int
    steps_per_dispatch: int
    log_windows: int
    log_every: int
    eval_every: Optional[int]
    checkpoint_every: Optional[int]
    callbacks: Tuple[Tuple[str, int], ...] = ()

    @classmethod
    def of(cls, trainer: Any, *, start_step: int = 0,
           callbacks: Mapping[str, int] = None) -> "Cadence":
        """The cadence of ``trainer`` (the config's) for a run resuming at ``start_step``,
        with the callbacks' ``{key: every}``."""
        every = tuple((callbacks or {}).items())
        per_dispatch = steps_per_dispatch(trainer, start_step=start_step, callbacks=every)
        return cls(trainer.steps, per_dispatch, log_windows(trainer.log_every, per_dispatch),
                   trainer.log_every, trainer.eval_every, trainer.checkpoint_every, every)

    @property
    def window(self) -> int:
        """Steps per log window."""
        return self.steps_per_dispatch // self.log_windows


def steps_per_dispatch(trainer: Any, *, start_step: int = 0,
                       callbacks: Tuple[Tuple[str, int], ...] = ()) -> int:
    """Steps fused per dispatch: ``trainer.steps_per_dispatch``, or else the largest count
    that lands on every eval, checkpoint and callback step, on the last step and on the step
    a resume starts from (so all dispatches share one shape: one compilation), and that is a
    multiple of ``log_every`` (one dispatch then returns the metrics of several log windows)
    or divides it. Parameter histograms need the state at each log step: with them a dispatch
    is at most ``log_every``."""
    given = trainer.steps_per_dispatch
    periodic = [c for c in (trainer.eval_every, trainer.checkpoint_every) if c is not None]
    periodic += [every for _, every in callbacks]
    log_every = trainer.log_every
    if given is None:
        base = math.gcd(trainer.steps, start_step, *periodic)
        if trainer.log_histograms or base % log_every:
            return math.gcd(base, log_every)
        cap = max(MAX_AUTO_DISPATCH // log_every, 1) * log_every
        return max(d for d in range(log_every, min(base, cap) + 1, log_every) if base % d == 0)
    if start_step % given or (trainer.steps - start_step) % given or any(
            c % given for c in periodic) or (
            log_every % given and (given % log_every or trainer.log_histograms)):
        named = "".join(f", {key}.every" for key, _ in callbacks)
        raise RunnerError(
            f"trainer.steps_per_dispatch={given}: must divide trainer.steps, the step a resume "
            f"starts from ({start_step}), trainer.eval_every, trainer.checkpoint_every{named}, "
            f"and divide trainer.log_every or (without trainer.log_histograms) be a multiple "
            f"of it")
    return given


def log_windows(log_every: int, per_dispatch: int) -> int:
    """Log windows per dispatch of ``per_dispatch`` steps: ``per_dispatch / log_every`` when a
    dispatch spans several, else 1 (its metrics are logged when it ends on a log step)."""
    if per_dispatch > log_every and per_dispatch % log_every == 0:
        return per_dispatch // log_every
    return 1
