"""hydra/sweeper=runner (runner's default): the jobs of Hydra's basic sweeper, checked before
launch by composing one job per composition signature instead of each job; Hydra's own sweeper
test suites pass against it."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite, LauncherTestSuite
from omegaconf import OmegaConf
from pytest import mark

from conftest import group_options, run_cli
from test_fused_launcher_hydra import as_in_hydras_own_test_session  # noqa: F401 (autouse)
from test_sweep import TINY_JOB, read_summary

# `python -m runner`, recording each composition of a sweep job (the overrides given to Hydra's
# ConfigLoader.load_sweep_config) through Python's profiling hook: nothing of Hydra's or
# runner's is replaced. argv: the record's path, then runner's arguments.
COUNTING_RUNNER = """
import atexit, json, runpy, sys
calls, path = [], sys.argv[1]
def record(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "load_sweep_config":
        calls.append(list(frame.f_locals["sweep_overrides"]))
atexit.register(lambda: open(path, "w").write(json.dumps(calls)))
sys.setprofile(record)
sys.argv = ["runner", *sys.argv[2:]]
runpy.run_module("runner", run_name="__main__", alter_sys=True)
"""

LR_JOBS = [[f"optimizer.lr={lr}", *TINY_JOB] for lr in ("0.001", "0.01", "0.1")]


def run_counted(args: Sequence[str], *, cwd: Path, check: bool = True
                ) -> Tuple[subprocess.CompletedProcess, List[List[str]]]:
    """``python -m runner <args>`` and the overrides of each sweep job it composed, in order."""
    record = cwd / "compositions.json"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-c", COUNTING_RUNNER, str(record), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"runner exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc, json.loads(record.read_text())


def results(sweep_dir: Path) -> List[Tuple[str, str, str, str]]:
    return [(r["job"], r["overrides"], r["status"], r["eval/loss"])
            for r in read_summary(sweep_dir)]


def sweeper_target(sweep_dir: Path) -> str:
    return OmegaConf.load(sweep_dir / "multirun.yaml").hydra.sweeper._target_


def job_dirs(sweep_dir: Path) -> List[str]:
    return [p.name for p in sweep_dir.iterdir() if p.name.isdigit()]


def test_an_lr_sweep_composes_one_job_before_launching_and_each_job_once(tmp_path):
    args = ["-m", "optimizer.lr=1e-3,1e-2,1e-1", *TINY_JOB]
    _, basic = run_counted([*args, "hydra/sweeper=basic", f"hydra.sweep.dir={tmp_path}/basic"],
                           cwd=tmp_path)
    _, ours = run_counted([*args, f"hydra.sweep.dir={tmp_path}/runner"], cwd=tmp_path)
    assert basic == LR_JOBS + LR_JOBS  # each job before the batch, then again to run it
    assert ours == LR_JOBS[:1] + LR_JOBS  # the lr's value does not decide whether a job composes
    assert sweeper_target(tmp_path / "runner").endswith("RunnerSweeper")  # the default
    assert results(tmp_path / "runner") == results(tmp_path / "basic")
    assert [r[2] for r in results(tmp_path / "runner")] == ["completed"] * 3


def test_a_missing_option_fails_before_any_job_runs(tmp_path):
    proc, composed = run_counted(["-m", "model=mlp,nope", *TINY_JOB,
                                  f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: model=nope: no such option; available: {', '.join(group_options('model'))}")
    assert composed == [["model=mlp", *TINY_JOB], ["model=nope", *TINY_JOB]]  # the check alone
    assert job_dirs(tmp_path) == []


def test_a_bad_hydra_value_of_one_job_is_refused_before_any_job_runs(tmp_path):
    # Hydra refuses a sweep of a hydra. key on the command line; the sweeper's params may.
    proc, composed = run_counted(["-m", '+hydra.sweeper.params={hydra.job.chdir:"false,maybe"}',
                                  "optimizer.lr=1e-3,1e-2", *TINY_JOB,
                                  f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: hydra.job.chdir: Value 'maybe' is not a valid bool (type str)"
    assert composed == [["hydra.job.chdir=False", "optimizer.lr=0.001", *TINY_JOB],
                        ["hydra.job.chdir=maybe", "optimizer.lr=0.001", *TINY_JOB]]
    assert job_dirs(tmp_path) == []


def test_hparams_search_still_selects_optuna(tmp_path):
    run_cli(["-m", "hparams_search=linear_fit_optuna", "hydra.sweeper.n_trials=2", *TINY_JOB,
             f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert (tmp_path / "optimization_results.yaml").is_file()  # Optuna's, not basic's
    assert (tmp_path / "optuna.journal").is_file()  # the study of hydra/sweeper=search
    assert sweeper_target(tmp_path).endswith("SearchSweeper")
    assert [r[2] for r in results(tmp_path)] == ["completed"] * 2


def test_the_fused_launcher_composes_each_job_once_after_the_check(tmp_path):
    _, composed = run_counted(["-m", "hydra/launcher=fused", "optimizer.lr=1e-3,1e-2,1e-1",
                               *TINY_JOB, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert composed == LR_JOBS[:1] + LR_JOBS
    assert [(r[1], r[2]) for r in results(tmp_path)] == [
        (" ".join(job), "completed") for job in LR_JOBS]


@mark.parametrize("launcher_name, overrides", [("basic", ["hydra/sweeper=runner"])])
class TestRunnerSweeper(LauncherTestSuite):
    pass


@mark.parametrize("launcher_name, overrides", [
    ("basic", ["hydra/sweeper=runner", "hydra.sweeper.max_batch_size=2"])])
class TestRunnerSweeperWithBatching(BatchedSweeperTestSuite):
    pass
