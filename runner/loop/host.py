"""The host loop: dispatch a group's program; after each dispatch, the periodic work due.

A group is one run (its own program: a group of one member) or a fused sweep's runs (one
program over a member axis, ``runner.loop.programs``). The loop does what is the same for
every member: the dispatch (``debug=nans`` names the step and the line of code that made a
NaN), the throughput window between host syncs (compilation and the profiler's own work left
out), metrics to the host only when an action is due (each fetch waits for the device),
checked for NaN/Inf before anything is saved, the processes' agreement to stop, and a stop
request (SIGTERM/SIGINT), on which every member saves a checkpoint and ends ``Interrupted``.
Each member's own work (``runner.loop.member``: log, eval, callbacks, checkpoint) runs on its
slice; each action says whether it reads the state, which is fetched only then. The cadence
(``runner.core.cadence.Cadence``) is the group's: its members share ``steps_per_dispatch``.

A member whose work fails, or whose loss or gradient norm goes non-finite, ends with the error
a single run gives, while the others go on: a fused program keeps its state as it was
(``alive`` masks it). Each member is at its own step (a fused group's members start where
their runs do), so a slot whose member ended can take another, at that one's own step 0 (or
checkpoint), in the same program (``refill``: a fused search keeps its width).
"""

import functools
import logging
import os
import sys
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from runner.config.errors import RunnerError
from runner.core.cadence import Cadence
from runner.loop.feed import HostFeed
from runner.loop.member import Dispatched, Every, Member, working_for
from runner.loop.profiling import StepProfiler
from runner.loop.programs import Program, Start
from runner.loop.throughput import Throughput
from runner.platform import peers
from runner.platform.preemption import StopRequest

log = logging.getLogger(__name__)
Result = Union[Dict[str, Any], BaseException]  # a member's summary, or how it failed
# (slot, how its member ended) -> the slot's next member, its start and its feed; or None
Refill = Callable[[int, Result], Optional[Tuple[Member, Start, Optional[HostFeed]]]]


