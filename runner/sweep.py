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
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from runner import lock
from runner.checkpoint import list_checkpoints, write_atomic
from runner.device import launch_process_index
from runner.errors import RunnerError, describe_error
from runner.preemption import Interrupted
from runner.schema import typed

log = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> Dict[str, Any]:
    """The run's ``metrics.json``, or {} when there is none (never started, or killed)."""
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


class JobFailed(RunnerError):
    """A job that failed, for a sweeper that marks failed trials itself (Optuna)."""


def run_sweep_job(cfg: DictConfig, run_dir: Path, *, overrides: Sequence[str],
                  parallel: bool, raise_failure: bool = False) -> float:
    """Run one multirun job in ``run_dir``; returns its eval loss, NaN when it failed (or,
    with ``raise_failure``, raises JobFailed: Optuna marks the trial failed, where a NaN value
    would stop hydra-optuna-sweeper 1.3 with a ValueError of its own)."""
    from runner.train import run

    done = completed_value(run_dir, overrides)  # another sweep's job there: stop this sweep
    if done is not None:
        return done
    try:
        cfg = typed(cfg)  # a value of the wrong type fails this job alone
    except RunnerError as err:
        return _failed(_failed_before_run(run_dir, overrides, err), raise_failure)
    if parallel:  # several JAX processes share this machine's accelerator and terminal
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        cfg.trainer.progress_bar = False
    writer = launch_process_index(cfg.device) == 0  # one process of a multi-process job
    try:
        with lock.hold(run_dir) if writer else nullcontext():
            resume = resume_or_set_aside(run_dir, overrides, writer=writer)
            return run(cfg, run_dir, overrides=overrides, resume=resume)["eval"]["loss"]
    except Interrupted as err:
        # SIGTERM/SIGINT is meant for the whole sweep (preemption, Ctrl-C): stop it here;
        # rerunning the command resumes this job and runs the rest.
        log.error("%s", err)
        raise SystemExit(1) from None
    except Exception as err:  # noqa: BLE001  (isolate the failure; it is in metrics.json)
        reason = (read_metrics(run_dir).get("reason") if not isinstance(err, lock.Busy)
                  else None) or describe_error(err) or f"{type(err).__name__}: {err}"
        # A RunnerError is the user's to fix: one line. Anything else keeps its traceback.
        log.error("job %s (%s) failed: %s", run_dir.name, " ".join(overrides), reason,
                  exc_info=not isinstance(err, RunnerError))
        return _failed(reason, raise_failure)


def completed_value(run_dir: Path, overrides: Sequence[str]) -> Optional[float]:
    """The eval loss of this very job when ``run_dir`` holds it completed (skip it), else
    None (run it). A completed job with other overrides (another sweep's) is a RunnerError:
    nothing of it is touched."""
    previous = read_metrics(run_dir)
    if previous.get("status") != "completed":
        return None
    if previous.get("overrides") != list(overrides):
        raise RunnerError(f"{run_dir} holds a completed job with other overrides "
                          f"({' '.join(previous.get('overrides', []))}); use another "
                          f"hydra.sweep.dir")
    log.info("%s already completed: skipping it", run_dir)
    return previous["eval"]["loss"]


def resume_or_set_aside(run_dir: Path, overrides: Sequence[str], *, writer: bool) -> bool:
    """Whether the job resumes (``run_dir`` holds an interrupted attempt at it); otherwise an
    earlier attempt's files are set aside (by the writing process). Call it holding the lock."""
    if interrupted_here(run_dir, overrides):
        log.info("%s was interrupted: resuming it from its newest checkpoint", run_dir)
        return True
    if writer:
        set_aside_earlier_attempt(run_dir)
    return False


def _failed(reason: str, raise_failure: bool) -> float:
    if raise_failure:
        raise JobFailed(reason)
    return math.nan


def _failed_before_run(run_dir: Path, overrides: Sequence[str], err: RunnerError) -> str:
    """A job whose config is not valid: its ``metrics.json`` says so; the reason."""
    log.error("job %s (%s) failed: %s", run_dir.name, " ".join(overrides), err)
    record_failure(run_dir, overrides, str(err))
    return str(err)


def record_failure(run_dir: Path, overrides: Sequence[str], reason: str) -> None:
    """``metrics.json`` of a job that failed before its run started (holding its lock)."""
    text = json.dumps({"status": "failed", "steps": 0, "overrides": list(overrides),
                       "reason": reason}, indent=2, sort_keys=True) + "\n"
    try:
        with lock.hold(run_dir):
            write_atomic(run_dir / "metrics.json", text.encode())
    except RunnerError as write_err:
        log.error("%s", write_err)


def interrupted_here(run_dir: Path, overrides: Sequence[str]) -> bool:
    """Whether ``run_dir`` holds checkpoints of an unfinished attempt at this very job."""
    try:
        attempts = json.loads((run_dir / "manifest.json").read_text())["attempts"]
    except (OSError, ValueError, KeyError):
        return False
    return attempts[-1].get("overrides") == list(overrides) and bool(
        list_checkpoints(run_dir / "checkpoints"))


def set_aside_earlier_attempt(run_dir: Path) -> None:
    """Move what an interrupted or failed attempt left into ``attempts/<n>/`` (kept, not mixed
    into this attempt's TensorBoard curves and checkpoints)."""
    left = [p for p in (run_dir / "tb", run_dir / "checkpoints", run_dir / "metrics.json",
                        run_dir / "manifest.json", run_dir / "inputs.json") if p.exists()]
    if not left:
        return
    dest = run_dir / "attempts" / str(len(list((run_dir / "attempts").glob("*"))) + 1)
    dest.mkdir(parents=True)
    for path in left:
        shutil.move(str(path), str(dest / path.name))
    log.info("set aside the earlier attempt's files in %s", dest)


class SweepSummary(Callback):
    """At the end of a multirun: ``<sweep_dir>/summary.csv`` and a table, best job marked."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir)
        if not rows:
            return
        _write_csv(sweep_dir / "summary.csv", rows)
        print(format_table(rows))
        print(f"summary: {sweep_dir / 'summary.csv'}")
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            # Hydra turns a callback's exception into a warning (exit 0); exit here instead.
            print(f"error: {len(failed)} of {len(rows)} jobs failed: " + "; ".join(
                f"job {r['job']} ({r['overrides']}): {r['reason']}" for r in failed),
                file=sys.stderr)
            sys.exit(1)


def summarize(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per job dir of the sweep: overrides, status, final metrics, times, best."""
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
        rows.append(row)
    done = [r for r in rows if r["status"] == "completed"
            and math.isfinite(r.get("eval/loss", math.nan))]
    if done:
        min(done, key=lambda r: r["eval/loss"])["best"] = "*"
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
    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table)

