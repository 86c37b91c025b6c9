"""Hyperparameter search on scikit-learn's digits (``task=arrays``, an MLP, adamw): lr x width x
weight decay, the same seeded TPE sampler with and without a pruner (runner's
``hydra/sweeper=search``, on the basic launcher and on the fused one), and the baseline users
have had: Hydra's ``hydra-optuna-sweeper`` (Optuna 2.10, no pruner) in a venv of its own.

Each search is one whole ``python -m runner -m`` process, run once (the arms in turn). A trial
ends when its job's ``metrics.json`` is written: its mtime, against the search process's start,
is its completion time (one rule for both sweepers: Hydra's keeps its study in memory). A
trial's value is its final ``eval/accuracy`` (the classifier's ``trainer.best_metric``, what a
job returns to either sweeper); only completed trials count toward the running best (a pruned
trial's last eval is not a final value). The target is the unpruned search's best, less 1 %.
"""

import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import distributions
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from runner.bench.process import process_flags
from runner.io.files import read_metrics
from runner.io.layout import RunPaths

TRIALS, STEPS, EVAL_EVERY, SEED = 24, 2000, 200, 0
QUICK = (2, 20, 10)  # trials, steps, eval_every of --quick
WITHIN = 0.01  # the target: the unpruned search's best, less this fraction
STEPS_GOAL, WALL_GOAL = 0.4, 0.5  # the pruned search's, to the target, over the unpruned's total
FUSED_JOBS = 4  # trials per fused group
METRIC, MODE = "accuracy", "max"  # the objective: eval/accuracy, its final value, maximized
SPACE = {"optimizer.lr": "tag(log, interval(1e-5, 3e-1))",
         "model.features": "choice([16], [64], [256])",
         "optimizer.weight_decay": "tag(log, interval(1e-4, 1.0))"}
HYDRA_OPTUNA = ["hydra-optuna-sweeper==1.3.0", "optuna==2.10.1"]  # the newest release, its pin
HYDRA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
PRUNERS = {"hyperband": "optuna.pruners.HyperbandPruner",
           "halving": "optuna.pruners.SuccessiveHalvingPruner"}
REDUCTION = 3  # both pruners' reduction_factor (Optuna's default)


def bench_search(*, quick: bool = False, cache: Path = Path("bench")) -> dict:
    """The searches (see the module doc); Hydra's baseline venv is made once under
    ``cache/venvs`` (not in ``quick`` mode, which runs ``QUICK``'s few short trials per arm)."""
    trials, steps, eval_every = QUICK if quick else (TRIALS, STEPS, EVAL_EVERY)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        digits = digits_file(root)
        write_configs(root / "conf", trials=trials, steps=steps, eval_every=eval_every)
        common = ["--config-dir", str(root / "conf"), f"task.path={digits}",
                  *process_flags(root, quick=quick)]
        prune = {name: [f"hydra.sweeper.pruner._target_={target}",
                        f"+hydra.sweeper.pruner.min_resource={eval_every}",
                        f"+hydra.sweeper.pruner.reduction_factor={REDUCTION}"]
                 for name, target in PRUNERS.items()}
        prune["hyperband"].append(f"+hydra.sweeper.pruner.max_resource={steps}")
        search = [sys.executable, "-m", "runner", "-m", *common, "hparams_search=bench_search"]
        arms = {"unpruned": search, "hyperband": [*search, *prune["hyperband"]],
                "halving": [*search, *prune["halving"]],
                "fused_hyperband": [*search, *prune["hyperband"], "hydra/launcher=fused",
                                    f"hydra.sweeper.n_jobs={FUSED_JOBS}"]}
        if quick:
            del arms["halving"]
        result: Dict[str, Any] = {}
        for name, cmd in arms.items():
            result[name] = run_search(cmd, root, root / name)
        if quick:
            result["hydra_optuna"] = {"skipped": "--quick: no baseline venv"}
        else:
            python = hydra_optuna_python(cache / "venvs" / "hydra-optuna")
            record = run_search([str(python), "-m", "runner", "-m", *common,
                                 "hparams_search=bench_optuna"], root, root / "hydra_optuna")
            record["sweeper"] = sweeper_target(root / "hydra_optuna")
            if record["sweeper"] != HYDRA_SWEEPER:
                raise SystemExit(f"bench_search: the baseline ran {record['sweeper']}, not "
                                 f"Hydra's optuna sweeper ({HYDRA_SWEEPER})")
            result["hydra_optuna"] = record
    return summarize(result, trials=trials, steps=steps, eval_every=eval_every)


def digits_file(root: Path) -> Path:
    """scikit-learn's digits as ``docs/data.md`` makes it: shuffled (seed 0), 1,437 train and
    360 eval examples of 8x8."""
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    i, n = np.random.default_rng(0).permutation(len(x)), 1437
    path = root / "digits.npz"
    np.savez(path, x_train=x[i[:n]].reshape(-1, 8, 8).astype(np.float32), y_train=y[i[:n]],
             x_eval=x[i[n:]].reshape(-1, 8, 8).astype(np.float32), y_eval=y[i[n:]])
    return path


