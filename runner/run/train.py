"""One training run: build it, write its run files, run the host loop, record how it ended."""

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import describe_error
from runner.config.schema import typed
from runner.core.steps import TRAIN_EXAMPLES
from runner.io import inputs, lock, rundir
from runner.io.checkpoint import Checkpointer
from runner.io.renderer import FigureRenderer
from runner.io.files import remove_stale_temps, write_metrics
from runner.io.layout import RUN_FILES, RunPaths
from runner.io.manifest import write_manifest
from runner.io.tb_logger import NullLogger
from runner.io.writers.configured import open_writers, run_info, writer_files
from runner.loop.feed import feeds_for
from runner.loop.callbacks import built_in_callbacks, build_user_callbacks
from runner.loop.host import HostLoop, Refill, Result
from runner.loop.member import EvalHook, Member
from runner.loop.programs import program_for
from runner.platform.compiles import cache_hits, compile_stats
from runner.platform.device import is_primary
from runner.platform.peers import PeerFailed, agree
from runner.platform.preemption import (Interrupted, StopRequest, stop_if_requested,
                                        stop_on_signals)
from runner.run.build import Parts, Run, build_parts, build_run
from runner.run.hparams import end_hparams, job_choices, run_hparams
from runner.run.trust import resume_command, untrusted_modules
from runner.tasks.base import DrawsFigures

log = logging.getLogger(__name__)


def run(cfg, run_dir: Path, *, overrides: Sequence[str] = (), resume: bool = False,
        claim: Optional[rundir.Claim] = None, hydra_job: Optional[rundir.HydraJob] = None,
        announce: Optional[Callable[[DictConfig], None]] = None,
        parts: Optional[Parts] = None, choices: Optional[Dict[str, Any]] = None,
        continue_with: Optional[str] = None, on_eval: Optional[EvalHook] = None
        ) -> Dict[str, Any]:
    """Train as ``cfg`` says, writing TensorBoard events, checkpoints, ``metrics.json``,
    ``manifest.json`` and ``model_summary.txt`` into ``run_dir``. Returns the run's summary
    (what ``metrics.json`` holds: ``summary["eval"]["loss"]`` is the final eval loss).

    With ``resume``, continue from the newest valid checkpoint in ``run_dir``; without it, a
    dir that holds a run is refused (``cfg.overwrite`` moves that run aside). ``claim``
    decides instead (``runner.io.rundir``). ``hydra_job``: the ``.hydra/`` files to write once
    the dir is this run's; ``announce`` is called with the config once it is checked;
    ``parts``: the config's task, model and optimizer when the caller built them already;
    ``choices``: the config's group options, for HParams (default: the current Hydra job's);
    ``continue_with``: the command a stop (a signal) names to continue (default: resume=).
    ``on_eval``: asked after each eval whether to stop there (``runner.loop.member.Stop``).
    SIGTERM and SIGINT save a checkpoint at the current step and stop the run.
    ``metrics.json`` is written however the run ends: ``"status"`` is ``completed``,
    ``interrupted`` or ``failed``, with the ``reason``; ``overrides`` (the job's command-line
    overrides) are recorded. A failed run writes it first, then closes its files (their own
    errors then only logged). The run holds the run dir's lock (``runner.io.lock``) throughout;
    nothing is written into the dir before its checks pass and the lock is held.
    """
    if resume and claim is None:
        claim = rundir.resuming
    session = Session(cfg, run_dir, overrides=overrides, claim=claim, hydra_job=hydra_job,
                      choices=choices, parts=parts, continue_with=continue_with,
                      on_eval=on_eval)
    with stop_on_signals() as stop:
        try:
            stop_if_requested("before the run started", stop)  # nothing written: no record
            session.open(announce=announce)
            result, = train_group([session], stop)
            if isinstance(result, BaseException):
                raise result
            return session.finish(result)
        except Exception as err:
            session.fail(err)
            raise


