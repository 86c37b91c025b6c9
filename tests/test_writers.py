"""Metric writers (``logger=``): every writer gets TensorBoard's values at TensorBoard's steps;
a resumed run keeps each step once in every sink; MLflow read back through its own client; a
user's writer from their own package; overwrite=true sets a writer's files aside."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, compose_config, group_options, run_cli, start_process, user_project
from runner.config.errors import RunnerError, WriteError
from runner.io.writers.base import RunInfo, Writers
from runner.io.writers.configured import configured, open_writers, run_info
from runner.io.writers.jsonl import JsonlWriter, read_lines
from runner.run.train import run


def jsonl_scalars(run_dir: Path) -> dict:
    """{(tag, step): value} of a run's ``metrics.jsonl``; each step on one line, in order."""
    lines = read_lines(run_dir / "metrics.jsonl")
    steps = [line["step"] for line in lines]
    assert steps == sorted(set(steps)), steps
    return {(k, line["step"]): v for line in lines for k, v in line.items() if k != "step"}


def tb_scalars(run_dir: Path) -> dict:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_every_logger_option_composes_and_checks():
    """Each option's target imports and its keys are its target's (mlflow is built end to end
    below; the others here)."""
    for option in group_options("logger"):
        cfg = compose_config([f"logger={option}"])
        names = [name for name, _, _ in configured(cfg.logger)]
        assert names == ([] if option == "none" else [option])
    assert compose_config(["logger=[]"]).logger == {}


def test_jsonl_has_every_tensorboard_scalar_at_its_step(tmp_path):
    """Two log windows per dispatch, evals and the final compile time: metrics.jsonl holds
    exactly the scalars of the TensorBoard event file."""
    cfg = compose_config(["logger=[tensorboard,jsonl]", "trainer.steps=8",
                          "trainer.steps_per_dispatch=4", "trainer.eval_every=4",
                          "trainer.checkpoint_every=4"])
    run(cfg, tmp_path)
    tb, lines = tb_scalars(tmp_path), jsonl_scalars(tmp_path)
    assert {"train/loss", "eval/loss", "perf/steps_per_sec", "perf/compile_s"} <= {
        tag for tag, _ in tb}
    assert sorted({step for _, step in tb}) == [2, 4, 6, 8]
    assert set(lines) == set(tb)
    for key, value in tb.items():  # TensorBoard keeps float32
        assert np.float32(lines[key]) == np.float32(value), key


