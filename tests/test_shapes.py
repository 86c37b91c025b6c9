"""The model's output shape against the task's, checked before anything compiles: a mismatch is
one line naming ``model.out_features`` (exit 1, no training), for built-in tasks, ``task=arrays``
and a user's task declaring its own ``output_shape``."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, run_cli
from runner.config.errors import ConfigError
from runner.core.shapes import check_output, expected_shape
from runner.models.mlp import MLP
from runner.tasks.linear_fit import LinearFit


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """digits (10 classes) and diabetes with two regression targets per example, as .npz."""
    from sklearn.datasets import load_diabetes, load_digits

    root = tmp_path_factory.mktemp("data")
    digits = load_digits()
    x, y = load_diabetes(return_X_y=True)
    for name, (x, y) in {"digits": (digits.images.astype(np.float32), digits.target),
                         "two_targets": (x, np.stack([y, np.sqrt(y)], 1))}.items():
        cut = int(0.8 * len(x))
        np.savez(root / f"{name}.npz", x_train=x[:cut], y_train=y[:cut], x_eval=x[cut:],
                 y_eval=y[cut:])
    return root


def refused(args, cwd: Path, run_dir: Path, *expected: str) -> str:
    """Run the CLI; it must exit 1 with one error line naming each of ``expected``, having
    trained nothing (no checkpoint; step 0 in metrics.json, if there is one)."""
    proc = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=cwd, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    assert not list(run_dir.glob("checkpoints/*")), "trained before refusing"
    metrics = run_dir / "metrics.json"  # a failed run's record, where one is written
    assert not metrics.exists() or json.loads(metrics.read_text())["steps"] == 0
    return errors[0]


@pytest.mark.slow
def test_linear_fit_with_three_outputs_is_refused(tmp_path):
    line = refused([*TINY, "model.out_features=3"], tmp_path, tmp_path / "run",
                   "error: model.out_features=3: the model's output on the task's "
                   "example input is [1, 3]")
    assert line.endswith("task LinearFit expects [1, 1] (its output_dim=1); set "
                         "model.out_features=1 or leave it null"), line


@pytest.mark.slow
def test_arrays_with_fewer_outputs_than_classes_is_refused(tmp_path, data_dir):
    line = refused([*TINY, "task=arrays", f"task.path={data_dir / 'digits.npz'}",
                    "model.out_features=3"], tmp_path, tmp_path / "run",
                   "model.out_features=3", "[1, 3]", "expects [1, 10] (its output_dim=10)",
                   "set model.out_features=10")
    assert "lr" not in line  # not the NaN loss's advice


@pytest.mark.slow
def test_arrays_regression_narrower_than_its_targets_is_refused_and_null_trains(tmp_path,
                                                                               data_dir):
    args = [*TINY, "task=arrays", f"task.path={data_dir / 'two_targets.npz'}"]
    refused([*args, "model.out_features=1"], tmp_path, tmp_path / "bad",
            "model.out_features=1", "[1, 1]", "expects [1, 2] (its output_dim=2)")
    run_cli([*args, "hydra.run.dir=good"], cwd=tmp_path)  # out_features null: the task's 2
    assert json.loads((tmp_path / "good/metrics.json").read_text())["status"] == "completed"
    assert list((tmp_path / "good/checkpoints").glob("step_*.msgpack"))


@pytest.mark.slow
def test_resume_with_a_mismatched_out_features_is_refused(tmp_path):
    """Refused as the shape mismatch it is, before the start state is compiled (not as a
    checkpoint that no longer fits the state), the checkpoints untouched."""
    run_cli([*TINY, "hydra.run.dir=run"], cwd=tmp_path)
    before = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    proc = run_cli(["resume=run", "trainer.steps=8", "model.out_features=3"], cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "config.yaml with the overrides given: " \
        "model.out_features=3: the model's output on the task's example input is [1, 3]" \
        in line, line
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == before


SEQUENCE_TASK = '''
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Running:
    """A running mean of a length-4 sequence, one value per position: [batch, 4, 1] outputs."""

    batch_size: int = 8
    output_dim = 1  # per position; the whole output is output_shape
    output_shape = (4, 1)

    def make_data(self, rng):
        x = jax.random.normal(rng, (32, 4, 1))
        return {"x": x, "y": jnp.cumsum(x, 1) / jnp.arange(1, 5)[:, None]}

    def train_batch(self, data, rng):
        return {k: v[:self.batch_size] for k, v in data.items()}

    def eval_batches(self, data):
        return {k: v[None] for k, v in data.items()}

    def loss(self, outputs, batch):
        mse = jnp.mean((outputs - batch["y"]) ** 2)
        return mse, {"mse": mse}

    def example_input(self):
        return jnp.zeros((1, 4, 1))
'''


@pytest.mark.slow
def test_a_user_task_declaring_its_output_shape_is_checked_against_it(tmp_path):
    (tmp_path / "myseq").mkdir()
    (tmp_path / "myseq" / "__init__.py").write_text(textwrap.dedent(SEQUENCE_TASK))
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "running.yaml").write_text("_target_: myseq.Running\n")
    # The MLP flattens [1, 4, 1] to [1, 4]: its [1, 1] output fails the declared shape even
    # with out_features=output_dim; a per-position Dense passes it.
    args = ["--config-dir", "myconf", *TINY, "task=running", "trainer.log_images=false"]
    refused([*args, "model=mlp"], tmp_path, tmp_path / "bad",
            "model.out_features=1: the model's output on the task's example input is [1, 1]",
            "task Running expects [1, 4, 1] (its output_shape=[4, 1]); use a model whose "
            "output per example is [4, 1]")
    (tmp_path / "myconf" / "model").mkdir()
    (tmp_path / "myconf" / "model" / "dense.yaml").write_text(
        "_target_: flax.linen.Dense\nfeatures: 1\n")
    refused([*args, "model=dense", "model.features=2"], tmp_path, tmp_path / "wide",
            "model (Dense): the model's output on the task's example input is [1, 4, 2]",
            "expects [1, 4, 1]")
    run_cli([*args, "model=dense", "hydra.run.dir=good"], cwd=tmp_path)
    assert json.loads((tmp_path / "good/metrics.json").read_text())["status"] == "completed"


@dataclasses.dataclass(frozen=True)
class Declares:
    """A user's task that declares nothing but output_dim."""

    output_dim: int = 2

    def example_input(self):
        return jnp.zeros((1, 3))


