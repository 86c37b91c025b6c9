"""Fused sweeps (hydra/launcher=fused): the same results as the basic launcher, job by job,
each job its own run; failures isolated inside the program; resume alone or as a group."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from flax import serialization
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_CNN, run_cli
from runner.config.errors import RunnerError
from runner.io.checkpoint import list_checkpoints

# linear_fit in minibatches (each step draws its batch from the seed and step), 4 lrs x 2 seeds.
SWEEP = ["optimizer.lr=1e-3,3e-3,1e-2,3e-2", "seed=0,1"]
COMMON = ["task.batch_size=16", "trainer.steps=60", "trainer.log_every=20",
          "trainer.eval_every=30", "trainer.checkpoint_every=30", "trainer.progress_bar=false"]
# On the CPU the members train in turn, each on a single run's compiled step: bit-identical to
# the basic launcher. On an accelerator (jax.vmap) the batched
# kernels round differently: the loss curves within RTOL (relative, per value), each array of
# the final states within STATE_RTOL of its norm (vmap measured here: 4.5e-6 after 60 steps).
RTOL = 2e-6
STATE_RTOL = 2e-5
EXACT = jax.devices()[0].platform == "cpu"


def sweep(tmp_path: Path, name: str, *args, launcher: str = "fused", check: bool = True):
    return run_cli(["-m", f"hydra/launcher={launcher}", *args,
                    f"hydra.sweep.dir={tmp_path / name}"], cwd=tmp_path, check=check)


def jobs(sweep_dir: Path):
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def job_pairs(tmp_path: Path, count: int):
    """Job ``i`` of the fused sweep and of the basic one, for each of the ``count`` jobs."""
    fused, basic = jobs(tmp_path / "fused"), jobs(tmp_path / "basic")
    assert [p.name for p in fused] == [p.name for p in basic] == [str(i) for i in range(count)]
    return list(zip(fused, basic))


def curve(run_dir: Path, tag: str):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def leaves(path: Path):
    from jax.tree_util import tree_leaves
    return [np.asarray(x, np.float64) for x in tree_leaves(
        serialization.msgpack_restore(path.read_bytes()))]


def assert_same_run(fused: Path, basic: Path, step: int) -> None:
    assert (yaml.safe_load((fused / ".hydra" / "overrides.yaml").read_text())
            == yaml.safe_load((basic / ".hydra" / "overrides.yaml").read_text()))
    for tag in ("train/loss", "eval/loss"):
        (steps_f, values_f), (steps_b, values_b) = (zip(*curve(fused, tag)),
                                                    zip(*curve(basic, tag)))
        assert steps_f == steps_b
        np.testing.assert_allclose(values_f, values_b, rtol=0 if EXACT else RTOL)
    fused_leaves, basic_leaves = (leaves(d / "checkpoints" / f"step_{step}.msgpack")
                                  for d in (fused, basic))
    assert len(fused_leaves) == len(basic_leaves) > 0
    for a, b in zip(fused_leaves, basic_leaves):
        assert a.shape == b.shape
        assert np.linalg.norm(a - b) <= (0 if EXACT else STATE_RTOL) * np.linalg.norm(b)
    metrics = json.loads((fused / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == step


def test_a_fused_sweep_equals_the_basic_launchers_job_by_job(tmp_path):
    proc = sweep(tmp_path, "fused", *SWEEP, *COMMON)
    sweep(tmp_path, "basic", *SWEEP, *COMMON, launcher="basic")
    assert "fusing jobs 0, 1, 2, 3, 4, 5, 6, 7 into one group (8 members" in (
        proc.stdout + proc.stderr)
    for f, b in job_pairs(tmp_path, 8):
        assert {p.name for p in f.iterdir()} >= {
            ".hydra", "runner.log", "tb", "checkpoints", "metrics.json", "manifest.json",
            "model_summary.txt"}
        assert_same_run(f, b, 60)
        assert "step 60/60" in (f / "runner.log").read_text()
    rows = (tmp_path / "fused" / "summary.csv").read_text().splitlines()
    assert len(rows) == 9 and all(",completed," in r for r in rows[1:])


@pytest.mark.skipif(not EXACT, reason="accelerators batch the members: float32 round-off")
def test_on_the_cpu_fused_members_are_the_basic_launchers_runs_bit_for_bit(tmp_path):
    """At 2 steps per dispatch too (where a program running the members one after another
    inside it compiled the scan differently: 3e-8 apart), every checkpoint's bytes."""
    args = ["optimizer.lr=1e-3,1e-2", "task.batch_size=16", "trainer.steps=8",
            "trainer.steps_per_dispatch=2", "trainer.log_every=2", "trainer.eval_every=4",
            "trainer.checkpoint_every=4", "trainer.progress_bar=false"]
    sweep(tmp_path, "fused", *args)
    sweep(tmp_path, "basic", *args, launcher="basic")
    for f, b in job_pairs(tmp_path, 2):
        for step in (4, 8):
            name = f"checkpoints/step_{step}.msgpack"
            assert (f / name).read_bytes() == (b / name).read_bytes(), (f.name, step)
        assert curve(f, "train/loss") == curve(b, "train/loss")


