"""One training run: build it, write its run files, run the host loop, record how it ended."""

import json
import logging
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from omegaconf import OmegaConf

from runner import inputs, lock
from runner.build import Run, build_run
from runner.checkpoint import Checkpointer, remove_stale_temps, write_atomic
from runner.compiles import cache_hits, compile_stats
from runner.device import launch_process_index
from runner.errors import AlreadyComplete, WriteError, describe_error
from runner.figures import FigureRenderer
from runner.hparams import run_hparams
from runner.loop import HostLoop
from runner.manifest import write_manifest
from runner.peers import PeerFailed, agree
from runner.profiling import StepProfiler
from runner.preemption import Interrupted, StopRequest, stop_on_signals
from runner.schema import typed
from runner.tb_logger import NullLogger, TensorBoardLogger

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path, *, overrides: Sequence[str] = (),
        resume: bool = False) -> Dict[str, Any]:
    """Train as ``cfg`` says, writing TensorBoard events, checkpoints, ``metrics.json``,
    ``manifest.json`` and ``model_summary.txt`` into ``run_dir``. Returns the run's summary
    (what ``metrics.json`` holds: ``summary["eval"]["loss"]`` is the final eval loss).

    With ``resume``, continue from the newest valid checkpoint in ``run_dir``. SIGTERM and
    SIGINT save a checkpoint at the current step and stop the run. ``metrics.json`` is written
    however the run ends: ``"status"`` is ``completed``, ``interrupted`` or ``failed``, with the
    ``reason``; ``overrides`` (the job's command-line overrides) are recorded. A failed run
    writes it first, then closes its files (their own errors then only logged). The run holds
    the run dir's lock (``runner.lock``) throughout.
    """
    start, compiles_before, hits_before = (time.perf_counter(), compile_stats("train_steps"),
                                           cache_hits())
    summary: Dict[str, Any] = {"status": "failed", "steps": 0, "overrides": list(overrides)}
    writer = _launch_writer(cfg)
    closing = ExitStack()  # the run's open files and threads, closed once metrics.json says how
    try:
        with lock.hold(run_dir) if writer else nullcontext(), stop_on_signals() as stop:
            cfg = typed(cfg)
            # Started first: its thread imports matplotlib while the run builds and compiles.
            renderer = (closing.enter_context(FigureRenderer()) if cfg.trainer.log_images
                        and writer else None)
            summary.update(_train(build_run(cfg, run_dir, resume=resume), overrides, stop,
                                  renderer, closing))
            agree(closing.close)  # the last events and HParams flushed: a failure fails the run
    except (AlreadyComplete, lock.Busy):
        raise  # its metrics.json stays as the run that completed (or holds the dir) wrote it
    except Exception as err:
        summary["reason"] = describe_error(err) or f"{type(err).__name__}: {err}"
        if isinstance(err, Interrupted):
            summary.update(status="interrupted", steps=err.step)
        if writer or not isinstance(err, (Interrupted, PeerFailed)):
            _write_metrics(run_dir, _timed(summary, start, compiles_before, hits_before))
        _close_quietly(closing)
        raise
    if writer:
        _write_metrics(run_dir, _timed(summary, start, compiles_before, hits_before))
    return summary


def _timed(summary: Dict[str, Any], start: float, compiles_before, hits_before: int):
    compiles, compile_s = np.subtract(compile_stats("train_steps"), compiles_before)
    summary.update(wall_time_s=time.perf_counter() - start, compile_s=float(compile_s),
                   train_step_compiles=int(compiles),
                   compile_cache_hits=cache_hits() - hits_before)
    return summary


def _write_metrics(run_dir: Path, summary: Dict[str, Any]) -> None:
    """``metrics.json``. After a failure, on a full disk, the record goes over the ``running``
    one in place (its blocks are already the file's; not atomic, but better than none); a
    write that fails even so is said on stderr."""
    path, data = run_dir / "metrics.json", (json.dumps(summary, indent=2, sort_keys=True)
                                            + "\n").encode()
    try:
        write_atomic(path, data)
    except WriteError as err:
        if summary["status"] in ("completed", "running"):
            raise
        try:
            with open(path, "r+b") as f:
                f.write(data)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            print(f"error: the run's status was not recorded: {err}", file=sys.stderr)


