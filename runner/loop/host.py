"""The host loop: dispatch fused steps; after each, the periodic work that falls due.

The periodic work is a list of ``Every`` actions: log the train metrics every
``trainer.log_every`` steps, evaluate (and keep the best state) every ``eval_every``, save a
checkpoint every ``checkpoint_every``; each also after the last step. Around them: metrics come
to the host only when an action is due (each fetch waits for the device) and are checked for
NaN/Inf before anything is saved; a stop request (SIGTERM/SIGINT) saves a checkpoint and
raises ``Interrupted``; finished figures are logged as they come back.
"""

import dataclasses
import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

from runner.platform import peers
from runner.run.build import StepOptions
from runner.loop.early_stop import EarlyStop
from runner.config.errors import RunnerError
from runner.platform.preemption import Interrupted, StopRequest
from runner.loop.profiling import StepProfiler
from runner.core.steps import LAYER_GRAD_NORM, evaluate, train_steps

log = logging.getLogger(__name__)


def is_time(step: int, every: Optional[int]) -> bool:
    """Whether periodic work with cadence ``every`` (None = never) falls on ``step``."""
    return every is not None and step % every == 0


@dataclasses.dataclass
class Every:
    """``action()`` after a dispatch that ends on a multiple of ``every`` (None: never), and
    after the last one."""

    every: Optional[int]
    action: Callable[[], None]

    def due(self, step: int, last: bool) -> bool:
        return last or is_time(step, self.every)


def log_windows(trainer, chunk: int) -> int:
    """Log windows per dispatch of ``chunk`` steps: ``chunk / log_every`` when a dispatch
    spans several, else 1 (the dispatch's metrics are logged when it ends on a log step)."""
    if chunk > trainer.log_every and chunk % trainer.log_every == 0:
        return chunk // trainer.log_every
    return 1