class Session:
    """One run's records around its host loop: ``open`` checks the config, claims the run dir
    (``claim``: see ``runner.io.rundir``) and builds the run and its member of a host loop,
    ``finish`` (the loop's summary of it) or ``fail`` (its exception) closes its files and writes
    ``metrics.json``. ``run`` does the three with a loop of its own; a fused sweep
    (``runner.run.fused``) opens several and trains them in one loop (``train_group``)."""

    def __init__(self, cfg, run_dir: Path, *, overrides: Sequence[str] = (),
                 claim: Optional[rundir.Claim] = None,
                 hydra_job: Optional[rundir.HydraJob] = None,
                 choices: Optional[Dict[str, Any]] = None,
                 log_filter: Optional[logging.Filter] = None, parts: Optional[Parts] = None,
                 continue_with: Optional[str] = None, on_eval: Optional[EvalHook] = None):
        self.cfg, self.run_dir, self.overrides, self.on_eval = cfg, run_dir, overrides, on_eval
        self.continue_with = continue_with  # a sweep job's: the sweep's command
        # A fresh run's by default: a dir that holds a run is refused (or, overwrite=true,
        # set aside).
        self.claim = claim or rundir.fresh(overwrite=bool(cfg.get("overwrite")))
        self.hydra_job, self.resume, self.parts = hydra_job, False, parts
        self.committed = False  # the run dir is this run's: its files may be written
        # The job's group options, for HParams (a fused group trains after Hydra's job ended)
        self.choices = job_choices() if choices is None else choices
        self.compiled_name = "train_steps"
        self.start, self.compiles_before, self.hits_before = (
            time.perf_counter(), compile_stats(self.compiled_name), cache_hits())
        self.summary: Dict[str, Any] = {"status": "failed", "steps": 0,
                                        "overrides": list(overrides)}
        self.writer = is_primary(cfg.device)
        self.held = ExitStack()  # the run dir's lock and its log, released last
        # The run's log lines wait in memory until the run dir is this run's.
        self.log = self.held.enter_context(rundir.buffered_log(log_filter))
        self.closing = ExitStack()  # open files and threads, closed once metrics.json says how
        self.run: Optional[Run] = None
        self.member: Optional[Member] = None

    def open(self, *, announce: Optional[Callable[[DictConfig], None]] = None) -> Member:
        cfg = typed(self.cfg)
        # every value checked before the run dir is touched
        parts = self.parts or build_parts(cfg)
        self.writer_files = writer_files(cfg.logger)  # its metric writers checked too
        if self.writer:
            lock.check_free(self.run_dir)
            self.claim(self.run_dir, True)  # a refusal reads only
            before = self.held.enter_context(lock.hold(self.run_dir))
            # Refused after all (the run's own checks, a resume no checkpoint fits): the lock
            # file gets its bytes back, as every other file in the dir keeps its own.
            self.held.callback(lambda: self.committed or lock.sign(self.run_dir, before))
        self.resume = self.claim(self.run_dir, self.writer)  # as the dir stands, held
        if announce:
            announce(cfg)
        # Started first: its thread imports matplotlib while the run builds and compiles.
        renderer = (self.closing.enter_context(FigureRenderer()) if cfg.trainer.log_images
                    and self.writer else None)
        self.run = build_run(cfg, self.run_dir, resume=self.resume, parts=parts)
        if self.writer:
            self._commit()
        else:  # another process writes the run dir; this one records only its own failure
            self.committed = True
        self.member = _prepare(self.run, self.overrides, renderer, self.closing, self.summary,
                               self.choices, self.on_eval)
        if self.continue_with:
            self.member.resume_command = self.continue_with
        return self.member

    def _commit(self) -> None:
        """The run dir is this run's from here (a failure now is recorded in it): an earlier
        run's or attempt's files moved aside (unless resumed; a dir without one keeps
        whatever else it holds), then its ``.hydra/`` files and its ``runner.log``."""
        self.committed = True
        if not self.resume and rundir.held_run(self.run_dir):  # overwrite=true, a sweep job
            rundir.set_aside(self.run_dir, (*RUN_FILES, *self.writer_files))
        if self.hydra_job is not None:
            rundir.write_hydra_files(self.run_dir, self.hydra_job)
        self.log.write_to(self.run_dir)

    def finish(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """The loop's ``result`` completed: the last events, HParams and ``metrics.json``."""
        run = self.run
        self.member.log_compile(result["steps"], float(
            compile_stats(self.compiled_name)[1] - self.compiles_before[1]))
        result.update(best=self.member.checkpointer.best, devices=run.placement,
                      resumed_from=run.start_step if run.resume else None)
        if run.cfg.experiment:
            result["experiment"] = run.cfg.experiment
        self.summary.update(result)
        agree(self.closing.close)  # the last events and HParams flushed: a failure fails it
        if self.writer:
            write_metrics(self.run_dir, self._timed())
        self.held.close()
        return self.summary

    def fail(self, err: BaseException) -> None:
        """Record how the run ended (an exception), then close its files quietly."""
        self.summary["reason"] = describe_error(err) or f"{type(err).__name__}: {err}"
        if isinstance(err, Interrupted):
            self.summary.update(status="interrupted", steps=err.step)
        # Before the commit the dir is not this run's (a check failed, or it was refused):
        # nothing is written. After it, process 0 records how the run ended (another
        # process too when only it knows: its own failure).
        if self.committed and (self.writer or not isinstance(err, (Interrupted, PeerFailed))):
            write_metrics(self.run_dir, self._timed())
        _close_quietly(self.closing)
        self.held.close()

    def begin(self, compiled_name: str) -> None:
        """Its training starts now (a fused sweep opens every job first): wall time,
        compilations of the jitted function ``compiled_name`` and cache hits count from here."""
        self.compiled_name = compiled_name
        self.start, self.compiles_before, self.hits_before = (
            time.perf_counter(), compile_stats(compiled_name), cache_hits())

    def _timed(self) -> Dict[str, Any]:
        compiles, compile_s = np.subtract(compile_stats(self.compiled_name),
                                          self.compiles_before)
        self.summary.update(wall_time_s=time.perf_counter() - self.start,
                            compile_s=float(compile_s), train_step_compiles=int(compiles),
                            compile_cache_hits=cache_hits() - self.hits_before)
        return self.summary


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


def train_group(sessions: Sequence[Session], stop: StopRequest,
                refill: Optional[Refill] = None) -> List[Result]:
    """Train the opened sessions' runs (of equal ``runner.loop.groups.group_key``) in one host
    loop: a run alone on its own program, several fused into one. Each one's summary, or the
    exception it ended with (``refill``: an ended member's slot takes the next run, and the
    result is each slot's last one's; ``runner.loop.host.HostLoop``)."""
    runs = [session.run for session in sessions]
    with feeds_for(runs) as feeds:
        program = program_for(runs[0].spec, [(r.state, r.data, r.train_rng) for r in runs],
                              feeds)
        return HostLoop(program, [session.member for session in sessions],
                        trainer=runs[0].cfg.trainer, cadence=runs[0].cadence, stop=stop,
                        peak_flops=runs[0].peak_flops, refill=refill).run()


def _prepare(run: Run, overrides: Sequence[str], renderer: Optional[FigureRenderer],
             closing: ExitStack, summary: Dict[str, Any], choices: Dict[str, Any],
             on_eval: Optional[EvalHook]) -> Member:
    """The run's files, its metric writers and checkpointer, its callbacks (runner's own and
    the config's, ``runner.loop.callbacks``: fresh instances, its own) and its member of a host
    loop. The writers' closing (HParams, with how the run ended once ``summary`` says: its
    status and end; flush) is left on ``closing``."""
    if not run.writer:
        _log_to_console_only()
    else:
        paths = RunPaths(run.run_dir)
        remove_stale_temps(run.run_dir)
        remove_stale_temps(paths.checkpoints)
        remove_stale_temps(paths.hydra)  # resume= rewrites its config there
        # A record from the start: how the run ends replaces it (in place if the disk is full).
        write_metrics(run.run_dir, {"status": "running", "overrides": list(overrides),
                                     "steps": run.start_step})
    model_summary = agree(lambda: _write_run_files(run, overrides))
    trainer, task = run.cfg.trainer, run.parts.task
    # Each writer of a resumed run drops what the interrupted attempt wrote after its
    # checkpoint (runner.io.writers).
    logger = (open_writers(run.cfg.logger, run_info(run.run_dir, run.start_step))
              if run.writer else NullLogger())
    checkpointer = Checkpointer(RunPaths(run.run_dir).checkpoints, keep=trainer.keep_checkpoints,
                                metric=trainer.best_metric, mode=trainer.best_mode,
                                write=run.writer)
    closing.callback(logger.close)
    hparams = run_hparams(run.cfg, overrides, choices=choices,
                          platform=run.placement["platform"])
    closing.callback(lambda: logger.hparams({**hparams, **end_hparams(summary)},
                                            status=summary.get("status")))
    if not isinstance(task, DrawsFigures):
        renderer = None
    elif renderer:
        # The figures' arrays, not a training set kept on the device
        renderer.set_data(task, jax.device_get(
            {k: v for k, v in run.data.items() if k != TRAIN_EXAMPLES}))
    logger.text("config", OmegaConf.to_yaml(run.cfg, resolve=True))
    logger.text("model_summary", model_summary)
    callbacks = [*built_in_callbacks(trainer, renderer),
                 *build_user_callbacks(run.cfg.get("callbacks"))]
    return Member(run.run_dir, spec=run.spec, cadence=run.cadence, data=run.data,
                  trainer=trainer, logger=logger, checkpointer=checkpointer,
                  start_step=run.start_step, callbacks=callbacks,
                  resume_command=resume_command(run.run_dir, run.cfg), on_eval=on_eval)


def _write_run_files(run: Run, overrides: Sequence[str]) -> str:
    """``manifest.json`` and ``model_summary.txt`` (process 0); returns the model table."""
    # The table needs only the input's shape: zeros on the host, where jnp.zeros would compile
    # and run two small programs.
    example = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                           jax.eval_shape(run.parts.task.example_input))
    # Plain text: the table goes to a file and to TensorBoard, where colour codes are noise
    # (flax's tabulate forces a terminal's).
    table = run.parts.model.tabulate(run.init_rng, example,
                                     console_kwargs={"width": 120, "color_system": None})
    if run.writer:
        if not run.start_step:
            inputs.record(run.parts.task, run.run_dir)
        write_manifest(run.run_dir, devices=list(run.mesh.devices.flat), overrides=overrides,
                       start_step=run.start_step, placement=run.placement,
                       user_modules=untrusted_modules(run.cfg))
        RunPaths(run.run_dir).model_summary.write_text(table)
    return table


def _log_to_console_only() -> None:
    """A process other than 0 leaves the run dir's ``runner.log`` to process 0."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
