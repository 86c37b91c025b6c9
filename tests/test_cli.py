"""End to end through the real CLI (``python -m runner`` in a subprocess), as a user runs it."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import serialization
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY, TINY_CNN, run_cli

SCALARS = {"train/loss", "train/lr", "train/grad_norm", "eval/loss", "perf/steps_per_sec"}


def read_tb(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return acc


def only_run_dir(root: Path) -> Path:
    (metrics,) = root.glob("outputs/*/*/metrics.json")
    return metrics.parent


def test_default_run_from_another_directory_fits_the_line(tmp_path):
    """README's main job: `python -m runner`, default config, run outside the repo."""
    run_cli(["trainer.progress_bar=false"], cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)  # Hydra's run dir under the *current* directory
    assert {p.name for p in run_dir.iterdir()} >= {
        ".hydra", "runner.log", "tb", "checkpoints", "metrics.json", "model_summary.txt"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 200
    assert metrics["eval"]["mse"] <= 0.06 and metrics["train_step_compiles"] == 1
    assert metrics["wall_time_s"] > 0
    # linear_fit's XLA flag reached XLA_FLAGS before JAX started (recorded with the devices)
    assert ("--xla_cpu_enable_concurrency_optimized_scheduler=false"
            in metrics["devices"]["xla_flags"].split())

    acc = read_tb(run_dir)
    assert SCALARS | {"eval/mse", "train/mse"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/loss")] == [100, 200]
    assert acc.Scalars("eval/loss")[-1].value == pytest.approx(metrics["eval"]["loss"])
    assert "lr: 0.001" in str(acc.Tensors("config/text_summary")[0].tensor_proto)

    # The checkpoint is to_bytes(TrainState): restore it into a plain template and read the
    # learned line off the parameters (the model is linear: slope = W1 W2, intercept = b1 W2 + b2).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.json", "best.msgpack", "step_100.msgpack", "step_200.msgpack"]
    raw = serialization.msgpack_restore((run_dir / "checkpoints/step_200.msgpack").read_bytes())
    assert int(raw["step"]) == 200 and set(raw) >= {"params", "opt_state", "step"}
    p = raw["params"]
    slope = float((p["Dense_0"]["kernel"] @ p["Dense_1"]["kernel"]).squeeze())
    intercept = float((p["Dense_0"]["bias"] @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
                      .squeeze())
    assert abs(slope - 2) <= 0.1 and abs(intercept - 1) <= 0.1
    assert "Total Parameters: 385" in (run_dir / "model_summary.txt").read_text()


def test_cnn_run_restores_with_from_bytes(tmp_path):
    from conftest import start

    overrides = [*TINY, *TINY_CNN, "device=cpu"]
    run_cli([*overrides, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    run_dir = tmp_path / "run"
    acc = read_tb(run_dir)
    assert SCALARS | {"eval/accuracy", "train/accuracy"} <= set(acc.Tags()["scalars"])
    template = start(overrides, seed=9)[1].state
    state = serialization.from_bytes(template, (run_dir / "checkpoints/step_4.msgpack")
                                     .read_bytes())
    assert int(state.step) == 4
    assert not np.allclose(state.params["Conv_0"]["kernel"], template.params["Conv_0"]["kernel"])


def test_multirun_2x2_gives_four_complete_job_dirs(tmp_path):
    run_cli(["-m", "task=linear_fit,cnn_random_images", "optimizer.lr=1e-3,1e-2",
             "trainer.steps=2", "trainer.log_every=1", "trainer.eval_every=2",
             "trainer.checkpoint_every=2", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(jobs) == 4
    seen = set()
    for path in jobs:
        overrides = (path.parent / ".hydra/overrides.yaml").read_text()
        seen.add(overrides)
        assert json.loads(path.read_text())["status"] == "completed"
        assert (path.parent / "checkpoints/step_2.msgpack").exists()
    assert len(seen) == 4


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=abc", "optimizer.lr"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0: must be > 0"),
    ("trainer.steps=0", "trainer.steps=0: must be > 0"),
    ("task=nope", "task=nope: no such option; available: arrays, cnn_random_images, linear_fit"),
    ("model.features=[0]", "model.features=[0]"),
    ("optimizer.lrr=1", "optimizer.lrr: unknown key; valid keys: lr"),
    ("device=gpu", "device=gpu: JAX has no usable GPU here"),
    ("optimizer.lr=1e6", "training diverged"),
    ("+device.xla_flags.cpu_fast=1", "device.xla_flags.cpu_fast: not an XLA flag name"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, override, key):
    proc = run_cli([override, f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


@pytest.mark.slow
def test_default_cnn_run_learns(tmp_path):
    """`python -m runner task=cnn_random_images` at full size: eval accuracy >= 0.9."""
    run_cli(["task=cnn_random_images", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["eval"]["accuracy"] >= 0.9
    assert "Total Parameters: 3,689,034" in (tmp_path / "run/model_summary.txt").read_text()
