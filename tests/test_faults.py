"""Faults long experiments meet, injected: a full disk, a read-only run dir, SIGKILL at random
moments and inside a checkpoint write, two processes on one run dir, a bad sweep value, one
process of two unable to write. Each ends in one line, a recorded status, every checkpoint
written before still valid, and a resume that carries on."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from conftest import TINY, compose_config, free_port, run_cli, start_process
from test_run_dirs import assert_same
from test_run_dirs import snapshot as dir_bytes
from test_run_dirs import one_error_line as only_error_line
from test_run_dirs import wait_for as wait_for_text
from runner.config.errors import WriteError
from runner.io import files
from runner.io.checkpoint import list_checkpoints
from runner.run.train import run

# linear_fit in minibatches (each step draws its batch), a checkpoint every 2,000 steps.
CKPT = 2000
LONG = ["task.batch_size=16", f"trainer.log_every={CKPT}", f"trainer.eval_every={CKPT}",
        f"trainer.checkpoint_every={CKPT}", "trainer.log_images=false",
        "trainer.progress_bar=false"]
UNBOUNDED = "trainer.steps=1000000000"  # a run a fault is meant to end never ends by itself
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def popen(args, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XLA_FLAGS")}
    return start_process(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **kwargs)


def runner_args(*args):
    return [sys.executable, "-m", "runner", *args]


def wait_for(condition, proc=None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def checkpoints(run_dir: Path):
    return list_checkpoints(run_dir / "checkpoints")


def assert_all_valid(run_dir: Path) -> None:
    """Every step checkpoint is whole: the state at the step its name says, with the
    structure, shapes and dtypes of the run's first checkpoint."""
    def spec(path: Path):
        tree = serialization.msgpack_restore(path.read_bytes())
        return tree, jax.tree.structure(tree), [(np.shape(x), np.asarray(x).dtype)
                                                for x in jax.tree.leaves(tree)]

    _, structure, shapes = spec(checkpoints(run_dir)[0][1])
    for step, path in checkpoints(run_dir):
        tree, s, sh = spec(path)
        assert (int(tree["step"]), s, sh) == (step, structure, shapes), path


def final_state(run_dir: Path, step: int) -> bytes:
    return (run_dir / "checkpoints" / f"step_{step}.msgpack").read_bytes()