class HostLoop:
    """One run's loop (see the module doc). ``renderer`` draws the task's figures of eval
    steps; ``peak_flops`` ``(peak FLOP/s of all devices, FLOPs per step)`` adds ``perf/mfu``."""

    def __init__(self, state, data, rng, *, task, schedule, trainer, chunk: int, logger,
                 checkpointer, stop: StopRequest, renderer=None,
                 options: Optional[StepOptions] = None,
                 peak_flops: Optional[Tuple[float, float]] = None,
                 profiler: Optional[StepProfiler] = None, resume_command: str = ""):
        self.state, self.data, self.rng = state, data, rng
        self.resume_command = resume_command  # printed when a signal stops the run
        self.task, self.schedule, self.trainer, self.chunk = task, schedule, trainer, chunk
        self.logger, self.checkpointer, self.stop = logger, checkpointer, stop
        self.renderer, self.peak_flops = renderer, peak_flops
        self.options = options or StepOptions(unroll=trainer.scan_unroll)
        self.windows = log_windows(trainer, chunk)
        self.step = self.start = int(state.step)
        self.metrics: Dict[str, Any] = {}  # the last dispatch's, on the host once fetched
        self.perf: Dict[str, float] = {}
        # > 1: a member of a fused group of that many runs (runner.loop.fused), whose
        # throughput and compile time are the group's and named so (log_compile)
        self.group_members = 1
        self.train_metrics: Dict[str, float] = {}
        self.eval_metrics: Dict[str, float] = {}
        self.checkpoint = None
        self.bar = _progress_bar(trainer, initial=self.step)
        self.profiler = profiler or StepProfiler(None, None)
        self.early_stop = EarlyStop(trainer, path=checkpointer.dir / "early_stop.json",
                                    write=checkpointer.write, start_step=self.step)
        self.stopped_early_at: Optional[int] = None
        self.actions: List[Every] = [Every(trainer.log_every, self.log_train),
                                     Every(trainer.eval_every, self.evaluate),
                                     Every(trainer.checkpoint_every, self.save)]

    def run(self) -> Tuple[Any, Dict[str, Any]]:
        """Train to ``trainer.steps``; the final state and the run's summary."""
        dispatches, compiled = 0, False
        window_start, window_steps = time.perf_counter(), 0  # throughput between host syncs
        with self.bar or nullcontext():
            while self.step < self.trainer.steps and self.stopped_early_at is None:
                self.dispatch()
                # The trace's start and its writing (debug=profile) are no steps: left out
                window_start += self.profiler.after_dispatch(self.chunk, self.metrics)
                if compiled:
                    window_steps += self.chunk
                else:  # keep compilation out of steps/s: wait for it, start timing after
                    jax.block_until_ready(self.metrics)
                last = self.step == self.trainer.steps
                due = [a for a in self.actions if a.due(self.step, last)]
                if due:
                    self.fetch(window_start, window_steps)
                error = self.act(due, last=last)
                stopping, failed = _agreed(self.stop, dispatches, error)
                dispatches += 1
                peers.check(error, failed)
                if stopping and self.stopped_early_at is None:  # (an early stop saved)
                    if not due:
                        self.fetch(window_start, window_steps)
                    self.interrupt(saved=self.save in [a.action for a in due], last=last)
                if not compiled or due:  # host work ends the throughput window
                    compiled, window_start, window_steps = True, time.perf_counter(), 0
                if self.bar:
                    self.bar.update(self.chunk)
        self.profiler.close()
        peers.agree(lambda: self.log_figures(wait=True))
        return self.state, self.summary()

    def summary(self) -> Dict[str, Any]:
        """How the run ended: what ``metrics.json`` records of the loop."""
        summary = {"status": "completed", "steps": self.step, "train": self.train_metrics,
                   "eval": self.eval_metrics, "checkpoint": str(self.checkpoint)}
        if self.stopped_early_at is not None:
            summary["stopped_early_at"] = self.stopped_early_at
        return summary

    def act(self, due: List[Every], *, last: bool) -> Optional[Exception]:
        """The actions due, and the figures drawn meanwhile logged; after an eval that stops
        the run early, the rest of a last step's work (log, checkpoint). In a multi-process run
        an error is returned, for every process to learn of it first (``runner.platform.peers``)."""
        try:
            for action in due:
                action.action()
            if self.stopped_early_at is not None and not last:
                for action in [a for a in self.actions if a not in due]:
                    if action.action != self.evaluate:
                        action.action()
            self.log_figures()
            if due:
                self.logger.flush()
        except Exception as err:  # noqa: BLE001 (raised by the caller, on every process)
            if not peers.multi_process():
                raise
            return err
        return None

    def dispatch(self) -> None:
        self.start = self.step
        try:
            self.state, self.metrics = self.profiler.step(self.step, lambda: train_steps(
                self.state, self.data, self.rng, task=self.task, schedule=self.schedule,
                num_steps=self.chunk, windows=self.windows,
                layer_norms=self.trainer.log_histograms, **self.options._asdict()))
        except FloatingPointError as err:  # jax_debug_nans (debug=nans) found the operation
            raise RunnerError(f"step {self.step + 1}: {err}{_code_line(err)}") from err
        self.step += self.chunk

    def fetch(self, window_start: float, window_steps: int) -> None:
        """The dispatch's metrics to the host (waits for the device: that ends the throughput
        window of ``window_steps`` steps), checked for NaN/Inf."""
        self.metrics = jax.device_get(self.metrics)
        elapsed = time.perf_counter() - window_start
        perf = {"steps_per_sec": window_steps / elapsed} if window_steps else {}
        if perf and self.peak_flops:  # model FLOPs utilisation of the devices' peak
            perf["mfu"] = perf["steps_per_sec"] * self.peak_flops[1] / self.peak_flops[0]
        self.perf = perf
        check_finite(self.metrics, self.start, self.chunk // self.windows)

    def log_compile(self, step: int, seconds: float) -> None:
        """The run's compile time, once it ended: ``perf/compile_s``. A fused member's is its
        group's one compile, the same on every member (summed over them it would count N
        times): ``perf/group_compile_s``, beside ``perf/group_members``."""
        if self.group_members > 1:
            self.logger.scalars(step, "perf", {"group_compile_s": seconds,
                                               "group_members": self.group_members})
        else:
            self.logger.scalars(step, "perf", {"compile_s": seconds})

    def log_train(self) -> None:
        """The train metrics of every log window that ended in this dispatch."""
        self.logger.scalars(self.step, "perf", self.perf)
        for i in range(self.windows):
            end = self.start + (i + 1) * self.chunk // self.windows
            if is_time(end, self.trainer.log_every) or end == self.trainer.steps:
                values = {k: float(v[i]) for k, v in self.metrics.items()}
                layers = {k[len(LAYER_GRAD_NORM):]: values.pop(k) for k in list(values)
                          if k.startswith(LAYER_GRAD_NORM)}
                self.logger.scalars(end, "train", values)
                if self.trainer.log_histograms:  # the step computed the per-layer norms too
                    self.logger.scalars(end, "opt/grad_norm", layers)
                    self.logger.histograms(end, "params", self.state.params)
                self.train_metrics = values
        self.report(self.train_metrics, self.perf)

    def evaluate(self) -> None:
        """Evaluate, log, keep the best state, hand the outputs to the figure renderer."""
        metrics, outputs = evaluate(self.state, self.data, task=self.task,
                                    mesh=self.options.mesh,
                                    compute_dtype=self.options.compute_dtype)
        self.eval_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.logger.scalars(self.step, "eval", self.eval_metrics)
        if self.renderer:
            self.renderer.submit(self.step, jax.device_get(outputs))
        self.checkpointer.consider(self.state, self.step, self.eval_metrics)
        self.report(self.eval_metrics, prefix="eval")
        if self.early_stop.update(self.step, self.eval_metrics[self.trainer.best_metric]):
            self.stopped_early_at = self.step
            log.info("step %d: eval/%s has not improved for %d evals "
                     "(trainer.early_stop.patience): stopping early", self.step,
                     self.trainer.best_metric, self.early_stop.rounds)

    def save(self) -> None:
        self.checkpoint = self.checkpointer.save(self.state, self.step)
        self.early_stop.checkpointed(self.step)

    def interrupt(self, *, saved: bool, last: bool) -> None:
        """A stop request: save (if this dispatch did not) and stop, unless the run is done."""
        if not saved:
            self.save()
        if not last:
            resume = self.resume_command or \
                f"python -m runner resume={self.checkpointer.dir.parent}"
            raise Interrupted(f"stopped by {self.stop.signal_name} at step {self.step}, "
                              f"checkpoint {self.checkpoint}; continue with: {resume}",
                              self.step)

    def log_figures(self, *, wait: bool = False) -> None:
        if self.renderer:
            for step, images in self.renderer.ready(wait=wait).items():
                self.logger.images(step, "eval", images)

    def report(self, metrics: Dict[str, float], extra: Optional[Dict[str, float]] = None, *,
               prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": v for k, v in metrics.items()}
        values.update({f"perf/{k}": v for k, v in (extra or {}).items()})
        if self.bar:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()
                                  if k.endswith(("loss", "steps_per_sec", "accuracy"))})
        else:
            log.info("step %d/%d %s", self.step, self.trainer.steps,
                     " ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))


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
