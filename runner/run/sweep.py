"""Multiruns: each job isolated from the others' failures, resumable, and summarised.

``run_sweep_job`` runs one job: a job whose dir already says ``completed`` (for the same
overrides) is skipped and an interrupted one resumes from its checkpoint, so rerunning a sweep
with the same ``hydra.sweep.dir`` finishes only the missing work; a failing job is recorded and
returns NaN instead of stopping the sweep. A job returns its final eval value of
``trainer.best_metric`` (``job_value``), which also picks the sweep's best job.
``SweepSummary`` (a Hydra callback) writes ``summary.csv`` when the multirun ends and exits 1,
naming the failed jobs, if any failed; a signal stops the sweep with the same ending
(``end_sweep``), naming the command that continues it.
"""

import json
import logging
import math
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import RunnerError, describe_error, first_line
from runner.io import lock
from runner.io.checkpoint import list_checkpoints
from runner.io.files import write_metrics
from runner.io.layout import RunPaths
from runner.platform.preemption import Interrupted
from runner.run.search import TrialLink, Value, is_search
from runner.io.rundir import (MULTIRUN_FILE, Claim, HydraJob, held_run, log_error_line,
                           read_metrics, write_hydra_files)
from runner.config.schema import typed
from runner.run.summary import (ENDED, ending_line, format_table, job_value, rerun_command,
                                summarize, write_csv)

log = logging.getLogger(__name__)


class JobFailed(RunnerError):
    """A job that failed, for a sweeper that marks failed trials itself (Optuna)."""


def marks_failed_trials(hydra_cfg: DictConfig) -> bool:
    """Whether the sweeper (``hydra_cfg.sweeper``) marks failed trials itself (Optuna, runner's
    search): a failed job then raises ``JobFailed`` rather than returning NaN."""
    return "optuna" in str(hydra_cfg.sweeper.get("_target_", "")).lower() or is_search(hydra_cfg)


def run_sweep_job(cfg: DictConfig, run_dir: Path, *, overrides: Sequence[str],
                  parallel: bool, raise_failure: bool = False,
                  hydra_job: Optional[HydraJob] = None,
                  trial: Optional[TrialLink] = None) -> Union[float, Value]:
    """Run one multirun job in ``run_dir``; returns ``job_value``, NaN when it failed (or,
    with ``raise_failure``, raises JobFailed: Optuna marks the trial failed, where a NaN value
    would stop hydra-optuna-sweeper 1.3 with a ValueError of its own). ``hydra_job``: its
    ``.hydra/`` files, written once the dir is the job's. ``trial``: a search's job reports
    each eval to its trial, may be pruned, and returns ``trial.value``."""
    from runner.run.train import run

    done = completed_value(run_dir, overrides, trial)  # another sweep's job: stop this sweep
    if done is not None:
        return done
    try:
        cfg = typed(cfg)  # a value of the wrong type fails this job alone
    except RunnerError as err:
        return _failed(_job_failed(run_dir, overrides, err, hydra_job), raise_failure)
    if parallel:  # several JAX processes share this machine's accelerator and terminal
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        cfg.trainer.progress_bar = False
    try:
        summary = run(cfg, run_dir, overrides=overrides, claim=continue_or_restart(overrides),
                      hydra_job=hydra_job, on_eval=trial.on_eval if trial else None,
                      continue_with=rerun_command(run_dir.parent))
        return trial.value(summary) if trial else job_value(summary)
    except Interrupted as err:
        # SIGTERM/SIGINT is meant for the whole sweep (preemption, Ctrl-C): stop it here;
        # rerunning its command resumes this job and runs the rest.
        raise SystemExit(stop_sweep(err)) from None
    except Exception as err:  # noqa: BLE001  (isolate the failure; it is in metrics.json)
        return _failed(_job_failed(run_dir, overrides, err, hydra_job), raise_failure)