class HostLoop:
    """Trains ``members`` with ``program`` to ``trainer.steps`` in dispatches of
    ``cadence.steps_per_dispatch`` steps (see the module doc), each from its own step.
    ``peak_flops`` ``(peak FLOP/s of the devices, FLOPs per member step)`` adds ``perf/mfu``.
    ``debug=profile`` traces the program into the first member's ``tb/``.
    ``refill``: called with a slot and how its member ended, after the dispatch it ended in
    (not after a stop request), returns the slot's next member, or None (see ``Refill``)."""

    def __init__(self, program: Program, members: Sequence[Member], *, trainer,
                 cadence: Cadence, stop: StopRequest,
                 peak_flops: Optional[Tuple[float, float]] = None,
                 refill: Optional[Refill] = None):
        self.program, self.trainer, self.stop = program, trainer, stop
        self.members = list(members)  # a slot's member changes when it is refilled
        self.peak_flops, self.cadence = peak_flops, cadence
        self.refill = refill if program.refillable else None
        if refill is not None and self.refill is None:
            log.info("examples read on the host: a batched group's ended members' slots stay "
                     "empty (the next jobs train in a group of their own)")
        self.steps = np.array([m.step for m in members])  # each slot's member's
        self.alive = np.ones(len(members), bool)
        self.results: Dict[int, Result] = {}
        self.ended: List[int] = []  # slots whose member ended since the last refill
        self.errors: List[Exception] = []  # this dispatch's, for the processes to agree on
        self.profiler = StepProfiler(members[0].trace_dir, trainer.profile_steps)
        # One bar per process: a group's members (and a refilled slot's) log lines instead.
        self.bar = (_progress_bar(trainer, initial=int(self.steps[0]))
                    if len(members) == 1 and refill is None else None)
        for member in members:
            member.join(len(members), self.bar)

    def run(self) -> List[Result]:
        """Each slot's last member's summary, or the exception it ended with (failed,
        interrupted)."""
        dispatches, window = 0, Throughput()
        with self.bar or nullcontext():
            try:
                while self.alive.any():
                    with working_for(self.members[i].run_dir for i in self.living()):
                        if not self.dispatch(window):
                            break
                        stopping = self.after_dispatch(window, dispatches)
                    dispatches += 1
                    if not stopping:
                        self.refill_ended()
            finally:
                self.profiler.close()
        return [self.results[i] for i in range(len(self.members))]

    def after_dispatch(self, window: Throughput, dispatches: int) -> bool:
        """The work due after a dispatch; each member at its last step finished. Whether
        the processes agreed to stop (a signal)."""
        last = {i: bool(self.steps[i] >= self.trainer.steps) for i in self.living()}
        due = {i: self.members[i].due(int(self.steps[i]), last[i]) for i in self.living()}
        synced = any(due.values())
        perf = self.fetch(window) if synced else None
        self.act(due, perf, last)
        stopping, failed = _agreed(self.stop, dispatches,
                                   self.errors[0] if self.errors else None)
        if failed is not None and not self.errors:  # another process failed
            for i in self.living():
                self.attempt(i, functools.partial(peers.check, None, failed))
        if stopping:
            self.interrupt(due, perf, window, last)
        window.restart(synced=synced)
        if self.bar:
            self.bar.update(self.cadence.steps_per_dispatch)
        for i in self.living():
            if last[i]:
                self.finish(i)
        return stopping

    def refill_ended(self) -> None:
        """Each slot whose member ended takes the next member ``refill`` gives, at its own
        step, in the same program."""
        ended, self.ended = self.ended, []
        for i in ended if self.refill is not None else ():
            after = self.refill(i, self.results[i])
            if after is not None:
                member, start, feed = after
                self.program.replace(i, start, feed)
                self.members[i], self.steps[i], self.alive[i] = member, member.step, True
                member.join(len(self.members), None)

    def living(self) -> List[int]:
        return [int(i) for i in np.flatnonzero(self.alive)]

    def dispatch(self, window: Throughput) -> bool:
        """One dispatch; False when the program failed, which ends every member."""
        self.errors = []
        first = int(self.steps[self.living()[0]])  # names the profiler's step
        try:
            metrics = self.profiler.step(first, lambda: self.program.dispatch(self.alive))
        except Exception as err:  # noqa: BLE001 (the program itself: every member's end)
            if isinstance(err, FloatingPointError):  # jax_debug_nans (debug=nans) found one
                named = RunnerError(f"step {first + 1}: {err}{_code_line(err)}")
                named.__cause__, err = err, named
            for i in self.living():
                self.end(i, err)
            return False
        per_dispatch = self.cadence.steps_per_dispatch
        self.steps[self.alive] += per_dispatch
        # The trace's start and its writing (debug=profile) are no steps: left out
        window.dispatched(per_dispatch, metrics,
                          excluded=self.profiler.after_dispatch(per_dispatch, metrics))
        failure = self.program.read_failure()
        if failure is not None:  # this process trained on zeros: it fails, the others with it
            for i in self.living():
                self.end(i, failure)
            self.errors.append(failure)
        return True

    def fetch(self, window: Throughput) -> Dict[str, float]:
        """The dispatch's metrics to the host (waiting for the device ends the throughput
        window), each member's checked for NaN/Inf; the window's ``perf`` scalars."""
        metrics, cadence = self.program.host_metrics(), self.cadence
        perf = self.perf(window.rate())
        for i in self.living():
            self.attempt(i, functools.partial(check_finite, metrics[i],
                                              int(self.steps[i]) - cadence.steps_per_dispatch,
                                              cadence.window))
        return perf

    def perf(self, steps_per_sec: Optional[float]) -> Dict[str, float]:
        """``steps_per_sec`` and, where the peak FLOP/s are known, ``mfu``: the devices'
        utilisation by every member's steps. A fused member's rate is its group program's,
        named so (a ``steps_per_sec`` would read as a run's alone, N times slower)."""
        if steps_per_sec is None:
            return {}
        size = self.program.size
        perf = {"group_steps_per_sec" if size > 1 else "steps_per_sec": steps_per_sec}
        if self.peak_flops:
            peak, flops = self.peak_flops
            perf["mfu"] = steps_per_sec * size * flops / peak
        return perf

    def act(self, due: Dict[int, List[Every]], perf: Optional[Dict[str, float]],
            last: Dict[int, bool]) -> None:
        """Each member's actions due, the state on the host only when one of them reads it;
        a member that stopped (a callback such as early stopping, a pruned trial) is
        finished, alone."""
        needs_state = any(a.needs_state for actions in due.values() for a in actions)
        states = self.program.host_states() if needs_state else None
        for i in self.living():
            member = self.members[i]
            self.attempt(i, functools.partial(member.act, self.share_of(i, last, perf, states),
                                              due[i]))
            if self.alive[i] and member.stopped is not None:
                self.finish(i)

    def interrupt(self, due: Dict[int, List[Every]], perf: Optional[Dict[str, float]],
                  window: Throughput, last: Dict[int, bool]) -> None:
        """A stop request: each member saves (if this dispatch did not) and, unless the run
        is done, ends ``Interrupted``. Its metrics are checked first: a NaN is never saved."""
        if perf is None:
            perf = self.fetch(window)
        states = self.program.host_states()
        for i in self.living():
            self.attempt(i, functools.partial(
                self.members[i].interrupt, self.share_of(i, last, perf, states),
                due=due[i], signal_name=self.stop.signal_name))

    def share_of(self, i: int, last: Dict[int, bool], perf: Optional[Dict[str, float]],
                 states: Optional[List[Any]]) -> Dispatched:
        """Member ``i``'s share of the dispatch that just ended."""
        step = int(self.steps[i])
        return Dispatched(step - self.cadence.steps_per_dispatch, step, last[i],
                          self.program.host_metrics()[i] if perf is not None else {},
                          perf or {}, states[i] if states is not None else None)

    def finish(self, i: int) -> None:
        """Member ``i`` done: its last figures (every process waits for them), its summary."""
        member = self.members[i]
        self.attempt(i, lambda: self.end(i, peers.agree(member.finish)))

    def attempt(self, i: int, work: Callable[[], Any]) -> None:
        """``work()`` as member ``i``'s (its log lines its own); an exception ends it."""
        with working_for([self.members[i].run_dir]):
            try:
                work()
            except Exception as err:  # noqa: BLE001 (this member's end; the others go on)
                self.end(i, err)
                self.errors.append(err)

    def end(self, i: int, result: Result) -> None:
        self.results[i], self.alive[i] = result, False
        self.ended.append(i)