def write_configs(conf: Path, *, trials: int, steps: int, eval_every: int) -> None:
    """``hparams_search=bench_search`` (runner's sweeper) and ``bench_optuna`` (Hydra's) in
    ``conf/hparams_search``: the same training, space, trials and seed, as a user writes them."""
    train = {"trainer": {"steps": steps, "eval_every": eval_every, "log_every": eval_every,
                         "checkpoint_every": eval_every, "log_images": False,
                         "best_metric": METRIC, "best_mode": MODE}}
    sweeper = {"study_name": "digits", "storage": None, "n_trials": trials, "n_jobs": 1,
               "params": SPACE}
    files = {
        "bench_search": {"defaults": defaults("search"), **train, "hydra": {"sweeper": {
            **sweeper, "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": SEED}}}},
        # Hydra's sweeper: its sampler group's default (tpe), seeded; a failed trial must not
        # stop it (its max_failure_rate is 0 by default, runner's 1).
        "bench_optuna": {"defaults": defaults("optuna"), **train, "hydra": {"sweeper": {
            **sweeper, "direction": "maximize", "max_failure_rate": 1.0,
            "sampler": {"seed": SEED}}}}}
    (conf / "hparams_search").mkdir(parents=True)
    for name, body in files.items():
        text = OmegaConf.to_yaml(OmegaConf.create(body))
        (conf / "hparams_search" / f"{name}.yaml").write_text("# @package _global_\n" + text)


def defaults(sweeper: str) -> List[Dict[str, str]]:
    return [{"override /task": "arrays"}, {"override /model": "mlp"},
            {"override /optimizer": "adamw"}, {"override /hydra/sweeper": sweeper}]


def hydra_optuna_python(venv: Path) -> Path:
    """The python of a venv holding runner (this one's source, without the ``search`` extra)
    and Hydra's optuna sweeper with its Optuna 2.10: made once (the dependencies), runner
    reinstalled on every call (the code measured is this checkout's)."""
    venv = venv.absolute()  # the searches run in a temporary dir
    python, ready = venv / "bin" / "python", venv / "bench-ready"
    source = runner_source()
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip(python, source, *HYDRA_OPTUNA)
        ready.write_text(" ".join([source, *HYDRA_OPTUNA]) + "\n")
    else:
        pip(python, "--no-deps", "--force-reinstall", source)
    return python


def pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_search: pip install {' '.join(args)} failed:\n"
                         f"{proc.stderr[-3000:]}")


def runner_source() -> str:
    """What pip installs as this runner: its source directory when installed from one (an
    editable or local install records it in ``direct_url.json``), else its release on the
    package index. Every installed copy is asked: a source checkout's own ``*.egg-info``,
    which records none, comes first on ``sys.path`` when run from there."""
    import json

    found = list(distributions(name="jax-yaml-runner"))
    for dist in found:
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        if url.startswith("file://"):
            return url[len("file://"):]
    return f"jax-yaml-runner=={found[0].version}"


def sweeper_target(sweep_dir: Path) -> Optional[str]:
    """The ``hydra.sweeper._target_`` a search ran: from its ``multirun.yaml``, else from its
    first job's ``.hydra/hydra.yaml`` (Hydra's optuna sweeper saves no multirun.yaml)."""
    for path in (sweep_dir / "multirun.yaml", sweep_dir / "0" / ".hydra" / "hydra.yaml"):
        if path.exists():
            cfg = OmegaConf.load(path)
            return OmegaConf.select(cfg, "hydra.sweeper._target_")
    return None


