"""Callbacks (``callbacks.<name>: {_target_, every, ...}``) from a user's own package: called
at their steps with the metrics TensorBoard has there, the state where they ask, able to stop
the run; their state resumes to the same calls after SIGKILL; per member in a fused sweep; a
bad one is refused before anything is written."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, compose_config, group_options, run_cli, start_process
from runner.io.checkpoint import list_checkpoints
from runner.run.train import run

CALLBACKS = '''
import json
from pathlib import Path

from flax import serialization


class Record:
    """Keeps each call (step, metrics) in its state, writes them all to <run dir>/<name>.json
    and a count to the metric writer; with ``params``, the state's params at each call to
    <run dir>/<name>_<step>.msgpack; asks the run to stop at ``stop_at``."""

    def __init__(self, name: str = "record", params: bool = False, stop_at: int = 0):
        self.name, self.needs_state, self.stop_at = name, params, stop_at
        self.calls = []

    def __call__(self, info):
        self.calls.append({"step": info.step, "metrics": info.metrics})
        info.writer.scalars(info.step, self.name, {"calls": len(self.calls)})
        run_dir = Path(info.run_dir)
        (run_dir / f"{self.name}.json").write_text(json.dumps(self.calls))
        if self.needs_state:
            (run_dir / f"{self.name}_{info.step}.msgpack").write_bytes(
                serialization.to_bytes(info.state.params))
        if info.step == self.stop_at:
            info.stop(f"step {self.stop_at} reached")

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's package ``cbproj`` with a callback, and its config dir's callbacks group: one
    option as the Lightning-Hydra template writes them (nested under its name), one with a
    package header."""
    (tmp_path / "cbproj").mkdir()
    (tmp_path / "cbproj" / "__init__.py").write_text("")
    (tmp_path / "cbproj" / "callbacks.py").write_text(CALLBACKS)
    group = tmp_path / "myconf" / "callbacks"
    group.mkdir(parents=True)
    (group / "record.yaml").write_text("record:\n  _target_: cbproj.callbacks.Record\n"
                                       "  every: 4\n")
    monkeypatch.setenv("RUNNER_TRUST", "cbproj")  # resume= builds the stored config's targets
    (group / "params.yaml").write_text("# @package callbacks.params\n"
                                       "_target_: cbproj.callbacks.Record\nevery: 6\n"
                                       "name: params\nparams: true\n")
    return tmp_path


def calls(run_dir: Path, name: str = "record") -> list:
    return json.loads((run_dir / f"{name}.json").read_text())


def tb_scalars(run_dir: Path) -> dict:
    """``{tag: {step: value}}`` of the run's TensorBoard scalars."""
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}


def assert_metrics_are_tensorboards(run_dir: Path, recorded: list) -> None:
    scalars = tb_scalars(run_dir)
    for call in recorded:
        assert call["metrics"], call
        for key, value in call["metrics"].items():
            assert scalars[key][call["step"]] == value, (call["step"], key)


@pytest.mark.slow
def test_a_users_callbacks_get_their_steps_metrics_and_state_and_can_stop_the_run(project):
    run_dir = project / "out"
    run_cli(["--config-dir", "myconf", "trainer.steps=20", "trainer.log_every=2",
             "trainer.eval_every=4", "trainer.checkpoint_every=4", "trainer.progress_bar=false",
             "callbacks=[record,params]",
             "+callbacks.stopper._target_=cbproj.callbacks.Record", "+callbacks.stopper.every=6",
             "+callbacks.stopper.name=stopper", "+callbacks.stopper.stop_at=18",
             "hydra.run.dir=out"], cwd=project)
    # every: 4 -> 4, 8, 12, 16 (the stop at 18 ends the run before 20)
    recorded = calls(run_dir)
    assert [c["step"] for c in recorded] == [4, 8, 12, 16]
    assert_metrics_are_tensorboards(run_dir, recorded)
    assert {"train/loss", "eval/loss"} <= set(recorded[0]["metrics"])
    # every: 6 with the state: the params at its steps are the checkpoints' there
    assert [c["step"] for c in calls(run_dir, "params")] == [6, 12, 18]
    for step in (12, 18):
        given = serialization.msgpack_restore((run_dir / f"params_{step}.msgpack").read_bytes())
        saved = serialization.msgpack_restore(
            (run_dir / f"checkpoints/step_{step}.msgpack").read_bytes())["params"]
        assert jax.tree.structure(given) == jax.tree.structure(saved)
        for a, b in zip(jax.tree.leaves(given), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
    # The stop: at step 18, checkpointed there, recorded in metrics.json
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["stopped_at"], metrics["stopped_by"],
            metrics["stop_reason"]) == ("completed", 18, 18, "callbacks.stopper",
                                        "step 18 reached")
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")][-1] == 18
    again = run_cli(["resume=out"], cwd=project, check=False)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == (
        f"{run_dir}: already complete: stopped at step 18 by callbacks.stopper")