def _agreed(stop: StopRequest, dispatch: int,
            error: Optional[Exception]) -> Tuple[bool, Optional[int]]:
    """Whether to stop after this dispatch, and which process failed in it (None: none). The
    processes of a multi-process run must stop after the same one, or the others would wait
    forever in the next one's collectives: SIGTERM there reaches JAX's preemption service
    (``jax.distributed`` takes the signal), which agrees on a dispatch
    (``reached_preemption_sync_point``, called with the same consecutive ids everywhere); a
    signal runner's own handler took (SIGINT), and a failure, are all-gathered."""
    if not jax.distributed.is_initialized():
        return stop.requested, None
    from jax.experimental import multihost_utils

    preempted = multihost_utils.reached_preemption_sync_point(dispatch)
    if preempted:
        stop.signal_name = stop.signal_name or "SIGTERM (preemption notice)"
    if jax.process_count() == 1:
        return preempted or stop.requested, None
    flags = np.asarray(multihost_utils.process_allgather(
        np.array([stop.requested, error is not None])))
    if flags[:, 0].any() and not preempted:
        stop.signal_name = stop.signal_name or "a signal to another process"
    failed = np.flatnonzero(flags[:, 1])
    return preempted or bool(flags[:, 0].any()), int(failed[0]) if failed.size else None


def check_finite(metrics, start: int, window: int) -> None:
    """Stop the run at a non-finite loss or gradient norm (the last checkpoint stays good).
    ``metrics`` are a dispatch's from step ``start`` on, one entry per ``window`` steps."""
    for key in ("loss", "grad_norm"):
        bad = np.flatnonzero(~np.isfinite(metrics[key]))
        if bad.size:
            raise RunnerError(f"train/{key} is {float(metrics[key][bad[0]])} at step "
                              f"{start + (bad[0] + 1) * window}: training diverged (try a "
                              f"lower optimizer.lr)")


def _code_line(err: BaseException) -> str:
    """`` at <file>:<line> (<function>)``: the innermost frame of the error's traceback outside
    JAX, flax and optax (the task's or model's code that made the value), if any."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not any(f"{os.sep}{lib}{os.sep}" in f.filename
                         for lib in ("jax", "jaxlib", "flax", "optax"))]
    if not frames:
        return ""
    frame = frames[-1]
    return f" at {frame.filename}:{frame.lineno} ({frame.name}: {(frame.line or '').strip()})"


def _progress_bar(trainer, *, initial: int):
    """A tqdm bar when stderr is a terminal (and enabled); None means plain log lines."""
    if not (trainer.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=trainer.steps, initial=initial, unit="step", dynamic_ncols=True)