def _close_quietly(closing: ExitStack) -> None:
    """Close what a failed run opened; a second failure (the same full disk) is one log line,
    the run's first error is the one reported."""
    while True:
        try:
            closing.close()
            return
        except Exception as err:  # noqa: BLE001 (the run has failed already)
            log.warning("while closing the failed run: %s",
                        describe_error(err) or f"{type(err).__name__}: {err}")


def _train(run: Run, overrides: Sequence[str], stop: StopRequest,
           renderer: Optional[FigureRenderer], closing: ExitStack) -> Dict[str, Any]:
    """The run's files, then its host loop, logging to TensorBoard; the loop's summary. The
    logger's closing (HParams, flush) is left on ``closing``."""
    if not run.writer:
        _log_to_console_only()
    else:
        remove_stale_temps(run.run_dir)
        remove_stale_temps(run.run_dir / "checkpoints")
        # A record from the start: how the run ends replaces it (in place if the disk is full).
        _write_metrics(run.run_dir, {"status": "running", "overrides": list(overrides),
                                     "steps": run.start_step})
    model_summary = agree(lambda: _write_run_files(run, overrides))
    trainer, task = run.cfg.trainer, run.parts.task
    # A resumed run drops what the interrupted attempt logged after its checkpoint.
    logger = (TensorBoardLogger(run.run_dir / "tb", purge_step=run.start_step + 1
                                if run.start_step else None) if run.writer else NullLogger())
    checkpointer = Checkpointer(run.run_dir / "checkpoints", keep=trainer.keep_checkpoints,
                                metric=trainer.best_metric, mode=trainer.best_mode,
                                write=run.writer)
    summary: Dict[str, Any] = {}
    compile_s = compile_stats("train_steps")[1]
    closing.callback(logger.close)
    closing.callback(lambda: logger.hparams(run_hparams(run.cfg, overrides), _tags(summary),
                                            completed=bool(summary)))
    if not hasattr(task, "figures"):
        renderer = None
    elif renderer:
        renderer.set_data(task, jax.device_get(run.data))
    logger.text("config", OmegaConf.to_yaml(run.cfg, resolve=True))
    logger.text("model_summary", model_summary)
    profiler = StepProfiler(run.run_dir / "tb" if run.writer else None, trainer.profile_steps)
    closing.callback(profiler.close)
    loop = HostLoop(run.state, run.data, run.train_rng, task=task,
                    schedule=run.parts.optimizer.schedule, trainer=trainer, chunk=run.chunk,
                    logger=logger, checkpointer=checkpointer, stop=stop, renderer=renderer,
                    options=run.options, peak_flops=run.peak_flops, profiler=profiler)
    _, result = loop.run()
    logger.scalars(result["steps"], "perf",
                   {"compile_s": compile_stats("train_steps")[1] - compile_s})
    result.update(best=checkpointer.best, devices=run.placement,
                  resumed_from=run.start_step if run.resume else None)
    if run.cfg.experiment:
        result["experiment"] = run.cfg.experiment
    summary.update(result)
    return summary


def _write_run_files(run: Run, overrides: Sequence[str]) -> str:
    """``manifest.json`` and ``model_summary.txt`` (process 0); returns the model table."""
    # The table needs only the input's shape: zeros on the host, where jnp.zeros would compile
    # and run two small programs.
    example = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                           jax.eval_shape(run.parts.task.example_input))
    table = run.parts.model.tabulate(run.init_rng, example, console_kwargs={"width": 120})
    if run.writer:
        if not run.start_step:
            inputs.record(run.parts.task, run.run_dir)
        write_manifest(run.run_dir, devices=list(run.mesh.devices.flat), overrides=overrides,
                       start_step=run.start_step, placement=run.placement)
        (run.run_dir / "model_summary.txt").write_text(table)
    return table


def _launch_writer(cfg) -> bool:
    """Whether this process will be process 0 (known before JAX starts)."""
    return launch_process_index(cfg.device) == 0


def _tags(summary: Dict[str, Any]):
    """The HParams tab's metric columns: every eval metric, and the train loss."""
    return ["eval/loss", *(f"eval/{k}" for k in summary.get("eval", {}) if k != "loss"),
            "train/loss"]


def _log_to_console_only() -> None:
    """A process other than 0 leaves the run dir's ``runner.log`` to process 0."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
