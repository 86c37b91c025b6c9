"""A researcher's own metric writer, callback and learning-rate schedule, each one ``.py`` and
one YAML in their own project, with no edit to runner: a run uses all three, a run killed by
SIGKILL resumes to the same bits and the same records, and a fused sweep runs them per job."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import start_process, user_project

WRITER = '''
import csv
from pathlib import Path


class CsvWriter:
    """The user's sink: ``scalars.csv`` (step, tag, value), a row per scalar. A resumed run
    keeps the rows up to its checkpoint's step."""

    run_files = ("scalars.csv",)

    def __init__(self, *, run, name="scalars.csv"):
        self.path = Path(run.dir) / name
        kept = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.reader(f) if int(row[0]) <= run.start_step]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)
        self.rows = []

    def scalars(self, step, prefix, values):
        self.rows += [(int(step), f"{prefix}/{k}", repr(float(v))) for k, v in values.items()]

    def flush(self):
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerows(self.rows)
        self.rows = []

    def close(self):
        self.flush()
'''

CALLBACK = '''
import os
import signal


class CountCalls:
    """The user's callback: counts its calls (state that must survive a resume), logs the
    count and the train loss it was given; KILL_AT_STEP in the environment kills the process
    at that step (a crash, for the test)."""

    def __init__(self, prefix="cb"):
        self.prefix, self.calls = prefix, 0

    def __call__(self, info):
        self.calls += 1
        info.writer.scalars(info.step, self.prefix, {
            "calls": self.calls, "loss_seen": info.metrics["train/loss"]})
        if os.environ.get("KILL_AT_STEP") == str(info.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]
'''

SCHEDULE = '''
import jax.numpy as jnp


def halving(every):
    """The user's schedule: a multiplier of optimizer.lr, halved every ``every`` steps."""
    return lambda step: 0.5 ** jnp.floor_divide(step, every)
'''

YAMLS = {
    "logger/csv.yaml": "csv:\n  _target_: mylab.writers.CsvWriter\n",
    "callbacks/count.yaml": "count:\n  _target_: mylab.callbacks.CountCalls\n  every: 20\n",
    "optimizer/schedule/halving.yaml": "_target_: mylab.schedules.halving\nevery: 50\n",
}
RUN = ["--config-dir", "myconf", "logger=[tensorboard,csv]", "callbacks=[count]",
       "optimizer/schedule=halving", "optimizer.lr=0.01", "trainer.steps=200",
       "trainer.log_every=10", "trainer.eval_every=50", "trainer.checkpoint_every=50",
       "trainer.progress_bar=false", "trainer.log_images=false", "device=cpu"]


@pytest.fixture
def lab(tmp_path):
    """A research project: package ``mylab`` (writer, callback, schedule), config dir
    ``myconf`` with one YAML for each."""
    return user_project(tmp_path, "mylab", {"writers": WRITER, "callbacks": CALLBACK,
                                            "schedules": SCHEDULE}, YAMLS)


def runner(args, *, cwd: Path, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RUNNER_TRUST": "mylab", **(env_extra or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = start_process([sys.executable, "-m", "runner", *args], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def rows(run_dir: Path):
    with open(run_dir / "scalars.csv", newline="") as f:
        return [(int(step), tag, float(value)) for step, tag, value in csv.reader(f)]


def without_perf(run_dir: Path):
    """The rows but the wall-clock ones (steps/s, compile time): equal between equal runs."""
    return [row for row in rows(run_dir) if not row[1].startswith("perf/")]


def by_tag(run_dir: Path, tag: str):
    return {step: value for step, t, value in rows(run_dir) if t == tag}


def checkpoints(run_dir: Path):
    return {p.name: p.read_bytes() for p in (run_dir / "checkpoints").glob("*.msgpack")}


def check_run(run_dir: Path, lr: float) -> None:
    """What the three extensions did in a completed 200-step run at ``lr``."""
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    # The callback: every 20 steps, once each, its state counting on; it saw the train loss
    # logged at its step (the same value every writer got).
    assert by_tag(run_dir, "cb/calls") == {s: s / 20 for s in range(20, 201, 20)}
    loss = by_tag(run_dir, "train/loss")
    assert by_tag(run_dir, "cb/loss_seen") == {s: loss[s] for s in range(20, 201, 20)}
    # The writer: every scalar TensorBoard got, at the same steps, once (perf/* aside: wall
    # times differ between sinks only in when they are read)
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    for tag in ("train/loss", "train/lr", "eval/loss", "cb/calls"):
        tb = {e.step: e.value for e in events.Scalars(tag)}
        ours = by_tag(run_dir, tag)
        assert sorted(ours) == sorted(tb), tag
        assert all(abs(ours[s] - tb[s]) <= 1e-6 * abs(tb[s]) for s in tb), tag
    steps = [(s, t) for s, t, _ in rows(run_dir)]
    assert len(steps) == len(set(steps))  # no step twice
    # The schedule: optimizer.lr halved every 50 steps.
    lrs = by_tag(run_dir, "train/lr")
    assert {round(v / lr, 6) for v in lrs.values()} <= {1.0, 0.5, 0.25, 0.125, 0.0625}
    assert lrs[10] == pytest.approx(lr) and lrs[200] < lrs[100] < lrs[10]


@pytest.mark.slow
def test_a_users_writer_callback_and_schedule_resume_after_sigkill_to_the_same_bits(lab):
    whole = runner([*RUN, "hydra.run.dir=out/whole"], cwd=lab)
    assert whole.returncode == 0, whole.stderr[-3000:]
    check_run(lab / "out/whole", 0.01)

    # Killed at step 120 (after its checkpoint at 100, before the one at 150); resumed.
    killed = runner([*RUN, "hydra.run.dir=out/killed"], cwd=lab,
                    env_extra={"KILL_AT_STEP": "120"})
    assert killed.returncode == -signal.SIGKILL
    # its writer had rows past the checkpoint on disk (step 110's), which the resume drops
    assert max(step for step, _, _ in rows(lab / "out/killed")) == 110
    resumed = runner(["resume=out/killed"], cwd=lab)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_run(lab / "out/killed", 0.01)
    assert checkpoints(lab / "out/killed") == checkpoints(lab / "out/whole")
    assert without_perf(lab / "out/killed") == without_perf(lab / "out/whole")


@pytest.mark.slow
def test_a_users_writer_callback_and_schedule_in_a_fused_sweep(lab):
    proc = runner(["-m", "hydra/launcher=fused", *RUN, "optimizer.lr=0.01,0.02",
                   "hydra.sweep.dir=sweep"], cwd=lab)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "into one group (2 members" in proc.stdout + proc.stderr
    for job, lr in (("0", 0.01), ("1", 0.02)):
        check_run(lab / "sweep" / job, lr)
    assert by_tag(lab / "sweep/0", "train/loss") != by_tag(lab / "sweep/1", "train/loss")