class DeclaresMethod(Declares):
    def output_shape(self):  # a method does too
        return (2,)


class Squeezed(nn.Module):
    """No out_features field: a scalar per example."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x)[:, 0]


def test_a_task_declaring_nothing_is_checked_from_output_dim():
    assert expected_shape(Declares()) == (2,) == expected_shape(DeclaresMethod())
    check_output(Declares(), MLP(features=(4,), out_features=2))
    with pytest.raises(ConfigError, match=r"^model.out_features=3: .* \[1, 3\] .* task "
                                          r"Declares expects \[1, 2\] \(its output_dim=2\)"):
        check_output(Declares(), MLP(features=(4,), out_features=3))
    with pytest.raises(ConfigError, match=r"^model \(Squeezed\): the model's output on the task's "
                                          r"example input is \[1\] .* \(its output_shape=\[2\]"):
        check_output(DeclaresMethod(), Squeezed())
    check_output(LinearFit(), MLP(out_features=1))


def test_the_check_starts_no_backend():
    """It runs before ``configure_jax``, which sets XLA_FLAGS, the platform and distributed
    set-up: all read once, when JAX's backend starts."""
    code = ("import os, jax; from conftest import compose_config; "
            "from runner.run.build import build_parts; build_parts(compose_config()); "
            "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=3'; "
            "print(jax.device_count())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "3", proc.stderr[-2000:]