def one_error_line(stderr: str) -> str:
    """The error line, after checking that stderr holds no traceback (nor a thread's)."""
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert errors, stderr[-3000:]
    return errors[-1]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of ``size`` at ``path`` (root only; CI runs as root)."""
    path.mkdir()
    if not IS_ROOT or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                      str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the in-process ENOSPC test runs instead)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_ends_the_run_in_one_line_and_a_resume_carries_on(tmp_path):
    with small_disk(tmp_path / "disk", "160k") as disk:
        run_dir = disk / "run"
        proc = popen(runner_args(*LONG, UNBOUNDED, f"hydra.run.dir={run_dir}"), tmp_path)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1
        line = one_error_line(stderr)
        assert line.startswith(f"error: cannot write {run_dir}/") and line.endswith(
            "[Errno 28] No space left on device"), line
        written = checkpoints(run_dir)
        assert len(written) >= 2
        assert_all_valid(run_dir)
        assert not list(run_dir.rglob(".*.tmp"))  # no half-written file under any name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "failed" and metrics["reason"] == line[len("error: "):]

        # With the disk still full, a resume fails the same way, losing nothing.
        proc = popen(runner_args(f"resume={run_dir}"), tmp_path)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1 and "No space left on device" in one_error_line(stderr)
        assert checkpoints(run_dir)[:len(written)] == written
        assert_all_valid(run_dir)

        # Space freed: it continues from its newest valid checkpoint.
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        newest = checkpoints(run_dir)[-1][0]
        target = newest + 2 * CKPT
        run_cli([f"resume={run_dir}", f"trainer.steps={target}"], cwd=tmp_path)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["resumed_from"] == newest
        assert checkpoints(run_dir)[-1][0] == target


def test_a_checkpoint_write_that_fails_keeps_every_earlier_one(tmp_path, monkeypatch):
    """Without a tmpfs: the disk fills half-way through the checkpoint of step 6. The fault
    keys on what is written (the bytes of step 6's state, as the uninterrupted run wrote
    them), whatever file they go to: a write in place would fail here too, and leave a
    partial step_6.msgpack."""
    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            if bytes(data) != step_6:
                return self.file.write(data)
            self.file.write(data[:len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def fill_at_step_6(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        return FullDisk(file) if any(m in mode for m in "wax+") else file

    cfg = compose_config([*TINY, "trainer.steps=10", "trainer.eval_every=null"])
    run(cfg, tmp_path / "reference")
    step_6 = final_state(tmp_path / "reference", 6)
    monkeypatch.setattr(files, "open", fill_at_step_6, raising=False)
    with pytest.raises(WriteError, match=r"cannot write .*/checkpoints/step_6\.msgpack: "
                                         r"\[Errno 28\] No space left on device"):
        run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left on device" in metrics["reason"]
    steps = [s for s, _ in checkpoints(tmp_path / "run")]
    assert steps == [2, 4] and not list((tmp_path / "run").rglob(".*.tmp"))
    for step in steps:  # each earlier checkpoint equals the uninterrupted run's
        assert final_state(tmp_path / "run", step) == final_state(tmp_path / "reference", step)


def read_only_copy(src: Path, dest: Path):
    """``dest``: ``src`` mounted read-only (root), else with its write permissions removed."""
    dest.mkdir()
    if IS_ROOT:
        subprocess.run(["mount", "--bind", str(src), str(dest)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dest)], check=True)
        return lambda: subprocess.run(["umount", "-l", str(dest)], check=False)
    import shutil
    shutil.rmtree(dest)
    shutil.copytree(src, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    return lambda: None


def snapshot(run_dir: Path):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*")
            if p.is_file()}


def test_eval_reads_a_read_only_run_dir_and_a_resume_of_it_is_one_line(tmp_path):
    run_cli([*TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    release = read_only_copy(tmp_path / "run", tmp_path / "ro")
    try:
        before = snapshot(tmp_path / "ro")
        proc = subprocess.run([sys.executable, "-m", "runner.eval", str(tmp_path / "ro")],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["step"] == 4
        proc = popen(runner_args(f"resume={tmp_path / 'ro'}", "trainer.steps=6"), tmp_path)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1
        assert "Read-only file system" in one_error_line(stderr) or \
            "Permission denied" in one_error_line(stderr)
        assert snapshot(tmp_path / "ro") == before  # eval and the failed resume wrote nothing
    finally:
        release()


def test_a_second_process_on_a_run_dir_exits_at_once_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = popen(runner_args(*LONG, UNBOUNDED, f"hydra.run.dir={run_dir}"), tmp_path)
    wait_for(lambda: len(checkpoints(run_dir)) >= 1, first)
    before = [json.loads((run_dir / f).read_text()) for f in ("manifest.json", "metrics.json")]
    assert before[1]["status"] == "running"
    # Two resumes by hand while it runs: each refused at once, naming the holder.
    for _ in range(2):
        second = popen(runner_args(f"resume={run_dir}"), tmp_path)
        _, stderr = second.communicate(timeout=60)
        assert second.returncode == 1
        assert one_error_line(stderr) == (
            f"error: {run_dir}: in use by pid {first.pid} on {socket.gethostname()} (it holds "
            f"{run_dir}/.lock); a run dir takes one process at a time: wait for that one to "
            f"end, or stop it")
    assert first.poll() is None  # untouched: still training, its files its own
    assert [json.loads((run_dir / f).read_text()) for f in ("manifest.json", "metrics.json")
            ] == before
    # SIGKILL leaves no stale lock: two concurrent resumes, exactly one goes on.
    first.kill()
    first.wait()
    resumes = [popen(runner_args(f"resume={run_dir}", UNBOUNDED), tmp_path) for _ in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in resumes), timeout=120)
    loser = next(p for p in resumes if p.poll() is not None)
    winner = next(p for p in resumes if p is not loser)
    assert loser.returncode == 1
    assert f"in use by pid {winner.pid}" in one_error_line(loser.communicate()[1])
    newest = checkpoints(run_dir)[-1][0]
    wait_for(lambda: checkpoints(run_dir)[-1][0] > newest, winner)
    winner.send_signal(signal.SIGTERM)
    winner.communicate(timeout=120)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert_all_valid(run_dir)


# Slows the rename of one checkpoint into place and says so, for a SIGKILL to land there.
SLOW_WRITE = """
import os, sys, time
real_replace, marker, name = os.replace, sys.argv[1], sys.argv[2]
def replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == name:
        open(marker, "w").write(str(src))
        time.sleep(600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = ["runner", *sys.argv[3:]]
from runner.cli import cli
cli()
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_and_inside_a_write_loses_nothing(tmp_path):
    """4 SIGKILLs at random moments of a checkpointing run: in a fresh run's start-up (before
    any checkpoint: it starts again), while it trains or writes a checkpoint, while its resume
    trains or writes, in a resume's start-up (build, compile, restore); then one inside a
    checkpoint's write. Each time the run resumes from its newest checkpoint, no checkpoint
    written before is lost, and the final state is byte-identical to an uninterrupted run's."""
    # Each kill while training lands up to 0.3 s after the checkpoint it waits for: a machine
    # writing one every 20 ms has ~15 more by then. With 2 such kills, 40 checkpoints leave
    # room for those, for the one the last kill lands in the write of, and one after it.
    steps = 40 * CKPT
    args = [*LONG, f"trainer.steps={steps}"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path)
    run_dir, rng, kills, recovered, lost, seen = tmp_path / "run", random.Random(0), 0, 0, 0, []
    proc = popen(runner_args(*args, f"hydra.run.dir={run_dir}"), tmp_path)
    for i in range(4):
        if i % 3 == 0:  # during start-up (build, compile, restore)
            time.sleep(rng.uniform(0.2, 1.2))
        else:  # while training or writing: a random moment after its next checkpoint
            wait_for(lambda: checkpoints(run_dir)[-1:] != seen[-1:], proc)
            time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the run ended before its faults: give it more steps"
        proc.kill()
        proc.wait()
        kills += 1
        lost += len(set(seen) - set(checkpoints(run_dir)))
        seen = checkpoints(run_dir)
        if seen:
            assert_all_valid(run_dir)
        recovered += 1  # it goes on: resumed, or (killed before a checkpoint) started again
        proc = popen(runner_args(f"resume={run_dir}") if seen else
                     runner_args(*args, f"hydra.run.dir={run_dir}"), tmp_path)
    proc.kill()
    proc.wait()
    # A SIGKILL inside a checkpoint's write: no partial file under the final name.
    marker, newest = tmp_path / "writing", checkpoints(run_dir)[-1][0]
    assert newest < steps
    slow = popen([sys.executable, "-c", SLOW_WRITE, str(marker),
                  f"step_{newest + CKPT}.msgpack", f"resume={run_dir}"], tmp_path)
    wait_for(marker.exists, slow)
    slow.kill()
    slow.wait()
    kills += 1
    assert Path(marker.read_text()).is_file()  # the temporary file the kill left
    assert checkpoints(run_dir)[-1][0] == newest
    assert_all_valid(run_dir)
    run_cli([f"resume={run_dir}"], cwd=tmp_path)
    recovered += 1
    lost += len(set(seen) - set(checkpoints(run_dir)))
    assert not list(run_dir.rglob(".*.tmp"))  # the resume cleared it
    print(f"faults injected: {kills}, runs recovered: {recovered}, checkpoints lost: {lost}")
    assert lost == 0 and recovered == kills
    assert final_state(run_dir, steps) == final_state(tmp_path / "reference", steps)


def sweep_rows(sweep_dir: Path):
    import csv

    with open(sweep_dir / "summary.csv") as f:
        return {row["job"]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_sweep_value_of_the_wrong_type_fails_that_job_alone(tmp_path, launcher):
    proc = run_cli(["-m", f"hydra/launcher={launcher}", "optimizer.lr=abc,1e-3",
                    "trainer.steps=abc,4", *TINY[1:], f"hydra.sweep.dir={tmp_path}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = sweep_rows(tmp_path)
    assert {job: row["status"] for job, row in rows.items()} == {
        "0": "failed", "1": "failed", "2": "failed", "3": "completed"}
    records = {job: json.loads((tmp_path / job / "metrics.json").read_text()) for job in rows}
    reasons = {job: records[job]["reason"] for job in ("0", "1", "2")}
    assert {job: set(r) for job, r in records.items()} == {job: set(records["3"]) for job in rows}
    steps_error = "trainer.steps: Value 'abc' of type 'str' could not be converted to Integer"
    assert reasons == {"0": steps_error, "2": steps_error, "1": (
        "optimizer.lr: Value 'abc' of type 'str' could not be converted to Float")}
    # Each failed job's dir says so in its own log and config too, as a run's would.
    assert "][runner.run.sweep][ERROR] - job 1 (optimizer.lr=abc trainer.steps=4" in (
        tmp_path / "1/runner.log").read_text()
    assert "lr: abc" in (tmp_path / "1/.hydra/config.yaml").read_text()
    error = one_error_line(proc.stderr)
    assert error.startswith("error: 3 of 4 jobs failed: job 0 (optimizer.lr=abc "
                            "trainer.steps=abc ") and "Traceback" not in proc.stdout


def test_an_optuna_trial_with_a_bad_value_is_marked_failed(tmp_path):
    # One batch of 4 trials; sampler seed 2 draws lr=abc for two of them.
    proc = run_cli(["-m", "hparams_search=linear_fit_optuna", "hydra.sweeper.n_trials=4",
                    "hydra.sweeper.n_jobs=4", "hydra.sweeper.sampler.seed=2",
                    "hydra.sweeper.params={optimizer.lr:'choice(abc,0.001)'}", *TINY[1:],
                    "trainer.steps=4", f"hydra.sweep.dir={tmp_path}"],
                   cwd=tmp_path, check=False)
    rows = sweep_rows(tmp_path)
    bad = {job for job, row in rows.items() if "optimizer.lr=abc" in row["overrides"]}
    assert bad and len(bad) < 4, rows
    assert {job for job, row in rows.items() if row["status"] == "failed"} == bad
    # Optuna records those trials as failed (with the reason), and picks its best among the
    # others.
    for job in bad:
        assert f"trial {job} failed: optimizer.lr: Value 'abc'" in proc.stdout + proc.stderr
    import optuna
    study = optuna.load_study(study_name="linear_fit", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    assert {str(t.number) for t in study.trials
            if t.state == optuna.trial.TrialState.FAIL} == bad
    assert all(t.user_attrs["fail_reason"].startswith("optimizer.lr: Value 'abc'")
               for t in study.trials if str(t.number) in bad)
    import yaml
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_params"]["optimizer.lr"] == 0.001
    assert proc.returncode == 1


@pytest.mark.parametrize("edit, message", [
    ({"task": {"bogus": 1}}, "task.bogus: unknown key"),
    ({"trainer": {"steps": "abc"}}, "trainer.steps: Value 'abc' of type 'str' could not be "
                                    "converted to Integer"),
])
def test_a_stored_config_that_fails_validation_names_the_file_and_key(tmp_path, edit, message):
    import yaml

    run_cli([*TINY, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    stored = tmp_path / "run" / ".hydra" / "config.yaml"
    config = yaml.safe_load(stored.read_text())
    for group, values in edit.items():
        config[group].update(values)
    stored.write_text(yaml.safe_dump(config))
    before = snapshot(tmp_path / "run")
    for args in ([sys.executable, "-m", "runner.eval", str(tmp_path / "run")],
                 runner_args(f"resume={tmp_path / 'run'}", "trainer.steps=6")):
        proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 1
        assert one_error_line(proc.stderr).startswith(f"error: {stored}") and \
            message in proc.stderr
    assert snapshot(tmp_path / "run") == before


@pytest.mark.slow
def test_when_process_0_cannot_write_both_processes_stop_at_once(tmp_path):
    """2 processes; the run dir's disk fills: process 0 fails writing, and process 1, which
    writes nothing, stops with it (runner.platform.peers) instead of waiting in its next collective."""
    with small_disk(tmp_path / "disk", "200k") as disk:
        port = free_port()
        every = [f"trainer.{k}=100" for k in ("log_every", "eval_every", "checkpoint_every",
                                              "steps_per_dispatch")]
        procs = [popen(runner_args(
            *LONG, *every, UNBOUNDED, "device=cpu",
            f"hydra.run.dir={disk / 'run'}", "device.distributed=true",
            f"device.coordinator_address=127.0.0.1:{port}", "device.num_processes=2",
            f"device.process_id={i}"), tmp_path) for i in range(2)]
        wait_for(lambda: any(p.poll() is not None for p in procs), timeout=300)
        failed_at = time.monotonic()
        errors = [p.communicate(timeout=90)[1] for p in procs]
        assert time.monotonic() - failed_at < 60  # both ended within the stated bound
        assert [p.returncode for p in procs] == [1, 1], errors
        assert "No space left on device" in one_error_line(errors[0])
        assert one_error_line(errors[1]).startswith("error: process 0 of this run failed")
        assert_all_valid(disk / "run")


@pytest.mark.slow
def test_a_process_refused_by_the_lock_writes_nothing(tmp_path):
    """Run A trains in runs/x; B (another task) into runs/x is refused before any write: A's
    config stays A's, and resume rebuilds A's task."""
    args = runner_args("trainer.steps=100000000", "trainer.log_every=50",
                       "trainer.eval_every=null", "trainer.checkpoint_every=null",
                       "trainer.log_images=false", "trainer.progress_bar=false",
                       "trainer.steps_per_dispatch=50", "hydra.run.dir=runs/x")
    a = popen(args, tmp_path)
    try:
        wait_for_text(tmp_path / "runs/x/runner.log", "step 50/", a)
        before = {k: v for k, v in dir_bytes(tmp_path / "runs/x").items()
                  if k.startswith(".hydra") or k in (".lock", "metrics.json",
                                                     "model_summary.txt", "manifest.json")}
        b = run_cli(["task=cnn_random_images", "hydra.run.dir=runs/x"], cwd=tmp_path,
                    check=False)
        line = only_error_line(b)
        assert f"in use by pid {a.pid}" in line, line
        after = dir_bytes(tmp_path / "runs/x")
        assert {k: after[k] for k in before} == before
    finally:
        a.send_signal(signal.SIGTERM)
        _, err = a.communicate(timeout=120)
    assert a.returncode == 1 and "stopped by SIGTERM" in err, err[-2000:]
    resumed = run_cli(["resume=runs/x", "trainer.steps=200"], cwd=tmp_path, check=False)
    # A stopped past step 200: already complete, on linear_fit's own model, not the CNN.
    assert resumed.returncode == 0 and "already complete" in resumed.stdout, resumed.stderr
    assert "LinearFit" in (tmp_path / "runs/x/.hydra/config.yaml").read_text()


@pytest.mark.slow
def test_a_refused_sweep_changes_no_file_of_the_finished_sweep(tmp_path):
    sweep = ["-m", *TINY, "trainer.log_images=false", "hydra.sweep.dir=sweep"]
    run_cli([*sweep, "optimizer.lr=0.001,0.01"], cwd=tmp_path)
    before = dir_bytes(tmp_path / "sweep")
    other = run_cli([*sweep, "optimizer.lr=0.1,1.0"], cwd=tmp_path, check=False)
    line = only_error_line(other)
    assert "sweep holds another sweep (" in line and "optimizer.lr=0.001,0.01)" in line, line
    assert_same(before, tmp_path / "sweep")
    # The same sweep again: every job completed is skipped, none of its files touched.
    again = run_cli([*sweep, "optimizer.lr=0.001,0.01"], cwd=tmp_path)
    assert again.stdout.count("already completed: skipping it") == 2, again.stdout
    after = dir_bytes(tmp_path / "sweep")
    assert {k: after[k] for k in before if k.split("/")[0] in ("0", "1")} == \
        {k: v for k, v in before.items() if k.split("/")[0] in ("0", "1")}