def test_jsonl_resume_drops_later_lines_and_a_torn_one(tmp_path):
    """As a resume from step 4 finds it after a SIGKILL: lines up to step 6 and half of one.
    Values logged for a step after its line was written join that line."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/loss": s / 10}) + "\n" for s in (2, 4, 6)]
    path.write_text("".join(lines) + '{"step": 8, "train/lo')
    writer = JsonlWriter(run=RunInfo(dir=tmp_path, start_step=4))
    assert path.read_text() == "".join(lines[:2])
    writer.scalars(6, "train", {"loss": 0.5})
    writer.flush()
    writer.scalars(6, "perf", {"compile_s": 1.0})  # the end of the run, after its last flush
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 2, "train/loss": 0.2}, {"step": 4, "train/loss": 0.4},
        {"step": 6, "perf/compile_s": 1.0, "train/loss": 0.5}]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # no temp left


def test_a_failed_write_names_its_file_and_every_writer_still_closes(tmp_path):
    closed = []

    class Other:
        def scalars(self, step, prefix, values): ...
        def flush(self): ...
        def close(self): closed.append(True)

    (tmp_path / "run").mkdir()
    writers = Writers([JsonlWriter(run=RunInfo(dir=tmp_path / "run", start_step=0)), Other()])
    (tmp_path / "run").rmdir()
    (tmp_path / "run").write_text("")  # its run dir is a file now: no write can succeed
    writers.scalars(2, "train", {"loss": 1.0})
    with pytest.raises(WriteError, match=r"cannot write .*/run/metrics.jsonl: \[Errno 20\]"):
        writers.close()
    assert closed == [True]


SEEN = []  # what Spy was told


class Spy:
    """A writer that keeps what it is told (``logger.spy._target_=test_writers.Spy``)."""

    def __init__(self, *, run):
        SEEN.append(("run", run))

    def scalars(self, step, prefix, values):
        SEEN.append(("scalars", step, prefix, dict(values)))

    def hparams(self, hparams, *, status):
        SEEN.append(("hparams", dict(hparams), status))

    def flush(self): ...

    def close(self):
        SEEN.append(("close",))


def test_a_failed_run_tells_its_writers_how_it_ended(tmp_path):
    """A diverging run: every writer hears its status (``failed``) as it closes; the HParams
    row (TensorBoard's) keeps no status for a run that did not end."""
    from test_tb_logger import hparams_data, load

    SEEN.clear()
    with pytest.raises(RunnerError, match="diverged"):
        run(compose_config(["optimizer=sgd", "optimizer.momentum=null", "optimizer.lr=1e6",
                            "+logger.spy._target_=test_writers.Spy"]), tmp_path)
    assert SEEN[0] == ("run", RunInfo(dir=tmp_path, start_step=0))
    (_, hparams, status), last = SEEN[-2], SEEN[-1]
    assert (status, last) == ("failed", ("close",))
    assert "status" not in hparams and hparams["optimizer.lr"] == 1e6
    start = hparams_data(load(tmp_path))["session_start_info"].session_start_info.hparams
    assert "status" not in start and start["optimizer.lr"].number_value == 1e6


@pytest.mark.slow
def test_a_resume_after_sigkill_logs_each_step_once(tmp_path):
    """Killed while metrics.jsonl holds two lines past its newest checkpoint, resumed to end
    one line past it: the file equals an uninterrupted run's (wall-clock perf/* aside), the
    interrupted attempt's later line gone."""
    from test_resume import newest_step

    every = ["task.batch_size=10", "trainer.log_every=1000", "trainer.eval_every=null",
             "trainer.checkpoint_every=5000", "trainer.progress_bar=false", "logger=jsonl"]
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = start_process([sys.executable, "-m", "runner", *every, "trainer.steps=1000000000",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while True:  # looked at while the run is stopped, so that it cannot move on meanwhile
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
        proc.send_signal(signal.SIGSTOP)
        killed_at = newest_step(run_dir)
        if 0 < killed_at and max(jsonl_steps(run_dir), default=0) >= killed_at + 2000:
            break
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    end = killed_at + 1000
    run_cli([f"resume={run_dir}", f"trainer.steps={end}"], cwd=tmp_path)
    run_cli([*every, f"trainer.steps={end}", f"hydra.run.dir={tmp_path}/reference"],
            cwd=tmp_path)
    resumed, reference = jsonl_scalars(run_dir), jsonl_scalars(tmp_path / "reference")
    assert sorted({s for _, s in resumed}) == list(range(1000, end + 1, 1000))
    no_perf = lambda d: {k: v for k, v in d.items() if not k[0].startswith("perf/")}  # noqa
    assert no_perf(resumed) == no_perf(reference)


def jsonl_steps(run_dir: Path):
    return [line["step"] for line in read_lines(run_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_an_mlflow_sweep_is_one_experiment_with_a_run_per_job(tmp_path):
    """A real local store read back through MLflow's own client: a run per job with the
    HParams row as params, metrics.jsonl's values at their steps, and how the job ended (the
    second diverges: a NaN loss fails it)."""
    mlflow = pytest.importorskip("mlflow")
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "logger=[mlflow,jsonl]", "optimizer.lr=0.001,1e30",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1  # the diverged job
    client = mlflow.tracking.MlflowClient(f"sqlite:///{sweep}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == str(sweep)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"0", "1"}
    done, diverged = runs["0"], runs["1"]
    assert (done.info.status, done.data.tags["status"]) == ("FINISHED", "completed")
    assert (diverged.info.status, diverged.data.tags["status"]) == ("FAILED", "failed")
    assert done.data.params["optimizer.lr"] == "0.001"
    assert {"task", "model", "optimizer", "seed", "trainer.steps", "device"} <= set(
        done.data.params)
    assert "status" not in done.data.params  # its MLflow status, and a tag: both can change
    lines = jsonl_scalars(sweep / "0")
    for key in {key for key, _ in lines}:
        history = client.get_metric_history(done.info.run_id, key)
        assert {(key, m.step): m.value for m in history} == {
            k: v for k, v in lines.items() if k[0] == key}
    recorded = json.loads((sweep / "0" / "mlflow_run.json").read_text())
    assert recorded["run_id"] == done.info.run_id


def test_mlflow_resume_continues_the_same_run(tmp_path):
    """A resumed run (from step 2) logs again into the same MLflow run: a step the interrupted
    attempt logged after its checkpoint then holds both points, the resumed one's last; a
    param a resume changed is a tag; the status is the last attempt's."""
    pytest.importorskip("mlflow")
    from runner.io.writers.mlflow_run import MLflowWriter

    def attempt(start_step, losses, hparams, status):
        writer = MLflowWriter(run=RunInfo(dir=tmp_path, start_step=start_step))
        for step, loss in losses.items():
            writer.scalars(step, "train", {"loss": loss})
        writer.flush()
        writer.hparams({**hparams, "status": status}, status=status)
        writer.close()
        return writer

    first = attempt(0, {2: 1.0, 4: 0.8}, {"optimizer.lr": 0.1, "trainer.steps": 6},
                    "interrupted")
    client = first.client
    assert client.get_run(first.run_id).info.status == "KILLED"
    time.sleep(0.01)  # a resume starts later: its points' timestamps are later
    second = attempt(2, {4: 0.7, 6: 0.5}, {"optimizer.lr": 0.1, "trainer.steps": 8},
                     "completed")
    assert second.run_id == first.run_id
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == "runner" and len(client.search_runs(
        [experiment.experiment_id])) == 1
    history = sorted(client.get_metric_history(first.run_id, "train/loss"),
                     key=lambda m: (m.step, m.timestamp))
    assert [(m.step, m.value) for m in history] == [(2, 1.0), (4, 0.8), (4, 0.7), (6, 0.5)]
    got = client.get_run(first.run_id)
    assert (got.info.status, got.data.tags["status"]) == ("FINISHED", "completed")
    assert got.data.metrics["train/loss"] == 0.5
    assert (got.data.params["trainer.steps"], got.data.tags["trainer.steps"]) == ("6", "8")


USER_WRITER = '''
import json


class Recorder:
    """A user's writer: every scalar as a line of recorded.txt; nothing else."""

    run_files = ("recorded.txt",)

    def __init__(self, *, run, tag: str = "none"):
        self.path, self.tag = run.dir / "recorded.txt", tag
        self.file = open(self.path, "a")

    def scalars(self, step, prefix, values):
        for name, value in values.items():
            self.file.write(json.dumps([self.tag, step, f"{prefix}/{name}", value]) + "\\n")

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()
'''


@pytest.mark.slow
def test_a_users_writer_beside_runners_and_overwrite_sets_both_aside(tmp_path):
    """A writer class in the user's own package and one YAML in their config dir, selected
    with the list syntax beside jsonl: the same scalars at the same steps. overwrite=true
    moves both writers' files (and runner's) to attempts/1/. A bad _target_: one line naming
    the key, exit 1, nothing written."""
    user_project(tmp_path, "myproj", {"writers": USER_WRITER}, {
        "logger/recorder.yaml": "recorder:\n  _target_: myproj.writers.Recorder\n  tag: mine\n",
        "logger/broken.yaml": "broken:\n  _target_: myproj.nowhere.Writer\n"})
    args = ["--config-dir", "myconf", *TINY, "logger=[jsonl,recorder]", "hydra.run.dir=out"]
    run_dir = tmp_path / "out"

    def recorded(where: Path) -> dict:
        rows = [json.loads(line) for line in (where / "recorded.txt").read_text().splitlines()]
        assert {tag for tag, *_ in rows} == {"mine"}  # the YAML's value reached the class
        return {(key, step): value for _, step, key, value in rows}

    run_cli(args, cwd=tmp_path)
    first = jsonl_scalars(run_dir)
    assert recorded(run_dir) == first and len(first) > 8
    assert not (run_dir / "tb").exists()
    run_cli([*args, "overwrite=true", "seed=1"], cwd=tmp_path)
    old = run_dir / "attempts" / "1"
    assert recorded(old) == jsonl_scalars(old) == first
    second = jsonl_scalars(run_dir)
    assert recorded(run_dir) == second and set(second) == set(first) and second != first
    assert json.loads((old / "metrics.json").read_text())["status"] == "completed"

    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_cli(["--config-dir", "myconf", *TINY, "logger=[tensorboard,broken]",
                    "hydra.run.dir=bad"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: logger.broken._target_=myproj.nowhere.Writer: "
                                   "cannot import it (No module named 'myproj.nowhere')")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")
                  if "__pycache__" not in p.parts) == [
        p for p in before if "__pycache__" not in p.parts]
