"""A sweep's summary: a row per job (``summary.csv`` and the table), the job that is best by
its ``trainer.best_metric``, and the ``error:`` line of a sweep whose jobs did not all complete,
naming the command that continues it."""

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from runner.config.errors import runner_command
from runner.io.files import write_atomic
from runner.io.layout import RunPaths
from runner.io.rundir import MULTIRUN_FILE, read_metrics

ENDED = ("completed", "pruned")  # a job's statuses that a rerun of its sweep keeps


def job_value(summary: Dict[str, Any]) -> float:
    """What a sweep job returns to its sweeper: the final eval value of the metric that
    picked its best (``trainer.best_metric``, as ``summary["best"]`` records it); NaN when
    there is none. The sweeper minimises or maximises it as its own config says (Optuna's
    ``direction``)."""
    metric = str((summary.get("best") or {}).get("metric", "")).replace("eval/", "", 1)
    return float((summary.get("eval") or {}).get(metric, math.nan))


def ending_line(rows: List[Dict[str, Any]], sweep_dir: Path) -> Optional[str]:
    """The ``error:`` line of a sweep whose jobs did not all complete; None if they did."""
    failed = [r for r in rows if r["status"] not in ENDED]
    if not any(r["status"] == "interrupted" for r in failed):
        return (f"error: {len(failed)} of {len(rows)} jobs failed: " + "; ".join(
            f"job {r['job']} ({r['overrides']}): {r['reason']}" for r in failed)
                if failed else None)
    jobs = "; ".join(f"job {r['job']} interrupted at step {r['steps']}"
                     if r["status"] == "interrupted"
                     else f"job {r['job']} ({r['overrides']}): {r['reason']}" for r in failed)
    return (f"error: {len(failed)} of {len(rows)} jobs did not complete: {jobs}; continue "
            f"the sweep with: {rerun_command(sweep_dir)}")


def rerun_command(sweep_dir: Path) -> str:
    """The command that continues the sweep in ``sweep_dir``: its own, as its ``multirun.yaml``
    records it, in that dir (a completed job is skipped, an interrupted one resumes)."""
    where = f"hydra.sweep.dir={os.path.abspath(sweep_dir)}"
    try:
        hydra = OmegaConf.load(sweep_dir / MULTIRUN_FILE).hydra
        given = OmegaConf.to_container(hydra.overrides, resolve=False)
        sources = OmegaConf.to_container(hydra.runtime.config_sources, resolve=False)
        name = hydra.job.config_name
    except Exception:  # noqa: BLE001 (no readable multirun.yaml: the sweep's words instead)
        return f"the sweep's command with {where}"
    args = ["-m"]
    for source in sources:  # --config-dir
        if source.get("provider") == "command-line":
            args += ["--config-dir", str(source["path"]).replace("file://", "", 1)]
    if name != "config":
        args += ["--config-name", name]
    args += [o for o in given.get("hydra", []) if not o.startswith(("hydra.mode=",
                                                                     "hydra.sweep.dir="))]
    return runner_command(*args, *given.get("task", []), where)


def summarize(sweep_dir: Path, ranking: Optional[Sequence[Tuple[str, str]]] = None
              ) -> List[Dict[str, Any]]:
    """One row per job dir of the sweep: overrides, status (``pruned`` with its step), final
    metrics, times, and ``*`` on the best completed jobs: by ``ranking``'s columns and
    directions when given (a search's objectives; several: their Pareto front), else by each
    job's ``trainer.best_metric``'s final eval value (jobs ranked by different metrics or modes
    are compared only among themselves)."""
    rows = []
    job_dirs = [p.parent.parent for p in sweep_dir.glob(f"*/{RunPaths.HYDRA}/overrides.yaml")]
    by_number = lambda p: (int(p.name) if p.name.isdigit() else math.inf, p.name)  # noqa: E731
    for job_dir in sorted(job_dirs, key=by_number):
        m = read_metrics(job_dir)
        row = {"job": job_dir.name, "overrides": " ".join(m.get("overrides") or []),
               "status": m.get("status", "missing"), "best": "",
               "reason": m.get("reason") or ("" if m else "no metrics.json (killed?)")}
        if row["status"] == "running":  # the record a run starts with: it never ended
            row["reason"] = "still running, or killed"
        row.update({f"eval/{k}": v for k, v in (m.get("eval") or {}).items()})
        row.update({f"train/{k}": v for k, v in (m.get("train") or {}).items()})
        row.update({k: m.get(k) for k in ("steps", "wall_time_s", "compile_s",
                                          "train_step_compiles")})
        if m.get("pruned_at") is not None:
            row["pruned_at"] = m["pruned_at"]
        rule = _best_rule(m)
        row["best_by"] = f"{rule[0]} ({rule[1]})" if rule else ""
        rows.append((row, m))
    if ranking:
        _mark_front([row for row, _ in rows], ranking)
    else:
        _mark_best(rows)
    return [row for row, _ in rows]


def _mark_best(rows: List[Tuple[Dict[str, Any], Dict[str, Any]]]) -> None:
    """``*`` on the completed job with the best final value of its own best metric, among
    the jobs of one (metric, mode)."""
    ranked: Dict[Tuple[str, str], list] = {}
    for row, m in rows:
        rule = _best_rule(m)
        if rule and row["status"] == "completed" and math.isfinite(job_value(m)):
            ranked.setdefault(rule, []).append((job_value(m), row))
    for (_, mode), jobs in ranked.items():
        (max if mode == "max" else min)(jobs, key=lambda job: job[0])[1]["best"] = "*"


def _mark_front(rows: List[Dict[str, Any]], ranking: Sequence[Tuple[str, str]]) -> None:
    """``*`` on the completed jobs that no other beats on every column of ``ranking`` (one
    column: the first best); each ``best_by`` names the columns."""
    done = [r for r in rows if r["status"] == "completed"
            and all(math.isfinite(r.get(column, math.nan)) for column, _ in ranking)]
    signs = [1.0 if direction == "minimize" else -1.0 for _, direction in ranking]
    for i in pareto_front([[s * r[column] for s, (column, _) in zip(signs, ranking)]
                           for r in done]):
        done[i]["best"] = "*"
    for row in rows:
        row["best_by"] = ", ".join(f"{column} ({direction[:3]})" for column, direction in ranking)


def pareto_front(points: Sequence[Sequence[float]]) -> List[int]:
    """The indices of the points (each objective to minimise) that no other point dominates;
    of one objective, the first smallest."""
    if points and len(points[0]) == 1:
        return [min(range(len(points)), key=lambda i: points[i][0])]
    dominated = lambda p, q: all(b <= a for a, b in zip(p, q)) and list(q) != list(p)  # noqa
    return [i for i, p in enumerate(points) if not any(dominated(p, q) for q in points)]


def _best_rule(metrics: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(metric, mode) that ranks a job, as its ``metrics.json`` records its best."""
    best = metrics.get("best") or {}
    return (best["metric"], best["mode"]) if {"metric", "mode"} <= set(best) else None


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
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
