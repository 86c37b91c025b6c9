"""Runs you can trust: bit-exact resume after SIGKILL, SIGTERM, keep-N and best checkpoints,
bad checkpoints, eval of a finished (copied) run, the manifest."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import serialization

from conftest import TINY, compose_config, run_cli
from runner.config.errors import RunnerError
from runner.io.checkpoint import list_checkpoints
from runner.run.train import run

# Minibatch training (per-step data randomness), 20,000 steps (~0.3 s) per dispatch, a
# checkpoint after each.
DISPATCH = 20000
LONG = ["task.batch_size=10", f"trainer.log_every={DISPATCH}", "trainer.eval_every=60000",
        f"trainer.checkpoint_every={DISPATCH}", "trainer.progress_bar=false"]
# A run a signal is meant to stop never ends by itself, so it cannot finish before the signal
# lands however fast the machine; its resume then gives the steps it ends at.
UNBOUNDED = "trainer.steps=1000000000"


def start(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file holds."""
    return int(serialization.msgpack_restore(path.read_bytes())["step"])


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir / "checkpoints")
    return found[-1][0] if found else 0


def wait_past(proc, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Wait until a checkpoint newer than ``step`` exists (the run is mid-way)."""
    deadline = time.monotonic() + timeout
    while newest_step(run_dir) <= step:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no new checkpoint in time"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkilled_and_resumed_run_ends_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*LONG, UNBOUNDED, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_past(proc, run_dir, 0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_kill = newest_step(run_dir)
    assert first_kill > 0 and first_kill % DISPATCH == 0

    proc = start([f"resume={run_dir}"], tmp_path)  # killed again, a little later
    wait_past(proc, run_dir, first_kill)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    second_kill = newest_step(run_dir)
    assert second_kill > first_kill and second_kill % DISPATCH == 0
    # The uninterrupted run to compare with ends two dispatches past the second kill (a
    # constant learning rate: trainer.steps changes nothing before the end).
    end = second_kill + 2 * DISPATCH
    run_cli([*LONG, f"trainer.steps={end}", f"hydra.run.dir={tmp_path}/reference"],
            cwd=tmp_path)
    reference = (tmp_path / f"reference/checkpoints/step_{end}.msgpack").read_bytes()

    # A kill inside a checkpoint write leaves at most a temporary file; a torn file under a
    # final name (as a non-atomic writer would leave) must be skipped, not loaded.
    ckpt = run_dir / "checkpoints"
    (ckpt / f".step_{second_kill + DISPATCH}.msgpack.tmp").write_bytes(b"\x87partial")
    torn = (ckpt / f"step_{second_kill}.msgpack").read_bytes()
    (ckpt / f"step_{second_kill + DISPATCH}.msgpack").write_bytes(torn[: len(torn) // 2])

    proc = start([f"resume={run_dir}", f"trainer.steps={end}"], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    final = (ckpt / f"step_{end}.msgpack").read_bytes()
    assert final == reference  # params, opt_state and step, byte for byte
    log = (run_dir / "runner.log").read_text()
    assert f"skipping checkpoint {ckpt}/step_{second_kill + DISPATCH}.msgpack" in log
    assert f"resuming from {ckpt}/step_{second_kill}.msgpack" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["resumed_from"]) == (
        "completed", end, second_kill)
    reference_metrics = json.loads((tmp_path / "reference/metrics.json").read_text())
    assert metrics["eval"] == reference_metrics["eval"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [a["start_step"] for a in manifest["attempts"]] == [0, first_kill, second_kill]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_marks_the_run_interrupted(tmp_path):
    """No periodic checkpoints (nor evals, which keep best.msgpack): the checkpoint at the
    interrupted step is SIGTERM's own."""
    run_dir = tmp_path / "run"
    proc = start([*(a for a in LONG if not a.startswith(("trainer.checkpoint_every=",
                                                         "trainer.eval_every="))),
                  "trainer.checkpoint_every=null", "trainer.eval_every=null", UNBOUNDED,
                  f"hydra.run.dir={run_dir}"], tmp_path)
    log, deadline = run_dir / "runner.log", time.monotonic() + 120
    while f"step {DISPATCH}/" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no dispatch logged in time"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    stopped = re.fullmatch(r"error: stopped by SIGTERM at step (\d+), checkpoint (\S+); "
                           r"continue with: \S+ -m runner resume=(\S+)",
                           stderr.strip().splitlines()[-1])
    assert stopped, stderr
    step = int(stopped.group(1))
    path = run_dir / f"checkpoints/step_{step}.msgpack"
    assert step >= DISPATCH and step % DISPATCH == 0
    assert stopped.groups()[1:] == (str(path), str(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"]) == ("interrupted", step)
    assert list_checkpoints(run_dir / "checkpoints") == [(step, path)]
    assert checkpoint_step(path) == step

    proc = start([f"resume={run_dir}", f"trainer.steps={step + DISPATCH}"], tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["resumed_from"]) == (
        "completed", step + DISPATCH, step)


def test_resume_extends_a_finished_run_and_tensorboard_has_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli([*TINY, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    proc = run_cli([f"resume={tmp_path}", "trainer.steps=8"], cwd=tmp_path)
    assert f"resuming from {tmp_path}/checkpoints/step_4.msgpack (step 4)" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["resumed_from"] == 4
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    stored = (tmp_path / ".hydra/config.yaml").read_text()
    assert "steps: 8" in stored  # the run dir's config is the run's as it now stands
    # A requeue loop reruns the same command: a finished run is not a failure, and untouched.
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args in ([f"resume={tmp_path}"], [f"resume={tmp_path}", "trainer.steps=8"]):
        again = run_cli(args, cwd=tmp_path)
        assert again.stdout.strip().splitlines()[-1] == (
            f"{tmp_path}: already complete at step 8; give a larger trainer.steps to train "
            f"longer")
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}


def snapshot(run_dir: Path):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file()}


def test_a_resume_with_nothing_left_records_the_run_completed(tmp_path):
    """Checkpointed to the end but no metrics.json (killed in between): resume says so, exit
    0, and records the run completed, with its final eval metrics; nothing else changes."""
    run_cli([*TINY, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    finished = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").unlink()
    before = snapshot(tmp_path)
    again = run_cli([f"resume={tmp_path}"], cwd=tmp_path)
    assert "already complete at step 4" in again.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["checkpoint"]) == (
        "completed", 4, str(tmp_path / "checkpoints/step_4.msgpack"))
    assert metrics["eval"] == pytest.approx(finished["eval"], rel=1e-6)
    assert metrics["best"] == finished["best"]
    assert set(metrics) == set(finished)  # one shape, whoever wrote it
    after = snapshot(tmp_path)
    assert after.pop("metrics.json") and after == before


@pytest.mark.slow
@pytest.mark.parametrize("steps", ["at", "below"])
def test_a_resume_of_an_interrupted_run_with_nothing_to_train_completes_it(tmp_path, steps):
    """`resume=<dir> trainer.steps=N` at or below the step an interrupted run stopped at:
    the run is recorded completed at that step with its eval metrics (those runner.eval
    gives), every other file as it was; a later resume then changes nothing."""
    run_dir = tmp_path / "run"
    proc = start([*LONG, UNBOUNDED, f"hydra.run.dir={run_dir}"], tmp_path)
    try:
        wait_past(proc, run_dir, 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    interrupted = json.loads((run_dir / "metrics.json").read_text())
    step = interrupted["steps"]
    assert interrupted["status"] == "interrupted" and step >= DISPATCH
    before = snapshot(run_dir)
    end = step if steps == "at" else step // 2
    again = run_cli([f"resume={run_dir}", f"trainer.steps={end}"], cwd=tmp_path)
    assert again.stdout.strip().splitlines()[-1] == (
        f"{run_dir}: already complete at step {step}; give a larger trainer.steps to train "
        f"longer")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluated = json.loads(subprocess.run(
        [sys.executable, "-m", "runner.eval", str(run_dir)], capture_output=True, text=True,
        check=True).stdout)
    assert (metrics["status"], metrics["steps"], metrics["checkpoint"], metrics["eval"]) == (
        "completed", step, evaluated["checkpoint"], evaluated["eval"])
    assert metrics["reason"] is None and metrics["overrides"] == interrupted["overrides"]
    after = snapshot(run_dir)
    assert after.pop("metrics.json") != before.pop("metrics.json") and after == before
    # Completed now: a resume with nothing to train exits 0 and rewrites nothing.
    completed = snapshot(run_dir)
    for args in ([f"trainer.steps={step}"], [f"trainer.steps={step // 2}"]):
        run_cli([f"resume={run_dir}", *args], cwd=tmp_path)
        assert snapshot(run_dir) == completed


def test_interrupted_attempt_logged_past_its_checkpoint_is_purged(tmp_path):
    """Resumed from step 2, the run ends byte-identical to its uninterrupted self: minibatches
    (task.batch_size < task.num_train), so each step's data comes from (seed, step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_config(["trainer.steps=6", "trainer.checkpoint_every=2",
                          "task.batch_size=16"])
    run(cfg, tmp_path)
    uninterrupted = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    eval_metrics = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    for path in (tmp_path / "checkpoints").glob("step_[46].msgpack"):
        path.unlink()  # as if killed after logging step 6 but before checkpointing past 2
    run(cfg, tmp_path, resume=True)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["resumed_from"], metrics["eval"]) == (2, eval_metrics)
    for name in ("step_4.msgpack", "step_6.msgpack"):
        same = (tmp_path / "checkpoints" / name).read_bytes() == uninterrupted[name]
        assert same, f"{name} differs from the uninterrupted run's"


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, caplog):
    cfg = compose_config(["trainer.steps=6", "trainer.checkpoint_every=2"])
    run(cfg, tmp_path)
    (tmp_path / "checkpoints/step_6.msgpack").write_bytes(os.urandom(300))
    extended = compose_config(["trainer.steps=8", "trainer.checkpoint_every=2"])
    with caplog.at_level(logging.INFO):
        run(extended, tmp_path, resume=True)
    ckpt = tmp_path / "checkpoints"
    assert f"skipping checkpoint {ckpt}/step_6.msgpack: does not match" in caplog.text
    assert f"resuming from {ckpt}/step_4.msgpack (step 4)" in caplog.text
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["resumed_from"], metrics["steps"]) == (4, 8)


def test_keep_newest_checkpoints_and_the_best(tmp_path):
    run(compose_config(["trainer.steps=6", "trainer.checkpoint_every=1", "trainer.eval_every=1",
                        "trainer.log_every=1", "trainer.keep_checkpoints=2"]), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.json", "best.msgpack", "step_5.msgpack", "step_6.msgpack"]
    best = json.loads((tmp_path / "checkpoints/best.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["best"] == best and best["metric"] == "eval/loss"


def test_best_mode_max_keeps_the_highest(tmp_path):
    run(compose_config(["trainer.eval_every=1", "trainer.log_every=1",
                        "trainer.best_mode=max"]), tmp_path)
    best = json.loads((tmp_path / "checkpoints/best.json").read_text())
    assert best["step"] == 1  # the loss falls: its maximum is the first eval


def test_unknown_best_metric_names_the_valid_ones(tmp_path):
    with pytest.raises(RunnerError, match="trainer.best_metric=accuracy: .* valid: loss, mse"):
        run(compose_config(["trainer.best_metric=accuracy", "trainer.best_mode=max"]), tmp_path)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    import jax
    import numpy as np
    from flax import serialization

    with pytest.raises(RunnerError, match="diverged"):
        run(compose_config(["optimizer=sgd", "optimizer.momentum=null", "optimizer.lr=3",
                            "trainer.steps=40", "trainer.log_every=20",
                            "trainer.checkpoint_every=1", "trainer.eval_every=null"]), tmp_path)
    found = list_checkpoints(tmp_path / "checkpoints")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    diverged = re.fullmatch(r"train/(loss|grad_norm) is (nan|inf) at step (\d+): training "
                            r"diverged \(try a lower optimizer.lr\)", metrics["reason"])
    assert diverged, metrics["reason"]
    bad_step = int(diverged.group(3))
    assert 1 < bad_step < 40  # diverged mid-run, after a good step
    assert [step for step, _ in found] == list(range(1, bad_step))  # each good step's, only
    last = serialization.msgpack_restore(found[-1][1].read_bytes())
    assert int(last["step"]) == bad_step - 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(last["params"]))


def test_eval_of_a_copied_run_dir(tmp_path):
    run_cli([*TINY, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere/copy")
    shutil.rmtree(tmp_path / "run")
    metrics = json.loads((tmp_path / "elsewhere/copy/metrics.json").read_text())
    for which, step in (("last", 4), ("best", metrics["best"]["step"]), ("2", 2)):
        out = subprocess.run([sys.executable, "-m", "runner.eval", "elsewhere/copy",
                              "--checkpoint", which], cwd=tmp_path, capture_output=True,
                             text=True, check=True).stdout
        result = json.loads(out)
        assert result["step"] == step
        if which == "last":
            assert result["eval"] == pytest.approx(metrics["eval"], rel=1e-6)
    bad = subprocess.run([sys.executable, "-m", "runner.eval", "elsewhere/copy",
                          "--checkpoint", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: checkpoint ")
    assert "step_3.msgpack: cannot read" in bad.stderr


def test_manifest_records_versions_devices_and_command(tmp_path):
    import flax
    import jax

    run(compose_config(), tmp_path, overrides=["seed=0"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["versions"]["jax"], manifest["versions"]["flax"]) == (
        jax.__version__, flax.__version__)
    assert manifest["devices"] == [str(d) for d in jax.devices()]  # device.num_devices=null
    assert manifest["env"]["XLA_FLAGS"] == os.environ.get("XLA_FLAGS")
    assert [(a["overrides"], a["start_step"]) for a in manifest["attempts"]] == [(["seed=0"], 0)]


@pytest.mark.parametrize("override, message", [
    ("task=cnn_random_images", "a resumed run keeps its task"),
    ("trainer.steps=abc", "trainer.steps"),
])
def test_resume_rejects_bad_overrides(tmp_path, override, message):
    run_cli([*TINY, f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    proc = run_cli([f"resume={tmp_path}", override], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_resume_of_a_missing_dir_is_one_line(tmp_path):
    proc = run_cli([f"resume={tmp_path}/nope"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: resume={tmp_path}/nope: no such directory"


def test_resume_overrides_can_add_keys_with_plus(tmp_path):
    """`resume=<dir> +device.xla_flags.<name>=<value>` adds a key, as for a new run; a plain
    override of a key the run does not have stays an error."""
    from omegaconf import OmegaConf

    from runner.run.resume import load_run_config

    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(compose_config([]), tmp_path / ".hydra" / "config.yaml")
    cfg, overrides = load_run_config(tmp_path, ["+device.xla_flags.xla_cpu_use_xnnpack=true",
                                                "trainer.steps=400"])
    assert cfg.device.xla_flags.xla_cpu_use_xnnpack is True and cfg.trainer.steps == 400
    assert cfg.device.xla_flags.xla_cpu_enable_concurrency_optimized_scheduler is False
    assert overrides[-2] == "+device.xla_flags.xla_cpu_use_xnnpack=true"
    with pytest.raises(Exception, match="xla_cpu_use_onednn"):
        load_run_config(tmp_path, ["device.xla_flags.xla_cpu_use_onednn=true"])


def test_a_crafted_run_dir_calls_nothing_outside_the_trusted_modules(tmp_path):
    """Building a stored config calls its `_target_`s: a run dir from elsewhere naming
    os.mkdir is refused, by resume and by runner.eval, before anything is imported or called."""
    run_cli([*TINY, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    stored = tmp_path / "run/.hydra/config.yaml"
    text = stored.read_text().replace("_target_: runner.tasks.linear_fit.LinearFit",
                                      f"_target_: os.mkdir\n  path: {tmp_path}/pwned")
    stored.write_text(text)
    message = (f"error: {stored}: task._target_=os.mkdir is not in a trusted module (runner, "
               f"optax, flax, jax); if you trust this run dir, add its module: RUNNER_TRUST=os")
    resumed = run_cli([f"resume={tmp_path}/run", "trainer.steps=8"], cwd=tmp_path, check=False)
    evaluated = subprocess.run([sys.executable, "-m", "runner.eval", str(tmp_path / "run")],
                               cwd=tmp_path, capture_output=True, text=True)
    for proc in (resumed, evaluated):
        assert proc.returncode == 1 and proc.stderr.strip() == message
    assert not (tmp_path / "pwned").exists()


def test_targets_inside_lists_are_checked_too(tmp_path):
    from omegaconf import OmegaConf

    from runner.run.resume import check_trusted

    cfg = OmegaConf.create({"model": {"_target_": "runner.models.mlp.MLP", "layers": [
        {"_target_": "runner.models.init.Init"}, {"_target_": "os.mkdir", "path": "x"}]}})
    with pytest.raises(RunnerError, match=r"model.layers\[1\]._target_=os.mkdir is not in"):
        check_trusted(cfg, tmp_path / "config.yaml")
