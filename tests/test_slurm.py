"""Sweeps on a live SLURM cluster (``hydra/launcher=slurm`` and ``fused_slurm``): equal to the
basic launcher's, a 2-task ``jax.distributed`` job, requeue and preemption resuming to the same
bits, a user's ``scancel --signal=TERM``, SIGTERM while a job starts, a failing job; an Optuna
search (``hydra/sweeper=search``) whose SLURM jobs are pruned, and one requeued mid-trial.

They need a cluster: ``scripts/slurm_cluster.sh start DIR`` (``.ci/run`` starts one) and
``SLURM_CONF`` from ``DIR/env``; without one they skip, saying so.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import jax
import numpy as np
import optuna
import pytest
from flax import serialization

from conftest import run_cli, start_process
from test_search import PRUNE, SEARCH, study_of

pytestmark = pytest.mark.slurm

TINY = ["trainer.log_every=2", "trainer.eval_every=4", "trainer.checkpoint_every=4",
        "trainer.progress_bar=false", "trainer.log_images=false"]
# A job long enough to be interrupted mid-way on 2 CPU cores: ~20 dispatches of ~0.3 s, a
# checkpoint after each.
LONG = ["task.batch_size=10", "trainer.steps=400000", "trainer.log_every=20000",
        "trainer.eval_every=400000", "trainer.checkpoint_every=20000",
        "trainer.progress_bar=false", "trainer.log_images=false"]


def _cluster_reason() -> str:
    if not os.environ.get("SLURM_CONF"):
        return ("no SLURM cluster (SLURM_CONF unset): scripts/slurm_cluster.sh start DIR, then "
                "source DIR/env")
    if shutil.which("sinfo") is None:
        return "no SLURM cluster: sinfo is not installed"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"no SLURM cluster answers ({probe.stderr.strip() or 'no node'})"
    return ""


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)


def slurm_sweep(tmp_path: Path, name: str, *args, launcher: str = "slurm",
                check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(["-m", f"hydra/launcher={launcher}", *args,
                    f"hydra.sweep.dir={tmp_path / name}"], cwd=tmp_path, check=check,
                   timeout=600)


def start_sweep(tmp_path: Path, name: str, *args, launcher: str = "slurm") -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return start_process([sys.executable, "-m", "runner", "-m", f"hydra/launcher={launcher}",
                          *args, f"hydra.sweep.dir={tmp_path / name}"], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def summary(sweep_dir: Path) -> List[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def slurm_jobs(sweep_dir: Path) -> List[str]:
    """The SLURM jobs of the sweep in ``sweep_dir`` queued or running now (submitit's
    ``.submitit/<job id>/``): not a job an earlier test or another user left on the cluster."""
    out = subprocess.run(["squeue", "-h", "-o", "%A %T"], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    ours = {p.name for p in (sweep_dir / ".submitit").glob("*") if p.is_dir()}
    return [line.split()[0] for line in out if line.strip() and line.split()[0] in ours]


def wait_for(condition, timeout: float = 180, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def checkpoint_steps(run_dir: Path) -> List[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob(
        "step_*.msgpack"))


def test_a_four_job_sweep_equals_the_basic_launchers(tmp_path):
    args = ["optimizer.lr=1e-3,3e-3,1e-2,3e-2", "trainer.steps=8", *TINY]
    slurm_sweep(tmp_path, "slurm", *args)
    run_cli(["-m", "hydra/launcher=basic", *args, f"hydra.sweep.dir={tmp_path / 'basic'}"],
            cwd=tmp_path)
    rows = summary(tmp_path / "slurm")
    assert [r["status"] for r in rows] == ["completed"] * 4
    for job in ("0", "1", "2", "3"):
        on_slurm, here = metrics(tmp_path / "slurm" / job), metrics(tmp_path / "basic" / job)
        assert on_slurm["eval"] == here["eval"] and on_slurm["overrides"] == here["overrides"]
        assert (tmp_path / "slurm" / job / "checkpoints" / "step_8.msgpack").read_bytes() == (
            tmp_path / "basic" / job / "checkpoints" / "step_8.msgpack").read_bytes()


def test_a_two_task_job_equals_one_process(tmp_path):
    common = ["trainer.steps=8", *TINY, "device=cpu"]
    slurm_sweep(tmp_path, "two", *common, "seed=0", "hydra.launcher.tasks_per_node=2",
                "device.distributed=true")
    run_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    two, one = metrics(tmp_path / "two" / "0"), metrics(tmp_path / "one")
    assert two["devices"]["processes"] == 2 and two["status"] == "completed"
    # As the loopback test of two processes measured (test_scaleout): float32 all-reduce order.
    assert two["eval"]["loss"] == pytest.approx(one["eval"]["loss"], rel=2.4e-7, abs=0)
    a, b = (serialization.msgpack_restore((d / "checkpoints" / "step_8.msgpack").read_bytes())
            for d in (tmp_path / "two" / "0", tmp_path / "one"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.linalg.norm(x - y) <= 5e-7 * np.linalg.norm(y)


def interrupt_and_finish(tmp_path: Path, interrupt, *, launcher: str = "slurm",
                         lrs: str = "1e-3", args: Sequence[str] = ()
                         ) -> subprocess.CompletedProcess:
    """A sweep of LONG jobs (``args``: other sweep arguments than ``optimizer.lr=<lrs>``),
    ``interrupt(job_id)`` once its first job saved a checkpoint; the sweep's end."""
    proc = start_sweep(tmp_path, "s", *(args or [f"optimizer.lr={lrs}"]), *LONG,
                       launcher=launcher)
    first = tmp_path / "s" / "0"
    wait_for(lambda: (first / "checkpoints").is_dir() and checkpoint_steps(first),
             what="a first checkpoint")
    job_id = wait_for(lambda: slurm_jobs(tmp_path / "s"), what="the SLURM job")[0]
    interrupt(job_id)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(lr, *args)``: the last checkpoint of an uninterrupted LONG run, run once in
    this module for each ``(lr, *args)`` (a run's bits are its command's: the requeue,
    preemption and fused tests compare with the same lr=1e-3 run)."""
    root, made = tmp_path_factory.mktemp("references"), {}

    def final(lr: str = "1e-3", *args: str) -> bytes:
        if (lr, *args) not in made:
            run_dir = root / str(len(made))
            run_cli([f"optimizer.lr={lr}", *args, *LONG, f"hydra.run.dir={run_dir}"], cwd=root)
            made[(lr, *args)] = (run_dir / "checkpoints" / "step_400000.msgpack").read_bytes()
        return made[(lr, *args)]
    return final


def test_a_requeued_job_resumes_and_ends_as_an_uninterrupted_run(tmp_path, reference):
    done = interrupt_and_finish(tmp_path, lambda job: subprocess.run(
        ["scontrol", "requeue", job], check=True))
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "s" / "0"
    assert metrics(run)["status"] == "completed" and metrics(run)["resumed_from"] > 0
    attempts = json.loads((run / "manifest.json").read_text())["attempts"]
    assert len(attempts) == 2
    assert (run / "checkpoints" / "step_400000.msgpack").read_bytes() == reference()
    assert summary(tmp_path / "s")[0]["status"] == "completed"


def test_a_preempted_job_resumes_and_ends_as_an_uninterrupted_run(tmp_path, reference):
    cpus = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                          check=True).stdout.split()[0]

    def preempt(job):  # a job of the higher-priority partition that needs the whole node
        subprocess.run(["sbatch", "-p", "urgent", "-c", cpus, "--mem=100", "-o", "/dev/null",
                        "--wrap", "sleep 5"], check=True, capture_output=True)

    done = interrupt_and_finish(tmp_path, preempt)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "s" / "0"
    assert metrics(run)["status"] == "completed" and metrics(run)["resumed_from"] > 0
    assert (run / "checkpoints" / "step_400000.msgpack").read_bytes() == reference()


def test_scancel_term_ends_the_sweep_in_one_line_and_a_rerun_resumes(tmp_path):
    done = interrupt_and_finish(tmp_path, lambda job: subprocess.run(
        ["scancel", "--signal=TERM", job], check=True))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 1 jobs did not complete: job 0 interrupted at step ") \
        and "continue the sweep with: " in last and "hydra/launcher=slurm" in last, \
        done.stderr[-3000:]
    assert [r["status"] for r in summary(tmp_path / "s")] == ["interrupted"]
    stopped_at = metrics(tmp_path / "s" / "0")["steps"]
    slurm_sweep(tmp_path, "s", "optimizer.lr=1e-3", *LONG)  # the same command again
    assert metrics(tmp_path / "s" / "0")["resumed_from"] == stopped_at > 0
    assert [r["status"] for r in summary(tmp_path / "s")] == ["completed"]


def test_sigterm_while_a_job_starts_stops_it(tmp_path):
    """SIGTERM (``scancel --signal=TERM``) every 0.2 s for 2 s from the start of the job's
    step: python, Hydra and runner starting, before the run's own handler (where submitit
    ignores SIGTERM). The job ends, and its record is never left ``running``."""
    proc = start_sweep(tmp_path, "s", "optimizer.lr=1e-3", *LONG)
    job_id = wait_for(lambda: slurm_jobs(tmp_path / "s"), what="the SLURM job")[0]
    wait_for(lambda: subprocess.run(["squeue", "-h", "-s", "-j", job_id], capture_output=True,
                                    text=True).stdout.strip(), what="the job's step")
    for _ in range(10):
        subprocess.run(["scancel", "--signal=TERM", job_id], capture_output=True)
        time.sleep(0.2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    # the run's own record (interrupted), or the launcher's for a job that never ran one
    status = metrics(tmp_path / "s" / "0")["status"]
    assert status in ("interrupted", "failed")
    assert "failed during processing" not in (metrics(tmp_path / "s" / "0")["reason"] or "")
    assert [r["status"] for r in summary(tmp_path / "s")] == [status]


def test_a_failing_job_fails_alone_in_one_line(tmp_path):
    done = slurm_sweep(tmp_path, "s", "optimizer.lr=1e-3,-1,3e-3", "trainer.steps=8", *TINY,
                       check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert [r["status"] for r in summary(tmp_path / "s")] == ["completed", "failed",
                                                               "completed"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: 1 of 3 jobs failed: job 1 (optimizer.lr=-1 ") and errors[0].endswith(
        "): optimizer.lr=-1.0: must be > 0"), done.stderr


def test_a_fused_group_is_one_slurm_job_and_resumes_when_requeued(tmp_path, reference):
    lrs = "1e-3,2e-3,3e-3,4e-3"
    done = interrupt_and_finish(tmp_path, lambda job: subprocess.run(
        ["scontrol", "requeue", job], check=True), launcher="fused_slurm", lrs=lrs)
    assert done.returncode == 0, done.stderr[-3000:]
    submitted = [p for p in (tmp_path / "s" / ".submitit").iterdir() if p.name.isdigit()]
    assert len(submitted) == 1  # one SLURM job
    for job, lr in enumerate(lrs.split(",")):
        run = tmp_path / "s" / str(job)
        assert metrics(run)["status"] == "completed" and metrics(run)["resumed_from"] > 0
        if job < 2:  # two members against uninterrupted single runs, bit for bit
            assert (run / "checkpoints" / "step_400000.msgpack").read_bytes() == reference(lr)


def test_a_search_prunes_its_slurm_job_which_reports_to_the_study_itself(tmp_path):
    """Two trials as two SLURM jobs; trial 1 crosses the pruner's bound at its first eval.
    The sweeper tells the study only how a trial ended: the intermediate values come from the
    jobs' own processes, and the pruned one stopped there."""
    sweep = tmp_path / "s"
    slurm_sweep(tmp_path, "s", *SEARCH[1:], *PRUNE, "hydra.sweeper.n_jobs=2")
    trials = study_of(sweep).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.PRUNED]
    done, pruned = metrics(sweep / "0"), metrics(sweep / "1")
    assert trials[0].intermediate_values[20] == pytest.approx(done["eval"]["loss"])
    assert (pruned["status"], pruned["pruned_at"], pruned["steps"]) == ("pruned", 10, 10)
    assert trials[1].intermediate_values == {10: pytest.approx(pruned["eval"]["loss"])}
    assert checkpoint_steps(sweep / "1") == [10]
    assert [(r["status"], r["pruned_at"]) for r in summary(sweep)] == [
        ("completed", ""), ("pruned", "10")]


# One trial of a LONG job, its lr drawn from a one-value choice (the others fixed).
LONG_SEARCH = ["hparams_search=linear_fit_optuna", "hydra.sweeper.n_trials=1",
               "hydra.sweeper.params={optimizer.lr:'choice(0.001)',optimizer.b1:'0.9',"
               "model.features:'[64]'}"]


def test_a_requeued_search_job_resumes_its_trial_from_its_checkpoint(tmp_path, reference):
    done = interrupt_and_finish(tmp_path, lambda job: subprocess.run(
        ["scontrol", "requeue", job], check=True), args=LONG_SEARCH)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "s" / "0"
    assert metrics(run)["status"] == "completed" and metrics(run)["resumed_from"] > 0
    assert len(json.loads((run / "manifest.json").read_text())["attempts"]) == 2
    assert (run / "checkpoints" / "step_400000.msgpack").read_bytes() == reference(
        "0.001", "optimizer.b1=0.9", "model.features=[64]")
    trials = study_of(tmp_path / "s").trials  # the total stays n_trials, told COMPLETE once
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert trials[0].value == pytest.approx(metrics(run)["eval"]["loss"])
    assert trials[0].intermediate_values == {400000: pytest.approx(trials[0].value)}