# As tests/test_resume.py: 20,000 steps (~0.3 s) per dispatch, a checkpoint and a call after
# each; a run that never ends by itself is SIGKILLed.
DISPATCH = 20000
LONG = ["--config-dir", "myconf", "task.batch_size=10", f"trainer.log_every={DISPATCH}",
        "trainer.eval_every=60000", f"trainer.checkpoint_every={DISPATCH}",
        "trainer.progress_bar=false", "callbacks=[record]",
        f"callbacks.record.every={DISPATCH}"]


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir / "checkpoints")
    return found[-1][0] if found else 0


@pytest.mark.slow
def test_a_stateful_callback_resumes_after_sigkill_to_the_uninterrupted_runs_calls(project):
    run_dir = project / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = start_process([sys.executable, "-m", "runner", *LONG, "trainer.steps=1000000000",
                          "hydra.run.dir=run"], cwd=project, env=env)
    deadline = time.monotonic() + 120
    while newest_step(run_dir) < 4 * DISPATCH:  # past an eval (60000): its metrics resume too
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    end = newest_step(run_dir) + 2 * DISPATCH
    run_cli(["resume=run", f"trainer.steps={end}"], cwd=project)
    run_cli([*LONG, f"trainer.steps={end}", "hydra.run.dir=reference"], cwd=project)
    reference = project / "reference"
    assert calls(run_dir) == calls(reference)  # each step once, the same metrics
    assert [c["step"] for c in calls(run_dir)] == list(range(DISPATCH, end + 1, DISPATCH))
    assert tb_scalars(run_dir)["record/calls"] == tb_scalars(reference)["record/calls"]
    for name in (f"step_{end}.msgpack", "callbacks.json"):
        assert (run_dir / "checkpoints" / name).read_bytes() == \
            (reference / "checkpoints" / name).read_bytes()


@pytest.mark.slow
def test_in_a_fused_sweep_each_members_callback_sees_its_own_metrics(project):
    proc = run_cli(["-m", "--config-dir", "myconf", "hydra/launcher=fused", *TINY,
                    "trainer.steps=8", "callbacks=[record]", "optimizer.lr=1e-3,1e-1",
                    "hydra.sweep.dir=sweep"], cwd=project)
    assert "fusing jobs 0, 1 into one group" in proc.stdout + proc.stderr + \
        (project / "sweep/0/runner.log").read_text()
    seen = []
    for job in ("0", "1"):
        recorded = calls(project / "sweep" / job)
        assert [c["step"] for c in recorded] == [4, 8]
        assert_metrics_are_tensorboards(project / "sweep" / job, recorded)
        seen.append(recorded[-1]["metrics"]["train/loss"])
    assert seen[0] != seen[1]


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("callbacks.record.every=0", "error: callbacks.record.every=0: must be a positive int"),
    ("callbacks.record._target_=cbproj.nope.Record",
     "error: callbacks.record._target_=cbproj.nope.Record: cannot import it"),
])
def test_a_bad_callback_is_one_line_before_anything_is_written(project, override, message):
    proc = run_cli(["--config-dir", "myconf", *TINY, "callbacks=[record]", override,
                    "hydra.run.dir=out"], cwd=project, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr
    assert not (project / "out").exists()


def test_runners_own_stop_at_option_stops_the_run_through_the_same_door(tmp_path):
    """``conf/callbacks/stop_at.yaml`` composes and builds like a user's option; its stop
    ends the run at the first step its metric qualifies."""
    assert group_options("callbacks") == ["stop_at"]
    cfg = compose_config(["trainer.steps=8", "callbacks=[stop_at]",
                          "callbacks.stop_at.every=2", "callbacks.stop_at.metric=train/loss",
                          "callbacks.stop_at.value=1e9"])
    summary = run(cfg, tmp_path)
    assert (summary["steps"], summary["stopped_at"], summary["stopped_by"]) == (
        2, 2, "callbacks.stop_at")
    assert summary["stop_reason"].startswith("train/loss=")
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [2]
