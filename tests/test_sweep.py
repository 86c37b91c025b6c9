"""Multiruns: failure isolation, summary.csv, Optuna, launchers, compile sharing, resuming."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from runner.io.checkpoint import list_checkpoints

TINY_JOB = ["trainer.steps=4", "trainer.log_every=2", "trainer.eval_every=4",
            "trainer.checkpoint_every=4"]


def read_summary(sweep_dir: Path):
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_a_failing_job_does_not_stop_the_sweep(tmp_path):
    proc = run_cli(["-m", "optimizer.lr=1e-3,1e6,1e-2", *TINY_JOB, "optimizer=sgd",
                    "optimizer.momentum=null", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 3 jobs failed: job 1 (optimizer.lr=1000000.0")
    assert "diverged" in last
    rows = read_summary(tmp_path)
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]
    assert "diverged" in rows[1]["reason"]
    assert [r["best"] for r in rows].count("*") == 1
    best = min((r for r in rows if r["status"] == "completed"), key=lambda r: float(
        r["eval/loss"]))
    assert best["best"] == "*"
    assert "optimizer.lr=0.001" in proc.stdout  # the printed table
    assert json.loads((tmp_path / "2/metrics.json").read_text())["status"] == "completed"


def test_each_job_gets_its_own_dir_and_the_step_compiles_once_in_process(tmp_path):
    run_cli(["-m", "optimizer.lr=1e-3,1e-2,1e-1", *TINY_JOB, "device.compilation_cache_dir=null",
             f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    rows = read_summary(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["train_step_compiles"] for r in rows] == ["1", "0", "0"]
    assert len({r["eval/loss"] for r in rows}) == 3  # the lr really differed


def test_persistent_compilation_cache_is_hit_across_processes(tmp_path):
    """The second process loads every program the first one cached, the train step's
    included: it adds no entry to the cache (a miss would write one) and hits once per entry."""
    cache, entries = tmp_path / "cache", []
    for name in ("first", "second"):
        run_cli([*TINY_JOB, f"device.compilation_cache_dir={cache}",
                 f"hydra.run.dir={tmp_path}/{name}"], cwd=tmp_path)
        entries.append(sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache")))
    first, second = (json.loads((tmp_path / n / "metrics.json").read_text())
                     for n in ("first", "second"))
    # JAX names an entry after its jitted function: jit_<name>-<hash>-cache.
    assert len([e for e in entries[0] if e.startswith("jit_train_steps-")]) == 1, entries[0]
    assert entries[1] == entries[0]
    assert (first["compile_cache_hits"], second["compile_cache_hits"]) == (0, len(entries[0]))
    assert first["train_step_compiles"] == second["train_step_compiles"] == 1


def test_optuna_search_records_the_best_params(tmp_path):
    run_cli(["-m", "hparams_search=linear_fit_optuna", "hydra.sweeper.n_trials=3", *TINY_JOB,
             f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.b1", "model.features"}
    rows = read_summary(tmp_path)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    assert results["best_value"] == pytest.approx(min(float(r["eval/loss"]) for r in rows))


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launchers_run_jobs_in_other_processes(tmp_path, launcher):
    run_cli(["-m", f"hydra/launcher={launcher}", "optimizer.lr=1e-3,1e-2", *TINY_JOB,
             f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    for job in ("0", "1"):
        job_dir = tmp_path / job
        assert {p.name for p in job_dir.iterdir()} >= {
            ".hydra", "tb", "checkpoints", "metrics.json", "model_summary.txt"}
        assert json.loads((job_dir / "metrics.json").read_text())["status"] == "completed"
    assert len(read_summary(tmp_path)) == 2


def test_shipped_slurm_launcher_configs_compose_for_a_small_cpu_node():
    from conftest import compose_config
    from hydra import compose, initialize_config_module

    for name, target in (("slurm", "RunnerSlurmLauncher"), ("fused_slurm", "FusedSlurmLauncher")):
        with initialize_config_module(config_module="runner.conf", version_base=None):
            cfg = compose("config", overrides=[f"hydra/launcher={name}"],
                          return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher._target_.endswith(target)
        # no GPU unless asked (a CPU cluster refuses a gres request), a small node's share
        assert launcher.gpus_per_node is None and launcher.timeout_min == 240
        assert (launcher.cpus_per_task, launcher.mem_gb) == (1, 2)
    assert launcher.max_members is None
    # the default config is untouched
    assert compose_config().task._target_ == "runner.tasks.linear_fit.LinearFit"


def test_a_killed_sweep_rerun_completes_only_the_missing_jobs(tmp_path):
    # Three ~3 s jobs; the sweep is stopped (SIGSTOP) as the second one starts, so that it is
    # still running however fast the machine, and killed.
    long_job = ["trainer.steps=200000", "trainer.log_every=100000", "trainer.eval_every=100000",
                "trainer.checkpoint_every=100000", "trainer.progress_bar=false"]
    args = [sys.executable, "-m", "runner", "-m", "optimizer.lr=1e-3,2e-3,3e-3", *long_job,
            f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first, second = tmp_path / "sweep/0/metrics.json", tmp_path / "sweep/1"
    deadline = time.monotonic() + 120
    while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGSTOP)
    stopped_at = {p.relative_to(tmp_path / "sweep").as_posix()
                  for p in (tmp_path / "sweep").glob("*/metrics.json")}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert stopped_at == {"0/metrics.json"}  # job 0 done, job 1 running, job 2 not started
    assert json.loads(first.read_text())["status"] == "completed"
    before = {p: p.read_bytes() for p in (tmp_path / "sweep/0").rglob("*") if p.is_file()}

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    # job 0 was not run again, and none of its files was touched (its log neither)
    assert {p: p.read_bytes() for p in (tmp_path / "sweep/0").rglob("*") if p.is_file()} \
        == before
    assert "sweep/0 already completed: skipping it" in rerun.stdout
    rows = read_summary(tmp_path / "sweep")
    assert [r["status"] for r in rows] == ["completed"] * 3
    # the rerun's process compiled the step once, for job 1
    assert [r["train_step_compiles"] for r in rows] == ["1", "1", "0"]


def test_a_sweep_dir_of_other_jobs_is_not_overwritten(tmp_path):
    run_cli(["-m", "optimizer.lr=1e-3", *TINY_JOB, f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    before = (tmp_path / "0/metrics.json").read_bytes()
    proc = run_cli(["-m", "optimizer.lr=5e-3", *TINY_JOB, f"hydra.sweep.dir={tmp_path}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "holds another sweep (optimizer.lr=1e-3" in proc.stderr
    assert (tmp_path / "0/metrics.json").read_bytes() == before


@pytest.mark.slow
def test_sigterm_stops_the_whole_sweep_and_a_rerun_resumes_it(tmp_path):
    # 10 dispatches of 10,000 steps, a checkpoint after each. The test stops job 0 once it
    # sees one; the asserts allow it to see any up to step 70,000 (6 dispatches for the poll
    # below to lag behind the first) and the run to stop 2 dispatches after that.
    steps, ckpt = 100000, 10000
    long_job = ["task.batch_size=10", f"trainer.steps={steps}", f"trainer.log_every={ckpt}",
                "trainer.eval_every=20000", f"trainer.checkpoint_every={ckpt}",
                "trainer.progress_bar=false"]
    args = [sys.executable, "-m", "runner", "-m", "optimizer.lr=1e-3,2e-3", *long_job,
            f"hydra.sweep.dir={tmp_path}/sweep"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "sweep/0/checkpoints"
    deadline = time.monotonic() + 120
    while not list(ckpts.glob("step_*.msgpack")) and time.monotonic() < deadline:
        time.sleep(0.005)
    # Stopped first, so that job 0 cannot run to its end before SIGTERM lands. The run stops
    # at most two dispatches after its newest checkpoint (the one in flight may have checked
    # for a stop request already), and those must not include the last (step ``steps``).
    proc.send_signal(signal.SIGSTOP)
    newest = list_checkpoints(ckpts)[-1][0]
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=60) == 1, f"job 0 was past step {newest} of {steps} when stopped"
    assert newest <= steps - 3 * ckpt
    metrics = json.loads((tmp_path / "sweep/0/metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert metrics["steps"] - newest in (0, ckpt, 2 * ckpt)
    assert list_checkpoints(ckpts)[-1][0] == metrics["steps"]
    assert not (tmp_path / "sweep/1").exists()  # the sweep stopped; job 1 never started

    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert [r["status"] for r in read_summary(tmp_path / "sweep")] == ["completed"] * 2
    assert json.loads((tmp_path / "sweep/0/metrics.json").read_text())["resumed_from"] == \
        metrics["steps"]
