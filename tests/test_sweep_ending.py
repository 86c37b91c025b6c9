"""A sweep a signal stops ends as a finished one does: the table, ``summary.csv`` and one
``error:`` line, which names the command that continues it (the sweep's own, in its dir)."""

import csv
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from runner.io.checkpoint import list_checkpoints

# Jobs far too long to end by themselves: a checkpoint every dispatch of 20000 steps.
LONG = ["optimizer.lr=1e-3,2e-3", "task.batch_size=10", "trainer.steps=400000",
        "trainer.log_every=20000", "trainer.eval_every=200000",
        "trainer.checkpoint_every=20000", "trainer.log_images=false",
        "trainer.progress_bar=false"]


@pytest.mark.parametrize("launcher, first_to_save", [("basic", "0"), ("fused", "1")])
def test_an_interrupted_sweep_ends_with_its_summary_and_the_command_to_continue(
        tmp_path, launcher, first_to_save):
    sweep_dir = tmp_path / "s"
    args = ["-m", f"hydra/launcher={launcher}", *LONG, f"hydra.sweep.dir={sweep_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(sweep_dir / first_to_save / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    # basic: job 1 never started; fused: both members stopped together
    assert [r["status"] for r in rows] == ["interrupted"] * (1 if launcher == "basic" else 2)
    assert "interrupted" in out and f"summary: {sweep_dir / 'summary.csv'}" in out
    errors = [line for line in err.splitlines() if line.startswith("error:") or "ERROR" in line]
    assert errors == [err.strip().splitlines()[-1]], err[-3000:]  # one error line, the last
    line = errors[0]
    assert line.startswith(f"error: {len(rows)} of {len(rows)} jobs did not complete: "
                           f"job 0 interrupted at step ")
    command = line.split("; continue the sweep with: ", 1)[1]
    assert shlex.split(command)[1:] == ["-m", "runner", *args]  # after the interpreter
    assert "resume=" not in out + err and "[ERROR]" not in out
    for row in rows:  # each job's record names the same command
        assert row["reason"].endswith(f"continue with: {command}")