def test_a_fused_cnn_sweep_equals_the_basic_launchers(tmp_path):
    args = ["optimizer.lr=1e-3,3e-3", *TINY_CNN, "trainer.steps=6", "trainer.log_every=3",
            "trainer.eval_every=3", "trainer.checkpoint_every=3", "trainer.progress_bar=false"]
    sweep(tmp_path, "fused", *args)
    sweep(tmp_path, "basic", *args, launcher="basic")
    for f, b in job_pairs(tmp_path, 2):
        assert_same_run(f, b, 6)


def test_a_diverging_member_and_bad_values_fail_alone(tmp_path):
    proc = sweep(tmp_path, "s", "optimizer.lr=1e-3,1e6,-1,abc", "seed=0,1", *COMMON,
                 check=False)
    assert proc.returncode == 1
    status = {p.name: json.loads((p / "metrics.json").read_text()) for p in
              jobs(tmp_path / "s")}
    overrides = {n: " ".join(m["overrides"]) for n, m in status.items()}
    ok = [n for n, o in overrides.items() if "lr=0.001" in o]
    assert len(ok) == 2 and all(status[n]["status"] == "completed" for n in ok)
    for n, m in status.items():
        if n in ok:
            continue
        assert m["status"] == "failed", (n, m)
        o = overrides[n]
        if "lr=abc" in o:
            assert m["reason"] == ("optimizer.lr: Value 'abc' of type 'str' could not be "
                                   "converted to Float")
        elif "lr=-1" in o:
            assert m["reason"] == "optimizer.lr=-1.0: must be > 0"
        else:  # the diverging one: the reason a single run gives, at its step
            assert "training diverged (try a lower optimizer.lr)" in m["reason"], m["reason"]
    assert "error: 6 of 8 jobs failed" in proc.stderr
    assert "fusing jobs 0, 1, 2, 3 into one group (4 members" in proc.stdout + proc.stderr


def test_two_groups_from_a_structural_sweep(tmp_path):
    proc = sweep(tmp_path, "s", "optimizer.lr=1e-3,1e-2", "model.features=[16],[32]",
                 *COMMON)
    out = proc.stdout + proc.stderr
    assert out.count("into one group (2 members") == 2, out[-3000:]
    assert len(jobs(tmp_path / "s")) == 4