def completed_value(run_dir: Path, overrides: Sequence[str],
                    trial: Optional[TrialLink] = None) -> Optional[Union[float, Value]]:
    """The ``job_value`` (a search's: ``trial.value``) of this very job when ``run_dir``
    holds it completed or pruned (skip it), else None (run it). A completed job with other
    overrides (another sweep's) is a RunnerError: nothing of it is touched."""
    previous = read_metrics(run_dir)
    if previous.get("status") not in ENDED:
        return None
    if previous.get("overrides") != list(overrides):
        raise RunnerError(f"{run_dir} holds a completed job with other overrides "
                          f"({' '.join(previous.get('overrides') or [])}); use another "
                          f"hydra.sweep.dir")
    log.info("%s already %s: skipping it", run_dir, previous["status"])
    return trial.value(previous) if trial else job_value(previous)


def continue_or_restart(overrides: Sequence[str]) -> Claim:
    """A sweep job resumes when its dir holds an interrupted attempt at this very job, and
    otherwise starts anew (an earlier attempt's files are then moved aside)."""
    def claim(run_dir: Path, writer: bool) -> bool:
        return interrupted_here(run_dir, overrides)
    return claim


def _failed(reason: str, raise_failure: bool) -> float:
    if raise_failure:
        raise JobFailed(reason)
    return math.nan


def _job_failed(run_dir: Path, overrides: Sequence[str], err: BaseException,
                hydra_job: Optional[HydraJob]) -> str:
    """Log a job's failure (a RunnerError is the user's to fix: one line; anything else keeps
    its traceback); a job that failed before its run started gets its record (for
    ``summary.csv``) unless its dir is another process's. Returns the reason."""
    reason = describe_error(err) or f"{type(err).__name__}: {err}"
    log.error("job %s (%s) failed: %s", run_dir.name, " ".join(overrides), reason,
              exc_info=not isinstance(err, RunnerError))
    if not isinstance(err, lock.Busy):
        record_failure(run_dir, overrides, reason, hydra_job)
    return reason


def record_failure(run_dir: Path, overrides: Sequence[str], reason: str,
                   hydra_job: Optional[HydraJob] = None) -> None:
    """``metrics.json``, ``.hydra/`` and a ``runner.log`` line of a job that failed before its
    run started, holding its lock; a dir that holds a run (or another process) keeps what it
    has."""
    try:
        lock.check_free(run_dir)
        if held_run(run_dir) is not None:
            return
        with lock.hold(run_dir):
            if hydra_job is not None:
                write_hydra_files(run_dir, hydra_job)
            write_metrics(run_dir, {"status": "failed", "steps": 0,
                                    "overrides": list(overrides), "reason": reason})
            log_error_line(run_dir, __name__, f"job {run_dir.name} ({' '.join(overrides)}) "
                                              f"failed: {reason}")
    except (RunnerError, OSError) as write_err:
        log.error("%s", write_err)


