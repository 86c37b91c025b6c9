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


def test_a_run_starts_with_its_dir_options_and_overrides_in_a_few_lines(tmp_path):
    """The console's start: the run dir, the group options and the overrides, and where the
    whole config is; not the config itself (``.hydra/config.yaml``, ``--cfg job``)."""
    overrides = ["trainer.progress_bar=false", "optimizer.lr=0.003", *TINY[:1]]
    proc = run_cli([*overrides, "hydra.run.dir=run"], cwd=tmp_path)
    start = proc.stdout.split("[", 1)[0].strip().splitlines()  # before the first log line
    assert len(start) <= 4, proc.stdout[:3000]
    assert start[0].startswith("run dir: run ") and "model=linear" in start[0]
    assert " ".join(overrides) in start[1]
    assert "run/.hydra/config.yaml" in start[2] and "--cfg job" in start[2]
    assert (tmp_path / "run/.hydra/config.yaml").is_file()


def test_help_lists_the_groups_a_user_picks_from_and_their_own(tmp_path):
    """``--help``: runner's groups and a user's (``--config-dir``: an option of a group of
    runner's, a group of their own), never the internal schema or signature groups."""
    groups = lambda proc: dict(  # noqa: E731
        line.split(": ", 1) for line in proc.stdout.split("== Configuration groups ==")[1]
        .split("== Config ==")[0].splitlines() if ": " in line)
    shipped = groups(run_cli(["--help"], cwd=tmp_path))
    assert set(shipped) == {"task", "model", "optimizer", "optimizer/schedule", "device",
                            "logger", "callbacks", "experiment", "hparams_search", "debug"}
    assert shipped["model"] == "cnn, cnn_small, linear, mlp"
    (tmp_path / "myconf/model").mkdir(parents=True)
    (tmp_path / "myconf/augment").mkdir()
    (tmp_path / "myconf/model/dense.yaml").write_text("_target_: flax.linen.Dense\nfeatures: 1\n")
    (tmp_path / "myconf/augment/flip.yaml").write_text("horizontal: true\n")
    own = groups(run_cli(["--config-dir", "myconf", "--help"], cwd=tmp_path))
    assert own["model"] == "cnn, cnn_small, dense, linear, mlp" and own["augment"] == "flip"
    assert set(own) == set(shipped) | {"augment"}  # no schema/..., no signature


def own_config_dir(root: Path) -> Path:
    """A user's config dir with one model of their own (``model=dense``)."""
    (root / "myconf/model").mkdir(parents=True, exist_ok=True)
    (root / "myconf/model/dense.yaml").write_text("_target_: flax.linen.Dense\nfeatures: 1\n")
    return root / "myconf"


def test_hydra_flags_anywhere_on_the_command_line_mean_the_same(tmp_path):
    """``--config-dir`` (``-cd``, ``=``, abbreviated), ``--cfg``, ``-cn``, ``-p``,
    ``--resolve`` before, between or after the overrides: the same config, as with the flags
    first; an override whose value looks like a flag keeps it."""
    own_config_dir(tmp_path)
    first = run_cli(["--config-dir", "myconf", "--cfg", "job", "--resolve", "-p", "model",
                     "-cn", "config", "model=dense", "trainer.best_metric=--cfg"], cwd=tmp_path)
    assert "_target_: flax.linen.Dense" in first.stdout and "use_bias" in first.stdout
    for args in (["model=dense", "--config-dir", "myconf", "trainer.best_metric=--cfg",
                  "--cfg", "job", "--resolve", "-p", "model", "-cn", "config"],
                 ["-c", "job", "model=dense", "-cd", "myconf", "-p", "model",
                  "trainer.best_metric=--cfg", "--resolve", "--config-name=config"],
                 ["model=dense", "--config-d", "myconf", "--package=model", "--resolve",
                  "trainer.best_metric=--cfg", "--cfg=job", "-cn", "config"]):
        assert run_cli(args, cwd=tmp_path).stdout == first.stdout, args
    best = run_cli(["trainer.best_metric=--cfg", "-c", "job", "-p", "trainer"], cwd=tmp_path)
    assert "best_metric: --cfg" in best.stdout
    # --info before an override: its own word, or none (the override is not its value)
    info = run_cli(["--info", "model=dense", "-cd", "myconf"], cwd=tmp_path).stdout
    assert "file://" + str(tmp_path / "myconf") in info and "Defaults List" in info
    shown = run_cli(["--help", "model=dense", "-cd", "myconf", "seed=1"], cwd=tmp_path).stdout
    assert "model: cnn, cnn_small, dense, linear, mlp" in shown


def test_a_sweep_with_config_dir_in_the_middle_runs_as_with_it_first(tmp_path):
    """The issue's command: ``-m <override> --config-dir myconf <overrides>`` (and a single run
    with the flag last) runs the same jobs as with ``--config-dir`` first."""
    own_config_dir(tmp_path)
    losses = lambda root: [json.loads((root / f"{job}/metrics.json").read_text())  # noqa: E731
                           ["eval"]["loss"] for job in (0, 1)]
    run_cli(["-m", "model=dense", "seed=0,1", "--config-dir", "myconf", *TINY,
             "hydra.sweep.dir=middle"], cwd=tmp_path)
    run_cli(["--config-dir", "myconf", "-m", "model=dense", "seed=0,1", *TINY,
             "hydra.sweep.dir=first"], cwd=tmp_path)
    run_cli(["model=dense", *TINY, "hydra.run.dir=last", "--config-dir", "myconf"],
            cwd=tmp_path)
    assert losses(tmp_path / "middle") == losses(tmp_path / "first")
    assert json.loads((tmp_path / "last/metrics.json").read_text())["eval"]["loss"] == \
        losses(tmp_path / "first")[0]


@pytest.mark.parametrize("args, ordered", [
    (["-m", "a=1", "--config-dir", "d", "b=2"], ["a=1", "b=2", "--multirun", "--config-dir", "d"]),
    (["a=1", "-cd=d", "--info", "b=2"], ["a=1", "b=2", "--config-dir=d", "--info"]),
    (["--info", "config", "a=1", "-c", "job", "-p", "x"],
     ["a=1", "--info", "config", "--cfg", "job", "--package", "x"]),
    (["--config-n", "c", "--multi", "~a", "-x"], ["~a", "--config-name", "c", "--multirun", "-x"]),
    (["a=1", "--", "b=2"], ["a=1", "--", "b=2"]),  # argparse's end of flags: nothing moves
])
def test_overrides_go_first_and_flags_keep_their_values(args, ordered):
    from runner.cli import overrides_first

    assert overrides_first(args) == ordered
