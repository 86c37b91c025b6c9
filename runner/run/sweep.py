"""Multiruns: each job isolated from the others' failures, resumable, and summarised.

``run_sweep_job`` runs one job: a job whose dir already says ``completed`` (for the same
overrides) is skipped and an interrupted one resumes from its checkpoint, so rerunning a sweep
with the same ``hydra.sweep.dir`` finishes only the missing work; a failing job is recorded and
returns NaN instead of stopping the sweep.
``SweepSummary`` (a Hydra callback) writes ``summary.csv`` when the multirun ends and exits 1,
naming the failed jobs, if any failed.
"""

import csv
import io
import json
import logging
import math
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import RunnerError, describe_error, first_line
from runner.io import lock
from runner.io.checkpoint import list_checkpoints
from runner.io.files import write_atomic
from runner.platform.preemption import Interrupted
from runner.run.search import TrialLink, Value, is_search, pareto_front
from runner.io.rundir import (MULTIRUN_FILE, Claim, HydraJob, held_run, log_error_line,
                           read_metrics, write_hydra_files)
from runner.config.schema import typed

log = logging.getLogger(__name__)
ENDED = ("completed", "pruned")  # a job's statuses that a rerun of its sweep keeps


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
    """Run one multirun job in ``run_dir``; returns its eval loss, NaN when it failed (or,
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
                      hydra_job=hydra_job, on_eval=trial.on_eval if trial else None)
        return trial.value(summary) if trial else summary["eval"]["loss"]
    except Interrupted as err:
        # SIGTERM/SIGINT is meant for the whole sweep (preemption, Ctrl-C): stop it here;
        # rerunning the command resumes this job and runs the rest.
        log.error("%s", err)
        raise SystemExit(1) from None
    except Exception as err:  # noqa: BLE001  (isolate the failure; it is in metrics.json)
        return _failed(_job_failed(run_dir, overrides, err, hydra_job), raise_failure)


def completed_value(run_dir: Path, overrides: Sequence[str],
                    trial: Optional[TrialLink] = None) -> Optional[Union[float, Value]]:
    """The eval loss (a search's: ``trial.value``) of this very job when ``run_dir`` holds it
    completed or pruned (skip it), else None (run it). A completed job with other overrides
    (another sweep's) is a RunnerError: nothing of it is touched."""
    previous = read_metrics(run_dir)
    if previous.get("status") not in ENDED:
        return None
    if previous.get("overrides") != list(overrides):
        raise RunnerError(f"{run_dir} holds a completed job with other overrides "
                          f"({' '.join(previous.get('overrides', []))}); use another "
                          f"hydra.sweep.dir")
    log.info("%s already %s: skipping it", run_dir, previous["status"])
    return trial.value(previous) if trial else previous["eval"]["loss"]


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
    text = json.dumps({"status": "failed", "steps": 0, "overrides": list(overrides),
                       "reason": reason}, indent=2, sort_keys=True) + "\n"
    try:
        lock.check_free(run_dir)
        if held_run(run_dir) is not None:
            return
        with lock.hold(run_dir):
            if hydra_job is not None:
                write_hydra_files(run_dir, hydra_job)
            write_atomic(run_dir / "metrics.json", text.encode())
            log_error_line(run_dir, __name__, f"job {run_dir.name} ({' '.join(overrides)}) "
                                              f"failed: {reason}")
    except (RunnerError, OSError) as write_err:
        log.error("%s", write_err)


def interrupted_here(run_dir: Path, overrides: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds checkpoints of an unfinished attempt at this very job."""
    try:
        attempts = json.loads((run_dir / "manifest.json").read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return False
    return attempts[-1].get("overrides") == list(overrides) and bool(
        list_checkpoints(run_dir / "checkpoints"))


# The sweep dir's lock while its multirun runs. Not on the callback: Hydra pickles its
# callbacks to send them to the joblib and SLURM launchers' jobs.
_SWEEP_HELD = ExitStack()


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
            _SWEEP_HELD.enter_context(lock.hold(sweep_dir))
            refuse_other_sweep(sweep_dir, overrides)  # as it stands, held
        except RunnerError as err:
            _SWEEP_HELD.close()
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        with _SWEEP_HELD:
            sweep_dir = Path(config.hydra.sweep.dir)
            rows = summarize(sweep_dir, ranked_by(config))
            if not rows:
                return
            _write_csv(sweep_dir / "summary.csv", rows)
        print(format_table(rows))
        print(f"summary: {sweep_dir / 'summary.csv'}")
        failed = [r for r in rows if r["status"] not in ENDED]
        if failed:
            # Hydra turns a callback's exception into a warning (exit 0); exit here instead.
            print(f"error: {len(failed)} of {len(rows)} jobs failed: " + "; ".join(
                f"job {r['job']} ({r['overrides']}): {r['reason']}" for r in failed),
                file=sys.stderr)
            sys.exit(1)


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


def ranked_by(config: DictConfig) -> List[Tuple[str, str]]:
    """The columns (and directions) that pick a sweep's best job: a search's objectives, else
    the eval loss."""
    if is_search(config.hydra):
        from runner.run.search import directions, objectives

        names = objectives(config.hydra.sweeper, config.trainer)
        return list(zip(names, directions(config.hydra.sweeper, config.trainer, names)))
    return [("eval/loss", "minimize")]


def summarize(sweep_dir: Path,
              ranking: Sequence[Tuple[str, str]] = (("eval/loss", "minimize"),)
              ) -> List[Dict[str, Any]]:
    """One row per job dir of the sweep: overrides, status, final metrics, times, best (by
    ``ranking``'s columns and directions; several: each job on their Pareto front)."""
    rows = []
    job_dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    by_number = lambda p: (int(p.name) if p.name.isdigit() else math.inf, p.name)  # noqa: E731
    for job_dir in sorted(job_dirs, key=by_number):
        m = read_metrics(job_dir)
        row = {"job": job_dir.name, "overrides": " ".join(m.get("overrides", [])),
               "status": m.get("status", "missing"), "best": "",
               "reason": m.get("reason", "" if m else "no metrics.json (killed?)")}
        if row["status"] == "running":  # the record a run starts with: it never ended
            row["reason"] = "still running, or killed"
        row.update({f"eval/{k}": v for k, v in m.get("eval", {}).items()})
        row.update({f"train/{k}": v for k, v in m.get("train", {}).items()})
        row.update({k: m.get(k) for k in ("steps", "wall_time_s", "compile_s",
                                          "train_step_compiles")})
        if "pruned_at" in m:
            row["pruned_at"] = m["pruned_at"]
        rows.append(row)
    done = [r for r in rows if r["status"] == "completed"
            and all(math.isfinite(r.get(column, math.nan)) for column, _ in ranking)]
    signs = [1.0 if direction == "minimize" else -1.0 for _, direction in ranking]
    for i in pareto_front([[s * r[column] for s, (column, _) in zip(signs, ranking)]
                           for r in done]):
        done[i]["best"] = "*"
    return rows


def _write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())


def format_table(rows: List[Dict[str, Any]]) -> str:
    """The summary as an aligned text table (metrics to 4 significant digits)."""
    columns = [c for c in dict.fromkeys(k for row in rows for k in row)
               if c.startswith("eval/") or c in ("job", "overrides", "status", "wall_time_s",
                                                  "best")]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa
    shown = lambda row, c: (f"pruned@{row['pruned_at']}"  # noqa: E731
                            if c == "status" and "pruned_at" in row else cell(row.get(c)))
    table = [columns] + [[shown(row, c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)