def run_search(cmd: List[str], cwd: Path, sweep_dir: Path) -> Dict[str, Any]:
    """One search process into ``sweep_dir``: its wall time, exit status, the load average
    around it and its trials (``read_trials``). A process that fails is recorded, not
    raised: the trials it finished are still measured."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out:
        start = time.time()
        proc = subprocess.run([*cmd, f"hydra.sweep.dir={sweep_dir}"], cwd=cwd, stdout=out,
                              stderr=subprocess.STDOUT)
        wall = time.time() - start
        out.seek(0)
        tail = out.read()[-2000:]
    record = {"wall_s": wall, "returncode": proc.returncode, "load_before": load,
              "load_after": os.getloadavg()[0], "trials": read_trials(sweep_dir, start)}
    if proc.returncode != 0:
        record["output_tail"] = tail
    print(f"search {sweep_dir.name}: {wall:.0f} s, exit {proc.returncode}, "
          f"{len(record['trials'])} trials", file=sys.stderr, flush=True)
    return record


def read_trials(sweep_dir: Path, start: float) -> List[Dict[str, Any]]:
    """Each job's status, steps, final eval value and end (its ``metrics.json``'s mtime,
    seconds after ``start``), in the order they ended."""
    trials = []
    for path in sweep_dir.glob(f"*/{RunPaths.METRICS}"):
        if not path.parent.name.isdigit():
            continue
        m = read_metrics(path.parent)
        trials.append({"job": int(path.parent.name), "status": m.get("status"),
                       "steps": int(m.get("steps") or 0),
                       "value": (m.get("eval") or {}).get(METRIC),
                       "end_s": path.stat().st_mtime - start})
    return sorted(trials, key=lambda t: t["end_s"])


def figures(record: Dict[str, Any], targets: Dict[str, float]) -> Dict[str, Any]:
    """A search's best value, train steps and wall time, and for each of ``targets``
    (name -> value) when its running best (over completed trials, in the order they ended)
    first reached it: ``<name>_s`` after its start, ``<name>_steps`` of the trials ended by
    then, ``<name>_trial`` (None: never)."""
    trials = record["trials"]
    completed = [t for t in trials if t["status"] == "completed" and t["value"] is not None]
    result = {"best": max((t["value"] for t in completed), default=None),
              "trials": len(trials), "completed": len(completed),
              "pruned": sum(t["status"] == "pruned" for t in trials),
              "failed": sum(t["status"] not in ("completed", "pruned") for t in trials),
              "train_steps": sum(t["steps"] for t in trials), "wall_s": record["wall_s"]}
    for name, target in targets.items():
        reached = next((t for t in completed if t["value"] >= target), None)
        result.update({f"{name}_s": None, f"{name}_steps": None, f"{name}_trial": None})
        if reached is not None:
            result.update({f"{name}_s": reached["end_s"], f"{name}_trial": reached["job"],
                           f"{name}_steps": sum(t["steps"] for t in trials
                                                if t["end_s"] <= reached["end_s"])})
    return result


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def summarize(records: Dict[str, Dict[str, Any]], *, trials: int, steps: int,
              eval_every: int) -> dict:
    """Every search's ``figures`` against the unpruned one's best less ``WITHIN`` (and against
    that best itself, a stricter view), the other searches' ratios to the unpruned one and the
    goals: each pruned search on the basic launcher reaches the target within ``STEPS_GOAL``
    of the unpruned search's train steps and ``WALL_GOAL`` of its wall time; the fused pruned
    search is no slower in wall time than the basic one with the same pruner."""
    base = records["unpruned"]
    best = max((t["value"] for t in base["trials"] if t["status"] == "completed"
                and t["value"] is not None), default=None)
    if best is None:
        raise SystemExit(f"bench_search: the unpruned search completed no trial:\n"
                         f"{base.get('output_tail', '')}")
    target = best * (1 - WITHIN)  # eval/accuracy: maximized
    searches: Dict[str, Any] = {}
    for name, record in records.items():
        if "skipped" in record:
            searches[name] = record
            continue
        searches[name] = {**figures(record, {"to_target": target, "to_best": best}),
                          "returncode": record["returncode"],
                          "load_before": record["load_before"],
                          "load_after": record["load_after"],
                          **{k: record[k] for k in ("sweeper", "output_tail") if k in record}}
    unpruned = searches["unpruned"]
    for name, s in searches.items():
        if name == "unpruned" or "skipped" in s:
            continue
        s.update(steps_over_unpruned=ratio(s["train_steps"], unpruned["train_steps"]),
                 wall_over_unpruned=ratio(s["wall_s"], unpruned["wall_s"]),
                 to_target_steps_over_unpruned=ratio(s["to_target_steps"],
                                                     unpruned["train_steps"]),
                 to_target_wall_over_unpruned=ratio(s["to_target_s"], unpruned["wall_s"]),
                 to_target_over_unpruned_to_target=ratio(s["to_target_s"],
                                                         unpruned["to_target_s"]),
                 to_best_over_unpruned_to_best=ratio(s["to_best_s"], unpruned["to_best_s"]))
    goals = {name: {"steps": (s["to_target_steps_over_unpruned"] or float("inf")) <= STEPS_GOAL,
                    "wall": (s["to_target_wall_over_unpruned"] or float("inf")) <= WALL_GOAL}
             for name, s in searches.items() if name in PRUNERS and "skipped" not in s}
    fused, basic = searches["fused_hyperband"], searches["hyperband"]
    # A search that stopped before its last trial is not faster for it.
    ran = fused["trials"] == trials and basic["trials"] == trials
    return {"trials": trials, "steps": steps, "eval_every": eval_every, "seed": SEED,
            "space": SPACE, "objective": f"eval/{METRIC}", "mode": MODE,
            "within": WITHIN, "target": target, "fused_jobs": FUSED_JOBS,
            "reduction_factor": REDUCTION, "hydra_optuna": HYDRA_OPTUNA,
            "searches": searches, "steps_goal": STEPS_GOAL, "wall_goal": WALL_GOAL,
            "pruned_goals_met": goals,
            "fused_over_basic": ratio(fused["wall_s"], basic["wall_s"]),
            "fused_not_slower": ran and fused["wall_s"] <= basic["wall_s"]}
