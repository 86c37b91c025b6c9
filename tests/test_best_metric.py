"""One rule picks "best": ``trainer.best_metric``/``best_mode`` (null: the task's own; a
classifier's accuracy, max) choose best.msgpack, the ``done:`` line, early stopping, the sweep's
star and the value a sweep job returns to its sweeper."""

import csv
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_CNN, compose_config, run_cli
from runner.config.errors import ConfigError
from runner.run.build import build_parts

# A classifier whose eval accuracy rises while its eval loss rises too. The model is one number
# s (zero at the start); each training example is class 1 with logits [0, s], so SGD pushes s
# up. The eval set's class-1 examples (logits [t, s]) become right one by one as s passes their
# thresholds t, while its class-0 example (logits [0, 10 s]) grows ever more confidently wrong.
# With optimizer.lr=1 and no momentum, s after 2, 4, 6, 8 steps is 0.88, 1.41, 1.77, 2.05.
PROJECT = '''
import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Threshold:
    batch_size: int = 4
    output_dim = 1
    best_metric = "accuracy"
    best_mode = "max"

    def make_data(self, rng):
        return {"a": jnp.array([0.5, 1.2, 1.6, 2.0, 0.0]),
                "c": jnp.array([1.0, 1.0, 1.0, 1.0, 10.0]), "y": jnp.array([1, 1, 1, 1, 0])}

    def train_batch(self, data, rng):
        n = self.batch_size
        return {"x": jnp.ones((n, 1)), "a": jnp.zeros(n), "c": jnp.ones(n),
                "y": jnp.ones(n, jnp.int32)}

    def eval_batches(self, data):
        return {"x": jnp.ones((1, 5, 1)), **{k: v[None] for k, v in data.items()}}

    def loss(self, outputs, batch):
        logits = jnp.stack([batch["a"], batch["c"] * outputs[:, 0]], -1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])}

    def example_input(self):
        return jnp.ones((1, 1))


class Scale(nn.Module):
    out_features: Optional[int] = None

    @nn.compact
    def __call__(self, x):
        return x * self.param("s", nn.initializers.zeros, (1,))
'''
CONFIGS = {
    "task/threshold.yaml": "_target_: bestproj.Threshold\n",
    "model/scale.yaml": "_target_: bestproj.Scale\n",
    "hparams_search/grid.yaml": textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /hydra/sweeper: search
        hydra:
          sweeper:
            direction: maximize
            sampler:
              _target_: optuna.samplers.GridSampler
            n_trials: 2
            n_jobs: 2
            params:
              optimizer.lr: choice(0.3, 1.0)
        """),
}
THRESHOLD = ["task=threshold", "model=scale", "optimizer=sgd",
             "optimizer.momentum=null", "optimizer.lr=1.0", "trainer.steps=8",
             "trainer.log_every=2", "trainer.eval_every=2", "trainer.checkpoint_every=8",
             "trainer.log_images=false", "trainer.progress_bar=false"]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "bestproj.py").write_text(PROJECT)
    for name, text in CONFIGS.items():
        (tmp_path / "conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "conf" / name).write_text(text)
    return tmp_path


def logged(run_dir: Path, tag: str):
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def rule(*overrides):
    """(best_metric, best_mode) of ``python -m runner <overrides>``, once its task is built."""
    cfg = compose_config(overrides)
    build_parts(cfg)
    return cfg.trainer.best_metric, cfg.trainer.best_mode


def test_each_task_is_judged_by_its_own_metric_unless_told(tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    np.savez(tmp_path / "labels.npz", x_train=x, y_train=np.arange(16) % 2, x_eval=x,
             y_eval=np.arange(16) % 2)
    np.savez(tmp_path / "targets.npz", x_train=x, y_train=x[:, :1], x_eval=x,
             y_eval=x[:, :1])
    arrays = ["task=arrays", "task.batch_size=4"]
    assert rule() == ("loss", "min")  # linear_fit declares none: the loss
    assert rule(*TINY_CNN) == ("accuracy", "max")
    assert rule(*arrays, f"task.path={tmp_path / 'labels.npz'}") == ("accuracy", "max")
    assert rule(*arrays, f"task.path={tmp_path / 'targets.npz'}") == ("loss", "min")
    assert rule(*TINY_CNN, "trainer.best_metric=loss") == ("loss", "min")
    assert rule(*TINY_CNN, "trainer.best_metric=accuracy") == ("accuracy", "max")
    assert rule(*TINY_CNN, "trainer.best_mode=min") == ("accuracy", "min")
    assert rule("trainer.best_metric=mse", "trainer.best_mode=min") == ("mse", "min")
    with pytest.raises(ConfigError, match=r"^trainer.best_metric=mse: give trainer.best_mode"):
        rule("trainer.best_metric=mse")


def test_a_classifier_keeps_its_best_accuracy_where_its_loss_disagrees(project):
    """best.msgpack, the done line and early stopping (patience 1: the loss rises from the
    first eval on, the accuracy at every eval) follow the accuracy, by default."""
    proc = run_cli(["--config-dir", "conf", *THRESHOLD, "trainer.early_stop.patience=1",
                    "hydra.run.dir=run"], cwd=project)
    run_dir = project / "run"
    accuracy, loss = logged(run_dir, "eval/accuracy"), logged(run_dir, "eval/loss")
    best_accuracy = max(accuracy, key=lambda step: (accuracy[step], -step))
    assert sorted(accuracy) == [2, 4, 6, 8]  # not stopped early by the rising loss
    assert min(loss, key=loss.get) == 2 != best_accuracy == 8  # the premise: they disagree
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["metric"], best["mode"]) == (
        best_accuracy, "eval/accuracy", "max")
    assert best["value"] == pytest.approx(accuracy[best_accuracy])
    assert f"best: step {best_accuracy} eval/accuracy=" in proc.stdout.strip().splitlines()[-1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["stopped_early_at"] is None


@pytest.mark.parametrize("launcher", ["basic", "fused"])
def test_the_sweep_stars_and_returns_the_best_metric(project, launcher):
    """Two jobs: the larger lr has the higher final accuracy and the higher final loss. The
    star is on it, and Optuna (maximize) gets each job's final accuracy."""
    proc = run_cli(["-m", "--config-dir", "conf", f"hydra/launcher={launcher}",
                    "hparams_search=grid",
                    *[a for a in THRESHOLD if not a.startswith("optimizer.lr=")],
                    "hydra.sweep.dir=sweep"], cwd=project)
    with open(project / "sweep" / "summary.csv") as f:
        rows = {r["overrides"].split()[0]: r for r in csv.DictReader(f)}
    small, large = rows["optimizer.lr=0.3"], rows["optimizer.lr=1.0"]
    assert float(large["eval/accuracy"]) > float(small["eval/accuracy"])
    assert float(large["eval/loss"]) > float(small["eval/loss"])  # the premise
    assert (small["best"], large["best"]) == ("", "*")
    results = yaml.safe_load((project / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(float(large["eval/accuracy"]))
    assert "(* best final eval/accuracy (max))" in proc.stdout
