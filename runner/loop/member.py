"""One run's share of a host loop (``runner.loop.host``): its actions on their cadences (log
the train metrics, evaluate and keep the best state, its callbacks, save a checkpoint), the
reasons to stop (a callback's request, such as early stopping's; an ``on_eval`` hook such as a
search's pruner), how a stop request ends it, and its summary. The loop hands it each
dispatch's slice (``Dispatched``); a single run is a group of one member.

``MEMBERS`` says whose work is being done, for the log lines' routing: a fused sweep's jobs
each keep a ``runner.log`` that takes the lines of their own work and their group's.
"""

import contextlib
import contextvars
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple
from typing import Optional, Sequence

import jax
import numpy as np

from runner.config.errors import runner_command
from runner.core.cadence import Cadence
from runner.core.spec import StepSpec
from runner.core.steps import LAYER_GRAD_NORM
from runner.io.layout import RunPaths
from runner.loop.callbacks import CallbackStates, Scheduled, StepInfo
from runner.platform.preemption import Interrupted

log = logging.getLogger(__name__)
# The run dirs whose work is being done: one member's, or its group's; None: no run's (e.g. a
# sweep's own lines), which every job's log takes.
MEMBERS: contextvars.ContextVar[Optional[FrozenSet[Path]]] = contextvars.ContextVar(
    "members", default=None)


@contextlib.contextmanager
def working_for(run_dirs: Iterable[Path]) -> Iterator[None]:
    """Inside, the work done (and its log lines) is that of the runs in ``run_dirs``."""
    token = MEMBERS.set(frozenset(run_dirs))
    try:
        yield
    finally:
        MEMBERS.reset(token)


def is_time(step: int, every: Optional[int]) -> bool:
    """Whether periodic work with cadence ``every`` (None = never) falls on ``step``."""
    return every is not None and step % every == 0


class Dispatched(NamedTuple):
    """What a dispatch of steps ``start``..``step`` gave one member: its metrics (on the host,
    one entry per log window; empty when none was fetched), the loop's ``perf`` scalars, and
    its state (None unless an action due reads it)."""

    start: int
    step: int
    last: bool  # the run's last step
    metrics: Dict[str, np.ndarray]
    perf: Dict[str, float]
    state: Any


class Stop(NamedTuple):
    """A reason to end a run at ``step``, before ``trainer.steps``: what ``metrics.json``
    records of it (a callback's ``stopped_at``, ``stopped_by``, ``stop_reason``,
    ``stop_details``; early stopping's ``stopped_early_at`` too; or ``status: pruned``,
    ``pruned_at``) and the line logged. The run's last checkpoint and TensorBoard step are
    ``step``."""

    step: int
    record: Dict[str, Any]
    message: str


# The callbacks' states' entry for the latest eval's metrics (no callback's key: those are
# config keys, ``callbacks.<name>``, ``trainer.<key>``)
LATEST_EVAL = "latest_eval"
# Called after each eval with (step, eval metrics); a Stop ends the run there.
EvalHook = Callable[[int, Dict[str, float]], Optional[Stop]]


@dataclasses.dataclass(frozen=True, eq=False)  # each action is itself (``in`` by identity)
class Every:
    """``action`` after a dispatch that ends on a multiple of ``every`` (None: never), and
    (``at_last``) after the last one. What the loop needs to know of it: whether it reads the
    state (``needs_state``: the loop fetches it), and whether it also runs at the step a stop
    ends the run (``on_stop``: the log and the checkpoint; not the eval, nor callbacks)."""

    every: Optional[int]
    action: Callable[[Dispatched], None]
    needs_state: bool = False
    on_stop: bool = False
    at_last: bool = True

    def due(self, step: int, last: bool) -> bool:
        return (last and self.at_last) or is_time(step, self.every)