def test_a_fused_job_resumes_alone_and_evaluates(tmp_path):
    sweep(tmp_path, "s", "optimizer.lr=1e-3,1e-2", *COMMON)
    job = tmp_path / "s" / "1"
    run_cli([f"resume={job}", "trainer.steps=90"], cwd=tmp_path)
    metrics = json.loads((job / "metrics.json").read_text())
    assert (metrics["status"], metrics["steps"], metrics["resumed_from"]) == (
        "completed", 90, 60)
    proc = subprocess.run([sys.executable, "-m", "runner.eval", str(job)], cwd=tmp_path,
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["step"] == 90


def start_sweep(tmp_path, args):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen([sys.executable, "-m", "runner", "-m", "hydra/launcher=fused",
                             *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_then_sigkill_then_a_rerun_finishes_the_group(tmp_path):
    """SIGTERM: every member checkpoints and is interrupted; the rerun resumes them as a group.
    SIGKILL of that rerun: the next rerun resumes from the checkpoints. The results equal an
    uninterrupted fused sweep's."""
    args = ["optimizer.lr=1e-3,1e-2", "task.batch_size=16", "trainer.steps=400000",
            "trainer.log_every=20000", "trainer.eval_every=200000",
            "trainer.checkpoint_every=20000", "trainer.log_images=false",
            "trainer.progress_bar=false", f"hydra.sweep.dir={tmp_path / 's'}"]
    ref = ["optimizer.lr=1e-3,1e-2", *args[1:-1], f"hydra.sweep.dir={tmp_path / 'ref'}"]
    for signum in (signal.SIGTERM, signal.SIGKILL):
        proc = start_sweep(tmp_path, args)
        deadline = time.monotonic() + 120
        while len(list_checkpoints(tmp_path / "s" / "1" / "checkpoints")) < (
                2 if signum == signal.SIGTERM else 4):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        if signum == signal.SIGTERM:
            for job in ("0", "1"):
                m = json.loads((tmp_path / "s" / job / "metrics.json").read_text())
                assert m["status"] == "interrupted"
                assert list_checkpoints(tmp_path / "s" / job / "checkpoints")[-1][0] == m["steps"]
    run_cli(["-m", "hydra/launcher=fused", *args], cwd=tmp_path)
    run_cli(["-m", "hydra/launcher=fused", *ref], cwd=tmp_path)
    for job in ("0", "1"):
        m = json.loads((tmp_path / "s" / job / "metrics.json").read_text())
        assert m["status"] == "completed" and m["resumed_from"] > 0
        assert ((tmp_path / "s" / job / "checkpoints" / "step_400000.msgpack").read_bytes()
                == (tmp_path / "ref" / job / "checkpoints" / "step_400000.msgpack").read_bytes())


def test_an_optuna_batch_through_the_fused_launcher(tmp_path):
    proc = run_cli(["-m", "hparams_search=linear_fit_optuna", "hydra/launcher=fused",
                    "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=4",
                    # lr and b1 vary (numbers in the optimizer state): one program
                    "hydra.sweeper.params={optimizer.lr:'tag(log, interval(1e-4, 1e-1))',"
                    "model.features:'choice([64])'}",
                    *COMMON, f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path)
    assert "into one group (4 members" in proc.stdout + proc.stderr
    results = yaml.safe_load((tmp_path / "s" / "optimization_results.yaml").read_text())
    losses = [json.loads((p / "metrics.json").read_text())["eval"]["loss"]
              for p in jobs(tmp_path / "s")]
    assert len(losses) == 4 and results["best_value"] == pytest.approx(min(losses))


def test_max_members_caps_a_group(tmp_path):
    proc = sweep(tmp_path, "s", "optimizer.lr=1e-3,3e-3,1e-2,3e-2", "hydra.launcher.max_members=2",
                 *COMMON)
    out = proc.stdout + proc.stderr
    assert "fusing jobs 0, 1 into one group (2 members" in out
    assert "fusing jobs 2, 3 into one group (2 members" in out


def test_a_group_too_large_for_the_free_memory_is_split(tmp_path, caplog):
    """Before it runs, a group's program is compiled and its memory compared with the
    device's free memory (accelerators report it; here it is given)."""
    import functools

    from conftest import compose_config
    from runner.config.schema import typed
    from runner.core.spec import fused_bytes
    from runner.loop.groups import split_to_fit
    from runner.run.train import Session

    sessions = [Session(typed(compose_config([f"optimizer.lr={lr}", *COMMON])),
                        tmp_path / str(i)) for i, lr in enumerate((1e-3, 3e-3, 1e-2, 3e-2))]
    try:
        members = [session.open() for session in sessions]
        run = sessions[0].run
        need = functools.partial(fused_bytes, run.spec, (run.state, run.data, run.train_rng))
        assert 0 < need(2) < need(4)
        assert split_to_fit(members, need, free=10**12) == [members]
        assert split_to_fit(members, need, free=None) == [members]  # a CPU says nothing
        with caplog.at_level("INFO"):
            assert split_to_fit(members, need, free=1) == [[m] for m in members]
    finally:  # their locks, event files and threads
        for session in sessions:
            session.fail(RunnerError("test over"))
    assert "a fused group of 4 jobs needs" in caplog.text
    assert "the device has 0 MiB free: split in two" in caplog.text


def test_fused_members_log_the_devices_mfu_where_the_peak_is_known(tmp_path, monkeypatch):
    """The device runs every member's steps: its utilisation is the group's steps/s x members
    x FLOPs per step / peak, logged by each member (as a single run logs its own)."""
    import runner.run.build
    from conftest import compose_config
    from runner.config.schema import typed
    from runner.platform.preemption import StopRequest
    from runner.run.train import Session, train_group

    monkeypatch.setattr(runner.run.build, "peak_flops", lambda *args: 1e12)  # a CPU with a peak
    sessions = [Session(typed(compose_config([f"optimizer.lr={lr}", "trainer.steps=8"])),
                        tmp_path / str(i)) for i, lr in enumerate((1e-3, 1e-2))]
    for session in sessions:
        session.open()
    results = train_group(sessions, StopRequest())
    for session, result in zip(sessions, results):
        session.finish(result)
    for session in sessions:
        flops = json.loads((session.run_dir / "metrics.json").read_text())["devices"][
            "flops_per_step"]
        mfu, rate = (curve(session.run_dir, f"perf/{tag}")
                     for tag in ("mfu", "group_steps_per_sec"))
        # every log step but the first dispatch's (compile time is not throughput)
        assert [s for s, _ in mfu] == [s for s, _ in rate] == [4, 6, 8]
        for (_, m), (_, r) in zip(mfu, rate):
            assert 0 < m < 1 and m == pytest.approx(r * 2 * flops / 1e12, rel=1e-5)


def test_on_several_devices_a_group_takes_one_and_a_data_parallel_job_runs_alone(
        tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    proc = sweep(tmp_path, "s", "optimizer.lr=1e-3,1e-2", *COMMON)
    assert "into one group (2 members" in proc.stdout + proc.stderr
    devices = json.loads((tmp_path / "s" / "0" / "metrics.json").read_text())["devices"]
    assert devices["num_devices"] == 1
    proc = sweep(tmp_path, "dp", "optimizer.lr=1e-3,1e-2", "device.num_devices=2", *COMMON)
    out = proc.stdout + proc.stderr
    assert "into one group" not in out and out.count("a run on 2 devices trains alone") == 2
    devices = json.loads((tmp_path / "dp" / "1" / "metrics.json").read_text())["devices"]
    assert devices["num_devices"] == 2


def test_the_batched_program_accelerators_run_agrees_with_the_members_one_by_one():
    """``jax.vmap`` over the members (what accelerators run) against each member trained alone
    by ``runner.core.steps.train_steps`` (a single run's, the basic launcher's and, in turn,
    the CPU's fused path): to float32 round-off (RTOL, STATE_RTOL)."""
    import jax.numpy as jnp

    from conftest import start
    from runner.core.spec import StepSpec, train_steps_fused
    from runner.core.steps import train_steps

    starts = [start(["task.batch_size=16", f"optimizer.lr={lr}"], seed=seed)
              for lr, seed in ((1e-3, 0), (1e-2, 1))]
    (task, _, optimizer), _ = starts[0]

    def stacked(pick):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *[pick(s) for _, s in starts])

    spec = StepSpec(task=task, steps_per_dispatch=20)
    fused_state, fused_metrics = jax.device_get(train_steps_fused(
        stacked(lambda s: s.state), stacked(lambda s: s.data),
        stacked(lambda s: s.train_rng), jnp.ones(2, bool), spec=spec))
    # Last: train_steps donates the states the stacks above were copied from.
    alone = [jax.device_get(train_steps(s.state, s.data, s.train_rng, task=task,
                                        steps_per_dispatch=20))
             for _, s in starts]
    for i, (state, metrics) in enumerate(alone):
        np.testing.assert_allclose(fused_metrics["loss"][i], metrics["loss"], rtol=RTOL,
                                   err_msg=f"member {i}")
        for a, b in zip(jax.tree.leaves(fused_state), jax.tree.leaves(state)):
            a, b = np.asarray(a[i], np.float64), np.asarray(b, np.float64)
            assert a.shape == b.shape
            assert np.linalg.norm(a - b) <= STATE_RTOL * max(np.linalg.norm(b), 1e-30), i
    assert int(alone[0][0].step) == 20  # both members trained, each from its own start
    assert not np.array_equal(alone[0][0].params["Dense_0"]["kernel"],
                              alone[1][0].params["Dense_0"]["kernel"])
