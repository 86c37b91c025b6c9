"""The runner in-process: run-dir contents, one compilation, determinism, scan == steps."""

import json

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_CNN, compose_config, start
from runner.config.errors import RunnerError
from runner.core.steps import train_steps
from runner.core.cadence import MAX_AUTO_DISPATCH, log_windows, steps_per_dispatch
from runner.run.train import run

LINEAR_40 = ["trainer.steps=40", "trainer.log_every=10", "trainer.eval_every=20",
             "trainer.checkpoint_every=20"]


def scalars(run_dir, tag):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_run_trains_logs_checkpoints_and_compiles_the_step_once(tmp_path):
    eval_loss = run(compose_config(LINEAR_40), tmp_path)["eval"]["loss"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 40
    assert metrics["eval"]["loss"] == pytest.approx(eval_loss)
    assert metrics["train_step_compiles"] == 1  # 4 dispatches of 10 steps, one compilation
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.json", "best.msgpack", "step_20.msgpack", "step_40.msgpack"]
    losses = scalars(tmp_path, "train/loss")
    assert [s for s, _ in losses] == [10, 20, 30, 40]
    assert losses[-1][1] < losses[0][1] / 2  # the loss falls
    assert [s for s, _ in scalars(tmp_path, "eval/mse")] == [20, 40]
    assert "Total Parameters: 385" in (tmp_path / "model_summary.txt").read_text()


def test_cnn_run_compiles_once_and_logs_accuracy(tmp_path):
    run(compose_config([*TINY_CNN, "trainer.steps=6", "trainer.log_every=2",
                        "trainer.eval_every=3", "trainer.checkpoint_every=6"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_step_compiles"] == 1
    assert [s for s, _ in scalars(tmp_path, "eval/accuracy")] == [3, 6]
    assert set(metrics["eval"]) == {"loss", "accuracy"}


def test_same_seed_gives_identical_checkpoints_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run(compose_config([f"seed={seed}"]), tmp_path / name)
    read = lambda name: (tmp_path / name / "checkpoints" / "step_4.msgpack").read_bytes()  # noqa
    assert read("a") == read("b")
    assert read("a") != read("c")


def test_scanned_steps_equal_single_steps():
    # minibatches: per-step data randomness
    (task, _, _), (fused, data, _, rng) = start(["task.batch_size=10"])
    fused, _ = train_steps(fused, data, rng, task=task, steps_per_dispatch=4)
    single = start(["task.batch_size=10"])[1].state
    for _ in range(4):
        single, _ = train_steps(single, data, rng, task=task, steps_per_dispatch=1)
    assert int(fused.step) == int(single.step) == 4
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_steps_per_dispatch_lands_on_every_cadence():
    trainer = lambda **kw: OmegaConf.create({"steps": 200, "log_every": 50, "eval_every": 100,  # noqa
                                             "checkpoint_every": 100, "steps_per_dispatch": None,
                                             "log_histograms": False, **kw})
    assert steps_per_dispatch(trainer()) == 100  # two log windows per dispatch
    assert steps_per_dispatch(trainer(log_histograms=True)) == 50  # params at each log step
    assert steps_per_dispatch(trainer(log_every=30, eval_every=None)) == 10
    assert steps_per_dispatch(trainer(steps=7, log_every=5)) == 1
    assert steps_per_dispatch(trainer(steps_per_dispatch=25)) == 25
    assert steps_per_dispatch(trainer(steps=3000, eval_every=None, checkpoint_every=None)) \
        == MAX_AUTO_DISPATCH
    assert steps_per_dispatch(trainer(), start_step=150) == 50  # a resume from step 150
    assert log_windows(50, 100) == 2 and log_windows(50, 50) == 1
    assert log_windows(30, 10) == 1


def test_a_dispatch_returns_the_mean_of_each_log_window():
    (task, _, optimizer), (fused, data, _, rng) = start(["task.batch_size=10"])
    _, windows = train_steps(fused, data, rng, task=task,
                             steps_per_dispatch=6, log_windows=3)
    single = start(["task.batch_size=10"])[1].state
    losses = []
    for _ in range(6):
        single, m = train_steps(single, data, rng, task=task,
                                steps_per_dispatch=1)
        losses.append(float(m["loss"][0]))
    assert windows["loss"].shape == (3,)
    np.testing.assert_allclose(windows["loss"], np.reshape(losses, (3, 2)).mean(1), rtol=1e-5)


def test_every_log_step_is_logged_when_a_dispatch_spans_several(tmp_path):
    overrides = ["trainer.steps=8", "trainer.log_every=2", "trainer.eval_every=4",
                 "trainer.checkpoint_every=8"]
    run(compose_config(overrides), tmp_path)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert [e.step for e in events.Scalars("perf/compile_s")] == [8]
    # Each logged value is its window's mean, against the same 8 steps taken one at a time
    # from the run's start (seed 0) here, outside the run's loop and logger.
    (task, _, optimizer), (state, data, _, rng) = start(overrides)
    losses = []
    for _ in range(8):
        state, m = train_steps(state, data, rng, task=task,
                               steps_per_dispatch=1)
        losses.append(float(m["loss"][0]))
    windows = np.reshape(losses, (4, 2)).mean(1)
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], windows,
                               rtol=1e-5)
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["train"]["loss"] == pytest.approx(windows[-1], rel=1e-5)


def test_steps_per_dispatch_must_divide_the_cadences(tmp_path):
    with pytest.raises(RunnerError, match="trainer.steps_per_dispatch=3"):
        run(compose_config(["trainer.steps_per_dispatch=3"]), tmp_path)


def test_divergence_stops_the_run_with_status_failed(tmp_path):
    with pytest.raises(RunnerError, match="at step 2: training diverged"):
        run(compose_config(["optimizer.lr=1e6", "optimizer=sgd", "optimizer.momentum=null"]),
            tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "diverged" in metrics["reason"]


def test_a_resume_step_off_the_dispatch_grid_is_refused(tmp_path):
    run(compose_config(["trainer.steps=6"]), tmp_path)  # checkpoints at 2, 4, 6
    longer = compose_config(["trainer.steps=14", "trainer.steps_per_dispatch=4",
                             "trainer.log_every=4", "trainer.eval_every=4",
                             "trainer.checkpoint_every=4"])
    with pytest.raises(RunnerError, match="trainer.steps_per_dispatch=4: must divide"):
        run(longer, tmp_path, resume=True)  # dispatches from 6 would end at 10, not 8, 12


def test_steps_per_sec_counts_the_device_time_up_to_the_fetch(tmp_path, monkeypatch):
    """A dispatch returns before the device is done: the throughput window must end when the
    metrics reach the host (here each fetch waits 0.1 s more), not when the call returns."""
    import time

    import runner.loop.host

    fetch = runner.loop.host.jax.device_get

    def slow_fetch(tree):
        time.sleep(0.1)
        return fetch(tree)

    monkeypatch.setattr(runner.loop.host.jax, "device_get", slow_fetch)
    run(compose_config(LINEAR_40), tmp_path)
    rates = [v for _, v in scalars(tmp_path, "perf/steps_per_sec")]
    assert rates and all(rate <= 20 / 0.1 for rate in rates)  # 20 steps per dispatch


def test_a_members_actions_fall_due_on_their_cadences_and_say_what_they_need(tmp_path):
    from runner.core.cadence import Cadence
    from runner.io.checkpoint import Checkpointer
    from runner.io.tb_logger import NullLogger
    from runner.loop.member import Member

    trainer = compose_config(["trainer.steps=12", "trainer.log_every=2", "trainer.eval_every=4",
                              "trainer.checkpoint_every=6"]).trainer
    member = Member(tmp_path, spec=None, cadence=Cadence.of(trainer), data=None,
                    trainer=trainer, logger=NullLogger(),
                    checkpointer=Checkpointer(tmp_path / "checkpoints", keep=None,
                                              metric="loss", mode="min"), start_step=0)
    log, evaluate, checkpoint = member.actions
    assert member.due(2, last=False) == [log]
    assert member.due(3, last=False) == []
    assert member.due(4, last=False) == [log, evaluate]
    assert member.due(6, last=False) == [log, checkpoint]
    assert member.due(12, last=True) == [log, evaluate, checkpoint]
    # The state is fetched for the eval and the checkpoint; a stop runs the log and the
    # checkpoint at its step, not the eval (which stopped it).
    assert [a.needs_state for a in member.actions] == [False, True, True]
    assert [a.on_stop for a in member.actions] == [True, False, True]


def test_the_console_has_a_train_line_for_every_log_step(tmp_path, caplog):
    """A dispatch of 100 steps brings two 50-step log windows (``trainer.log_every=50``):
    each gets its console line when the dispatch's metrics arrive."""
    cfg = compose_config(["trainer.steps=200", "trainer.log_every=50", "trainer.eval_every=100",
                          "trainer.checkpoint_every=100"])
    assert steps_per_dispatch(cfg.trainer) == 100
    with caplog.at_level("INFO", logger="runner.loop.member"):
        run(cfg, tmp_path)
    train = [r.getMessage().split()[1] for r in caplog.records
             if r.name == "runner.loop.member" and "train/loss=" in r.getMessage()]
    assert train == ["50/200", "100/200", "150/200", "200/200"]
    assert [e.step for e in EventAccumulator(str(tmp_path / "tb")).Reload()
            .Scalars("train/loss")] == [50, 100, 150, 200]