class Member:
    """One run in a host loop: ``logger`` and ``checkpointer`` into ``run_dir``, ``spec`` and
    ``data`` to evaluate it, on the run's ``cadence``. Its actions, in this order after a
    dispatch: ``log`` (every ``trainer.log_every`` steps), ``eval`` (``eval_every``), each of
    ``callbacks`` (their own ``every``; ``runner.loop.callbacks``) and ``checkpoint``
    (``checkpoint_every``); log, eval and checkpoint also after the last step. ``on_eval`` is
    asked after each eval whether to stop there (a search's pruner, ``runner.run.search``)."""

    def __init__(self, run_dir: Path, *, spec: StepSpec, cadence: Cadence, data, trainer,
                 logger, checkpointer, start_step: int, callbacks: Sequence[Scheduled] = (),
                 resume_command: str = "", on_eval: Optional[EvalHook] = None):
        self.run_dir, self.spec, self.cadence = run_dir, spec, cadence
        self.data, self.trainer = data, trainer
        self.logger, self.checkpointer = logger, checkpointer
        # printed when a signal stops the run
        self.resume_command = resume_command or runner_command(f"resume={run_dir}")
        self.step = start_step
        self.group_members, self.bar = 1, None  # its loop's (join)
        self.train_metrics: Dict[str, float] = {}
        self.train_step = -1  # the step train_metrics were logged at
        self.eval_metrics: Dict[str, float] = {}
        self.eval_outputs = (-1, None)  # the latest eval's step and outputs (on the device)
        self.checkpoint: Optional[Path] = None
        self.on_eval = on_eval
        self.stopped: Optional[Stop] = None  # why it ended before trainer.steps
        self.callbacks = list(callbacks)
        self.callback_states = CallbackStates(run_dir, write=checkpointer.write)
        if start_step:
            self.restore_callbacks(start_step)
        self.checkpointing = Every(trainer.checkpoint_every, self.save, needs_state=True,
                                   on_stop=True)
        self.actions: List[Every] = [
            Every(trainer.log_every, self.log_train, needs_state=trainer.log_histograms,
                  on_stop=True),
            Every(trainer.eval_every, self.evaluate, needs_state=True),
            *(Every(c.every, functools.partial(self.call, c), needs_state=c.needs_state,
                    at_last=c.after_eval) for c in self.callbacks),
            self.checkpointing]

    @property
    def trace_dir(self) -> Optional[Path]:
        """Where a profile of its program goes (``debug=profile``): its ``tb/``, if it writes."""
        return RunPaths(self.run_dir).tb if self.checkpointer.write else None

    def join(self, group_members: int, bar) -> None:
        """It trains in a loop of ``group_members`` runs, which shows progress on ``bar``
        (a tqdm bar; None: log lines)."""
        self.group_members, self.bar = group_members, bar

    def due(self, step: int, last: bool) -> List[Every]:
        """Its actions due after a dispatch ending at ``step``."""
        return [a for a in self.actions if a.due(step, last)]

    def act(self, dispatched: Dispatched, due: Sequence[Every]) -> None:
        """The actions ``due``; after one that stops the run (``Stop``), the rest of a last
        step's work (the actions ``on_stop``: log, checkpoint)."""
        self.step = dispatched.step
        for action in self.actions:
            if action in due:
                action.action(dispatched)
        if self.stopped is not None and not dispatched.last:
            for action in self.actions:
                if action.on_stop and action not in due:
                    action.action(dispatched)
        if due:
            self.logger.flush()

    def log_train(self, dispatched: Dispatched) -> None:
        """The train metrics of every log window that ended in this dispatch: to TensorBoard,
        and a console line each (the dispatch's ``perf`` on its last); all on the host already,
        fetched together when the dispatch ended."""
        self.logger.scalars(dispatched.step, "perf", dispatched.perf)
        window = self.cadence.window
        ends = [(i, dispatched.start + (i + 1) * window)
                for i in range(self.cadence.log_windows)]
        ends = [(i, end) for i, end in ends
                if is_time(end, self.trainer.log_every) or end == self.trainer.steps]
        for i, end in ends:
            values = {k: float(v[i]) for k, v in dispatched.metrics.items()}
            layers = {k[len(LAYER_GRAD_NORM):]: values.pop(k) for k in list(values)
                      if k.startswith(LAYER_GRAD_NORM)}
            self.logger.scalars(end, "train", values)
            if self.trainer.log_histograms:  # the step computed the per-layer norms too
                self.logger.scalars(end, "opt/grad_norm", layers)
                self.logger.histograms(end, "params", dispatched.state.params)
            self.train_metrics, self.train_step = values, end
            if end != dispatched.step:
                self.report(values, step=end)
        self.report(self.train_metrics, dispatched.perf)

    def evaluate(self, dispatched: Dispatched) -> None:
        """Evaluate, log, keep the best state; ask ``on_eval`` whether to stop."""
        step, state = dispatched.step, dispatched.state
        metrics, outputs = self.spec.evaluate(state, self.data)
        self.eval_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.eval_outputs = (step, outputs)
        self.logger.scalars(step, "eval", self.eval_metrics)
        self.checkpointer.consider(state, step, self.eval_metrics)
        self.report(self.eval_metrics, prefix="eval")
        if self.on_eval:
            self.request_stop(self.on_eval(step, self.eval_metrics))

    def step_info(self, step: int, state: Any = None) -> StepInfo:
        """What a callback is called with at ``step`` (``runner.loop.callbacks.StepInfo``)."""
        metrics = {f"eval/{k}": v for k, v in self.eval_metrics.items()}
        if self.train_step == step:
            metrics.update({f"train/{k}": v for k, v in self.train_metrics.items()})
        eval_step, outputs = self.eval_outputs
        return StepInfo(step, metrics, self.logger, self.run_dir, state=state,
                        eval_outputs=outputs if eval_step == step else None)

    def call(self, scheduled: Scheduled, dispatched: Dispatched) -> None:
        """Callback ``scheduled``, with the state where it asks for it; its stop request."""
        info = self.step_info(dispatched.step, jax.device_get(dispatched.state)
                              if scheduled.needs_state else None)
        scheduled.callback(info)
        if info.stop_request is not None:
            record = {"stopped_at": info.step, "stopped_by": scheduled.key,
                      "stop_reason": info.stop_request,
                      "stop_details": info.stop_record or None}
            if scheduled.recorded_as:
                record[scheduled.recorded_as] = info.step
            self.request_stop(Stop(info.step, record, f"step {info.step}: {scheduled.key} "
                                                      f"stops the run: {info.stop_request}"))

    def request_stop(self, stop: Optional[Stop]) -> None:
        """End the run at ``stop.step`` (the first request stands)."""
        if stop is not None and self.stopped is None:
            self.stopped = stop
            log.info("%s", stop.message)

    def save(self, dispatched: Dispatched) -> None:
        """A checkpoint; first, where its callbacks need them on resume, their states and the
        latest eval's metrics go with it (``runner.loop.callbacks``). What was
        logged up to its step is flushed before it exists: a resume from it (which drops what
        was logged after it) then misses nothing."""
        self.logger.flush()
        if any(c.resumes for c in self.callbacks):
            states = {c.key: c.callback.state_dict() for c in self.callbacks if c.stateful}
            self.callback_states.save(dispatched.step,
                                      {LATEST_EVAL: self.eval_metrics, **states})
        self.checkpoint = self.checkpointer.save(dispatched.state, dispatched.step)

    def restore_callbacks(self, step: int) -> None:
        """The states the callbacks had at the checkpoint of ``step`` the run resumes from,
        and the latest eval's metrics."""
        states = self.callback_states.load(step)
        self.eval_metrics = dict(states.get(LATEST_EVAL, {}))
        for scheduled in self.callbacks:
            if scheduled.key in states and hasattr(scheduled.callback, "load_state_dict"):
                scheduled.callback.load_state_dict(states[scheduled.key])
            elif scheduled.stateful:
                log.warning("%s: no state saved with the checkpoint of step %d; it starts "
                            "afresh", scheduled.key, step)

    def interrupt(self, dispatched: Dispatched, *, due: Sequence[Every],
                  signal_name: str) -> None:
        """A stop request: save (unless this dispatch's actions ``due`` did) and stop, unless
        the run is done."""
        self.step = dispatched.step
        if self.checkpointing not in due:
            self.save(dispatched)
        if not dispatched.last:
            raise Interrupted(f"stopped by {signal_name} at step {self.step}, checkpoint "
                              f"{self.checkpoint}; continue with: {self.resume_command}",
                              self.step)

    def finish(self) -> Dict[str, Any]:
        """Its callbacks' ``finish`` (the figures wait for the last ones); its summary."""
        for scheduled in self.callbacks:
            if hasattr(scheduled.callback, "finish"):
                scheduled.callback.finish(self.step_info(self.step))
        self.logger.flush()
        return self.summary()

    def summary(self) -> Dict[str, Any]:
        """How the run ended: what ``metrics.json`` records of the loop."""
        summary = {"status": "completed", "steps": self.step, "train": self.train_metrics,
                   "eval": self.eval_metrics, "checkpoint": str(self.checkpoint)}
        if self.stopped is not None:
            summary.update(self.stopped.record)
        return summary

    def log_compile(self, step: int, seconds: float) -> None:
        """The run's compile time, once it ended: ``perf/compile_s``. A fused member's is its
        group's one compile, the same on every member (summed over them it would count N
        times): ``perf/group_compile_s``, beside ``perf/group_members``."""
        if self.group_members > 1:
            self.logger.scalars(step, "perf", {"group_compile_s": seconds,
                                               "group_members": self.group_members})
        else:
            self.logger.scalars(step, "perf", {"compile_s": seconds})

    def report(self, metrics: Dict[str, float], extra: Optional[Dict[str, float]] = None, *,
               prefix: str = "train", step: Optional[int] = None) -> None:
        """``metrics`` (and ``extra`` perf scalars) at ``step`` (default: the member's) on the
        progress bar's postfix, or, without a bar, as a log line."""
        values = {f"{prefix}/{k}": v for k, v in metrics.items()}
        values.update({f"perf/{k}": v for k, v in (extra or {}).items()})
        if self.bar:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()
                                  if k.endswith(("loss", "steps_per_sec", "accuracy"))})
        else:
            log.info("step %d/%d %s", self.step if step is None else step, self.trainer.steps,
                     " ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
