"""Scale-out: data parallelism over a device mesh, multi-process runs, precision, MFU."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from conftest import TINY, compose_config, free_port, run_cli
import runner.run.build
from runner.config.errors import RunnerError
from runner.config.schema import Precision
from runner.loop.throughput import peak_flops
from runner.io.checkpoint import Checkpointer, list_checkpoints
from runner.io.tb_logger import NullLogger
from runner.run import train

HERE = Path(__file__).resolve().parent
# 8 simulated CPU devices against 1 (and 2 processes against 1), bounded by a float32 argument
# rather than by one machine's figures. On 8 devices every step sums its batch reductions (the
# gradients over the batch's rows and, for a conv kernel, over positions; the loss's mean) in
# another order: per device, then all-reduced. Each order is within DEPTH roundings (unit
# roundoff eps/2, float32 eps = 2**-23 = 1.19e-7) of the exact sum, DEPTH the log2 of the
# longest reduction (a CNN conv kernel's gradient: 16 images x 16x16 positions = 4,096 terms,
# 12), so the two differ by DEPTH * eps relative to the terms' magnitudes, and CANCEL times
# that relative to the sum (per-example gradients of a freshly initialized net add like random
# vectors: their sum is ~sqrt(16) = 4 times smaller than the sum of their sizes). Adam's
# update (lr times a ratio of the gradient's moments) carries the gradient's relative error,
# and the state carries all STEPS updates (a zero-initialized bias is their sum): the final
# states differ by at most STEPS * DEPTH * CANCEL * eps = 4.6e-5 relative, per array. A
# logged loss is a smooth function of params within that bound (O(1) logits and targets), a
# mean of positive per-example losses (no cancellation): the curves share the bound. Measured
# on 2-core CPUs: 1.2e-7 (curves) and 1.6e-7 to 6.2e-7 (states), 70x below. A real bug is
# far above: a 10% larger lr moves the final states by 0.10 (linear_fit) and 0.26 (cnn) and
# the cnn's curve by 1.4e-3; a resume from fresh params at step 4 moves the state by 0.5-0.9.
F32_EPS = float(np.finfo(np.float32).eps)
STEPS, DEPTH, CANCEL = 8, 12, 4
STATE_REL = STEPS * DEPTH * CANCEL * F32_EPS
CURVE_REL = STATE_REL


def test_more_devices_than_visible_is_a_clear_error(tmp_path):
    with pytest.raises(RunnerError, match=r"device.num_devices=4: only 1 cpu device\(s\) "
                                          r"visible \(on CPU, XLA_FLAGS=--xla_force_host"):
        train.run(compose_config(["device.num_devices=4"]), tmp_path)


def test_peak_flops_by_device_kind_and_precision():
    assert peak_flops("NVIDIA H100 80GB HBM3", Precision.bf16) == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", Precision.fp32) == 494e12  # TF32
    assert peak_flops("NVIDIA H100 80GB HBM3", Precision.fp32, "highest") == 67e12
    assert peak_flops("NVIDIA H100 PCIe", Precision.bf16) == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", Precision.bf16) == 312e12
    assert peak_flops("TPU v5 lite", Precision.fp32) == 197e12
    assert peak_flops("cpu", Precision.fp32) is None


def test_mfu_and_flops_are_logged_where_the_peak_is_known(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.run.build, "peak_flops", lambda *args: 1e12)  # a CPU with a peak
    train.run(compose_config(["trainer.steps=8", "trainer.log_every=2"]), tmp_path)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    devices = json.loads((tmp_path / "metrics.json").read_text())["devices"]
    assert devices["peak_flops_per_device"] == 1e12 and devices["flops_per_step"] > 1e4
    mfu = EventAccumulator(str(tmp_path / "tb")).Reload().Scalars("perf/mfu")
    # every log step but the first dispatch's (compile time is not throughput)
    assert [e.step for e in mfu] == [4, 6, 8] and all(0 < e.value < 1 for e in mfu)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["placement"]["num_devices"] == 1


class _FakeDevice:
    def __init__(self, platform):
        self.platform, self.device_kind = platform, "fake"


@pytest.mark.parametrize("platform", ["gpu", "cuda"])
def test_device_gpu_accepts_what_jax_calls_a_cuda_device(monkeypatch, platform):
    """A CUDA device says platform "gpu" (jaxlib 0.11 on an H100): device=gpu must take it, and
    list the CPU after it (the step's FLOPs are analysed there)."""
    from runner.platform import device

    updates = {}
    monkeypatch.setattr(device.jax.config, "update", lambda k, v: updates.__setitem__(k, v))
    monkeypatch.setattr(device, "_backends_started", lambda: False)
    monkeypatch.setattr(device, "_ENV_XLA_FLAGS", None)
    monkeypatch.setenv("XLA_FLAGS", "")  # linear_fit's flag lands here, not in later tests
    gpus = [_FakeDevice(platform)]
    monkeypatch.setattr(device.jax, "devices", lambda *a: gpus)
    cfg = compose_config(["device=gpu", "device.compilation_cache_dir=null"])
    assert device.configure_jax(cfg.device) is gpus
    assert updates["jax_platforms"] == "cuda,cpu"
    monkeypatch.setattr(device.jax, "devices", lambda *a: [_FakeDevice("cpu")])  # CUDA skipped
    with pytest.raises(RunnerError, match="device=gpu: JAX has no usable GPU here"):
        device.configure_jax(cfg.device)


def test_step_flops_where_lowered_programs_are_not_analysed(monkeypatch):
    """GPU plugins answer no cost analysis of a lowered program (and their compiled analysis
    counts no cuDNN convolution FLOPs): the step is then lowered for the CPU and analysed."""
    from runner.bench.suite import runner_parts_of
    from runner.core import steps

    cfg, task, optimizer, state, data, rng = runner_parts_of(
        ["task=cnn_random_images", "task.image_size=8", "task.batch_size=4", "task.num_eval=8"])
    on_cpu = steps.step_flops(state, data, rng, task=task)
    real_analysis, real_devices = jax.stages.Lowered.cost_analysis, jax.devices
    platforms = []

    def analysis(lowered):  # the accelerator's lowering answers None, the CPU's its figures
        platforms.append(jax.config.jax_default_device)
        return real_analysis(lowered) if len(platforms) > 1 else None

    monkeypatch.setattr(jax.stages.Lowered, "cost_analysis", analysis)
    monkeypatch.setattr(steps.jax, "devices",
                        lambda *a: real_devices(*a) if a else [_FakeDevice("gpu")])
    fallback = steps.step_flops(state, data, rng, task=task)
    assert on_cpu > 1e6 and fallback == on_cpu
    assert platforms[0] is None and platforms[1].platform == "cpu"

    def no_cpu(*a):  # JAX_PLATFORMS=cuda: no CPU backend to analyse on, so no MFU
        if a:
            raise RuntimeError("Backend 'cpu' failed to initialize")
        return [_FakeDevice("gpu")]

    platforms.clear()
    monkeypatch.setattr(steps.jax, "devices", no_cpu)
    assert steps.step_flops(state, data, rng, task=task) is None


def test_xla_flags_join_xla_flags_before_jax_starts(monkeypatch, caplog):
    from runner.platform import device

    env = "--xla_force_host_platform_device_count=2 --xla_cpu_a=1"
    monkeypatch.setenv("XLA_FLAGS", env)
    monkeypatch.setattr(device, "_ENV_XLA_FLAGS", None)
    device._add_xla_flags({"xla_cpu_a": 2, "xla_cpu_b": False, "xla_c": "x"}, started=False)
    first = os.environ["XLA_FLAGS"]
    assert first.split() == [  # the environment's own setting wins
        "--xla_force_host_platform_device_count=2", "--xla_cpu_a=1", "--xla_cpu_b=false",
        "--xla_c=x"]
    # Later jobs of a multirun in this process: XLA read the first job's flags.
    device._add_xla_flags({"xla_cpu_a": 2, "xla_cpu_b": False, "xla_c": "x"}, started=True)
    assert not caplog.text  # the same flags: nothing to say
    device._add_xla_flags({"xla_cpu_b": True}, started=True)  # another value: warned
    assert os.environ["XLA_FLAGS"] == first and "--xla_cpu_b=true" in caplog.text
    caplog.clear()
    device._add_xla_flags({}, started=True)  # none: warned that the first job's hold
    assert os.environ["XLA_FLAGS"] == first and "this job runs with the latter" in caplog.text
    caplog.clear()  # the environment's own flags, spaced differently, are the same flags
    monkeypatch.setattr(device, "_ENV_XLA_FLAGS", None)
    monkeypatch.setenv("XLA_FLAGS", "  --xla_cpu_a=1  ")
    device._add_xla_flags({}, started=True)
    assert not caplog.text
    with pytest.raises(RunnerError, match=r"device.xla_flags.xla_d=\[1\]: must be a bool"):
        device.xla_flag_args({"xla_d": [1]})
    with pytest.raises(RunnerError, match=r"device.xla_flags.xla_e='a b': must be a bool"):
        device.xla_flag_args({"xla_e": "a b"})  # XLA_FLAGS is split at spaces


def test_xla_flags_reach_xla(tmp_path):
    """A flag in device.xla_flags is read by XLA: two CPU devices, so the batch is split."""
    run_cli(["+device.xla_flags.xla_force_host_platform_device_count=2", "trainer.steps=4",
             "trainer.log_every=2", "trainer.progress_bar=false",
             f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    devices = json.loads((tmp_path / "run/metrics.json").read_text())["devices"]
    assert devices["num_devices"] == 2
    assert "--xla_force_host_platform_device_count=2" in devices["xla_flags"].split()


def test_bf16_compute_keeps_float32_params(tmp_path):
    fp32 = train.run(compose_config(["trainer.steps=8"]), tmp_path / "fp32")
    bf16 = train.run(compose_config(["trainer.steps=8", "device.precision=bf16"]),
                     tmp_path / "bf16")
    fp32, bf16 = fp32["eval"]["loss"], bf16["eval"]["loss"]
    assert bf16 == pytest.approx(fp32, rel=0.05) and bf16 != fp32
    ckpt = serialization.msgpack_restore(
        (tmp_path / "bf16" / "checkpoints" / "step_8.msgpack").read_bytes())
    assert {np.asarray(x).dtype for x in jax.tree.leaves(ckpt["params"])} == {np.dtype("float32")}


def test_processes_other_than_0_write_nothing(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=None, metric="loss", mode="min", write=False)
    checkpointer.consider({"a": np.zeros(2)}, 1, {"loss": 1.0})
    checkpointer.save({"a": np.zeros(2)}, 1)
    assert checkpointer.best["step"] == 1 and not list(tmp_path.iterdir())
    NullLogger().scalars(1, "train", {"loss": 1.0})  # accepts every logger call


@pytest.mark.slow
def test_eight_devices_match_one_device():
    """Same loss curves on 8 simulated CPU devices and on 1, both tasks; checkpoints move
    between device counts; an indivisible batch names both numbers."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, str(HERE / "eight_devices.py")], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    for name in ("linear_fit", "cnn_random_images"):
        r = out[name]
        assert (r["devices_1"], r["devices_8"]) == (1, 8)
        assert len(r["curve_8"]) == len(r["curve_1"]) == 4
        # The resumed runs really continued the checkpoint of step 4, on the other count:
        # exact facts, asserted apart from the tolerances (a resume that restarted from step 0
        # trains the same 8 steps from the same seed, so its state matches within them).
        for a, b in ((8, 1), (1, 8)):
            assert r[f"resumed_{a}_to_{b}_from"] == 4, (name, a, b, r)
            assert r[f"resumed_{a}_to_{b}_devices"] == b, (name, a, b, r)
            assert r[f"resumed_{a}_to_{b}_curve_len"] == 4, (name, a, b, r)
        # The loss curves and the final eval losses agree within CURVE_REL (above).
        assert r["curve_max_rel"] <= CURVE_REL, (name, r)
        assert r["eval_loss_8"] == pytest.approx(r["eval_loss_1"], rel=CURVE_REL, abs=0)
        # The final states (params and optimizer state), 8 devices, or 4 steps on one count
        # and 4 resumed on the other, against 1 device: within STATE_REL, per array.
        for key in ("state", "resumed_8_to_1", "resumed_1_to_8"):
            assert r[f"{key}_max_rel"] <= STATE_REL, (name, key, r)
    # The batch is really split: XLA all-reduces, and each device holds 8 of the 64 rows.
    assert out["compiled_step"] == {"all_reduce": True, "per_device_batch": True,
                                    "whole_batch": False}, out
    assert out["indivisible_error"].startswith(
        "task.batch_size=100 is not divisible by the 8 devices in use (device.num_devices=8)")


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """jax.distributed over 2 local CPU processes (one device each): the same result as one
    process; only process 0 writes."""
    common = [*TINY, "trainer.steps=8", "trainer.checkpoint_every=4", "device=cpu"]
    run_cli([*common, f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    port, shared = free_port(), tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XLA_FLAGS")}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "runner", *common, f"hydra.run.dir={shared}",
         "device.distributed=true", f"device.coordinator_address=127.0.0.1:{port}",
         "device.num_processes=2", f"device.process_id={i}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    two = json.loads((shared / "metrics.json").read_text())
    assert two["devices"]["processes"] == 2 and two["devices"]["num_devices"] == 2
    # As for 8 devices: measured 1.1e-7 (eval loss) and 1.7e-7 (states, per array) relative.
    assert two["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=CURVE_REL, abs=0)
    for a, b in zip(*(jax.tree.leaves(serialization.msgpack_restore(
            (d / "checkpoints" / "step_8.msgpack").read_bytes()))
            for d in (shared, tmp_path / "single"))):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape and np.linalg.norm(a - b) <= STATE_REL * np.linalg.norm(b)
    # Process 0 alone wrote the run's files: one event file, one manifest attempt.
    assert len(list((shared / "tb").glob("events.out.tfevents.*"))) == 1
    assert len(json.loads((shared / "manifest.json").read_text())["attempts"]) == 1
    assert [s for s, _ in list_checkpoints(shared / "checkpoints")] == [4, 8]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """SIGTERM reaches one process of two (as a preemption notice may): JAX's preemption
    service makes both stop after the same dispatch; process 0 saves the checkpoint."""
    port, shared = free_port(), tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "XLA_FLAGS")}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "runner", "trainer.steps=10000000", "trainer.log_every=10",
         "trainer.steps_per_dispatch=10", "trainer.eval_every=null",
         "trainer.checkpoint_every=null", "trainer.log_images=false",
         "trainer.progress_bar=false", "device=cpu", f"hydra.run.dir={shared}",
         "device.distributed=true", f"device.coordinator_address=127.0.0.1:{port}",
         "device.num_processes=2", f"device.process_id={i}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    log = shared / "runner.log"
    deadline = time.time() + 120
    while "step 100/" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errors
    stopped = [re.search(r"stopped by SIGTERM \(preemption notice\) at step (\d+)", e)
               for e in errors]
    assert all(stopped), errors
    assert stopped[0].group(1) == stopped[1].group(1)
    metrics = json.loads((shared / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["steps"] == int(stopped[0].group(1))
    assert [s for s, _ in list_checkpoints(shared / "checkpoints")] == [metrics["steps"]]
