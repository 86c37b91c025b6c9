"""One run's share of a host loop (``runner.loop.host``): its named actions on their cadences
(log the train metrics, evaluate and keep the best state, save a checkpoint), the reasons to
stop at an eval (early stopping; an ``on_eval`` hook such as a search's pruner), figures, how
a stop request ends it, and its summary. The loop hands it each dispatch's slice
(``Dispatched``); a single run is a group of one member.

``MEMBERS`` says whose work is being done, for the log lines' routing: a fused sweep's jobs
each keep a ``runner.log`` that takes the lines of their own work and their group's.
"""

import contextlib
import contextvars
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple
from typing import Optional, Sequence

import jax
import numpy as np

from runner.config.errors import runner_command
from runner.core.spec import StepSpec
from runner.core.steps import LAYER_GRAD_NORM
from runner.io.layout import RunPaths
from runner.loop.early_stop import EarlyStop
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
    """A reason to end a run at the eval of ``step``, before ``trainer.steps``: what
    ``metrics.json`` records of it (``stopped_early_at``; or ``status: pruned``, ``pruned_at``)
    and the line logged. The run's last checkpoint and TensorBoard step are ``step``."""

    step: int
    record: Dict[str, Any]
    message: str


# Called after each eval with (step, eval metrics); a Stop ends the run there.
EvalHook = Callable[[int, Dict[str, float]], Optional[Stop]]


@dataclasses.dataclass(frozen=True)
class Every:
    """The action ``name`` after a dispatch that ends on a multiple of ``every`` (None:
    never), and after the last one."""

    name: str
    every: Optional[int]
    action: Callable[[Dispatched], None]

    def due(self, step: int, last: bool) -> bool:
        return last or is_time(step, self.every)


class Member:
    """One run in a host loop: ``logger`` and ``checkpointer`` into ``run_dir``, ``renderer``
    (None: no figures) drawing its eval outputs, ``spec`` and ``data`` to evaluate it. Its
    actions are ``log`` (every ``trainer.log_every`` steps), ``eval`` (``eval_every``) and
    ``checkpoint`` (``checkpoint_every``), each also after the last step. ``on_eval`` is asked
    after each eval whether to stop there (a search's pruner, ``runner.run.search``)."""

    def __init__(self, run_dir: Path, *, spec: StepSpec, data, trainer, logger, checkpointer,
                 start_step: int, renderer=None, resume_command: str = "",
                 on_eval: Optional[EvalHook] = None):
        self.run_dir, self.spec, self.data, self.trainer = run_dir, spec, data, trainer
        self.logger, self.checkpointer, self.renderer = logger, checkpointer, renderer
        # printed when a signal stops the run
        self.resume_command = resume_command or runner_command(f"resume={run_dir}")
        self.step = start_step
        self.group_members, self.bar = 1, None  # its loop's (join)
        self.train_metrics: Dict[str, float] = {}
        self.eval_metrics: Dict[str, float] = {}
        self.checkpoint: Optional[Path] = None
        self.early_stop = EarlyStop(trainer, path=checkpointer.dir / "early_stop.json",
                                    write=checkpointer.write, start_step=start_step)
        self.on_eval = on_eval
        self.stopped: Optional[Stop] = None  # why it ended before trainer.steps
        self.actions: List[Every] = [Every("log", trainer.log_every, self.log_train),
                                     Every("eval", trainer.eval_every, self.evaluate),
                                     Every("checkpoint", trainer.checkpoint_every, self.save)]

    @property
    def trace_dir(self) -> Optional[Path]:
        """Where a profile of its program goes (``debug=profile``): its ``tb/``, if it writes."""
        return RunPaths(self.run_dir).tb if self.checkpointer.write else None

    def join(self, group_members: int, bar) -> None:
        """It trains in a loop of ``group_members`` runs, which shows progress on ``bar``
        (a tqdm bar; None: log lines)."""
        self.group_members, self.bar = group_members, bar

    def due(self, step: int, last: bool) -> List[str]:
        """The names of its actions due after a dispatch ending at ``step``."""
        return [a.name for a in self.actions if a.due(step, last)]

    def act(self, dispatched: Dispatched, names: Sequence[str]) -> None:
        """The actions ``names``, and the figures drawn meanwhile logged; after an eval that
        stops the run (``Stop``), the rest of a last step's work (log, checkpoint)."""
        self.step = dispatched.step
        for action in self.actions:
            if action.name in names:
                action.action(dispatched)
        if self.stopped is not None and not dispatched.last:
            for action in self.actions:
                if action.name not in names and action.name != "eval":
                    action.action(dispatched)
        self.log_figures()
        if names:
            self.logger.flush()

    def log_train(self, dispatched: Dispatched) -> None:
        """The train metrics of every log window that ended in this dispatch: to TensorBoard,
        and a console line each (the dispatch's ``perf`` on its last); all on the host already,
        fetched together when the dispatch ended."""
        self.logger.scalars(dispatched.step, "perf", dispatched.perf)
        windows = self.spec.windows
        ends = [(i, dispatched.start + (i + 1) * self.spec.num_steps // windows)
                for i in range(windows)]
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
            self.train_metrics = values
            if end != dispatched.step:
                self.report(values, step=end)
        self.report(self.train_metrics, dispatched.perf)

    def evaluate(self, dispatched: Dispatched) -> None:
        """Evaluate, log, keep the best state, hand the outputs to the figure renderer."""
        step, state = dispatched.step, dispatched.state
        metrics, outputs = self.spec.evaluate(state, self.data)
        self.eval_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.logger.scalars(step, "eval", self.eval_metrics)
        if self.renderer:
            self.renderer.submit(step, jax.device_get(outputs))
        self.checkpointer.consider(state, step, self.eval_metrics)
        self.report(self.eval_metrics, prefix="eval")
        # The hook first: a search's trial reports every eval, an early-stopping one included.
        stop = self.on_eval(step, self.eval_metrics) if self.on_eval else None
        if self.early_stop.update(step, self.eval_metrics[self.trainer.best_metric]):
            stop = stop or Stop(step, {"stopped_early_at": step}, (
                f"step {step}: eval/{self.trainer.best_metric} has not improved for "
                f"{self.early_stop.rounds} evals (trainer.early_stop.patience): stopping early"))
        if stop is not None:
            self.stopped = stop
            log.info("%s", stop.message)

    def save(self, dispatched: Dispatched) -> None:
        self.checkpoint = self.checkpointer.save(dispatched.state, dispatched.step)
        self.early_stop.checkpointed(dispatched.step)

    def interrupt(self, dispatched: Dispatched, *, saved: bool, signal_name: str) -> None:
        """A stop request: save (if this dispatch did not) and stop, unless the run is done."""
        self.step = dispatched.step
        if not saved:
            self.save(dispatched)
        if not dispatched.last:
            raise Interrupted(f"stopped by {signal_name} at step {self.step}, checkpoint "
                              f"{self.checkpoint}; continue with: {self.resume_command}",
                              self.step)

    def finish(self) -> Dict[str, Any]:
        """Its last figures logged (waiting for them); its summary."""
        self.log_figures(wait=True)
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

    def log_figures(self, *, wait: bool = False) -> None:
        if self.renderer:
            for step, images in self.renderer.ready(wait=wait).items():
                self.logger.images(step, "eval", images)

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