def interrupted_here(run_dir: Path, overrides: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds checkpoints of an unfinished attempt at this very job."""
    try:
        attempts = json.loads(RunPaths(run_dir).manifest.read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return False
    return attempts[-1].get("overrides") == list(overrides) and bool(
        list_checkpoints(RunPaths(run_dir).checkpoints))


class _HeldSweep:
    """The sweep dir this process holds (its lock) while its multirun runs; ``dir`` is None in
    a process that holds none (a joblib or SLURM job's). Not on the callback: Hydra pickles its
    callbacks to send them to the joblib and SLURM launchers' jobs."""

    def __init__(self) -> None:
        self.dir: Optional[Path] = None
        self.config: Optional[DictConfig] = None  # the multirun's, for its summary's ranking
        self.lock = ExitStack()


_HELD = _HeldSweep()


class SweepSummary(Callback):
    """A multirun's own dir: held (its lock) from the start, refused when it holds another
    sweep, and at the end ``<sweep_dir>/summary.csv`` and a table, best job marked."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Called before the sweeper writes multirun.yaml: a refusal here leaves the dir as
        # it was. Hydra turns a callback's exception into a warning: exit here instead.
        sweep_dir, overrides = Path(config.hydra.sweep.dir), list(config.hydra.overrides.task)
        try:
            lock.check_free(sweep_dir)
            refuse_other_sweep(sweep_dir, overrides)
            _HELD.lock.enter_context(lock.hold(sweep_dir))
            _HELD.dir, _HELD.config = sweep_dir, config
            refuse_other_sweep(sweep_dir, overrides)  # as it stands, held
        except RunnerError as err:
            _HELD.lock.close()
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        status = end_sweep(Path(config.hydra.sweep.dir), ranked_by(config))
        if status:  # Hydra turns a callback's exception into a warning (exit 0): exit here
            sys.exit(status)


def end_sweep(sweep_dir: Path, ranking: Optional[Sequence[Tuple[str, str]]] = None) -> int:
    """A sweep's ending, at its end or when a signal stopped it: ``summary.csv`` and the table
    (the best job by ``ranking``, a search's objectives, else by each job's best metric), then,
    if a job did not complete, one ``error:`` line naming each (for an interrupted one, the
    command that continues the sweep); the sweep dir's lock released. The exit status."""
    with _HELD.lock:
        _HELD.dir = _HELD.config = None
        rows = summarize(sweep_dir, ranking)
        if rows:
            write_csv(sweep_dir / "summary.csv", rows)
    if rows:
        print(format_table(rows))
        ranked = ", ".join(dict.fromkeys(r["best_by"] for r in rows if r["best"]))
        print(f"summary: {sweep_dir / 'summary.csv'}" + (f"  (* best final {ranked})"
                                                          if ranked else ""))
    line = ending_line(rows, sweep_dir)
    if line:
        print(line, file=sys.stderr)
    return 1 if line else 0


def stop_sweep(err: BaseException) -> int:
    """A job interrupted by a signal stops its sweep. In the process that holds the sweep
    (the basic and fused launchers) the sweep ends as at its end (``end_sweep``), where Hydra
    would not call ``on_multirun_end``; in a job's own process (joblib, SLURM) the job's line
    is logged. The exit status."""
    if _HELD.dir is None:
        log.error("%s", err)
        return 1
    sweep_dir, config = _HELD.dir, _HELD.config
    if not end_sweep(sweep_dir, ranked_by(config) if config is not None else None):  # no job recorded the stop: it came before the job's run began
        print(f"error: {err}; continue the sweep with: {rerun_command(sweep_dir)}",
              file=sys.stderr)
    return 1


def refuse_other_sweep(sweep_dir: Path, overrides: List[str]) -> None:
    """A sweep dir holds one sweep: a multirun with other overrides is refused (rerunning the
    same one finishes its missing jobs)."""
    stored = sweep_dir / MULTIRUN_FILE
    if not stored.is_file():
        held = held_run(sweep_dir)
        if held:  # a single run's dir
            raise RunnerError(f"{sweep_dir} holds a run ({held}), not a sweep; give the "
                              f"multirun another hydra.sweep.dir")
        return
    try:
        before = OmegaConf.select(OmegaConf.load(stored), "hydra.overrides.task")
    except Exception as err:  # noqa: BLE001 (yaml's and OmegaConf's errors for a bad file)
        raise RunnerError(f"{stored}: not a readable sweep config ({first_line(err)}); use "
                          f"another hydra.sweep.dir") from None
    before = list(before) if before is not None else []
    if before != overrides:
        shown = " ".join(before) or "no overrides"
        raise RunnerError(f"{sweep_dir} holds another sweep ({shown}); rerun that one to "
                          f"finish it, or give this one another hydra.sweep.dir")


def ranked_by(config: DictConfig) -> Optional[List[Tuple[str, str]]]:
    """The columns (and directions) that pick a search's best jobs: its objectives; None for
    another sweep (each job ranked by its own ``trainer.best_metric``)."""
    if not is_search(config.hydra):
        return None
    from runner.run.search import directions, objectives

    names = objectives(config.hydra.sweeper, config)
    return list(zip(names, directions(config.hydra.sweeper, config, names)))
