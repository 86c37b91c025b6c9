"""runner inside a researcher's own project: its own packages named models/, tasks/, conf/;
its own task and model classes and configs; one installed namespace; optional extras."""

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY, run_cli

TASK = '''
import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sine:
    """Regress sin(freq * x) on x in [-1, 1]: the user's own task."""

    num_points: int = 64
    freq: float = 3.0
    batch_size: int = 16

    def __post_init__(self):
        if self.num_points <= 0:
            raise ValueError(f"num_points must be positive, got {self.num_points}")

    @property
    def output_dim(self) -> int:
        return 1

    def make_data(self, rng):
        x = jax.random.uniform(rng, (self.num_points, 1), minval=-1, maxval=1)
        return {"x": x, "y": jnp.sin(self.freq * x)}

    def train_batch(self, data, rng):
        idx = jax.random.choice(rng, self.num_points, (self.batch_size,), replace=False)
        return {k: v[idx] for k, v in data.items()}

    def eval_batches(self, data):
        return {k: v[None] for k, v in data.items()}

    def loss(self, outputs, batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        mse = jnp.mean((outputs - batch["y"]) ** 2)
        return mse, {"mse": mse}

    def example_input(self):
        return jnp.zeros((1, 1))
'''

MODEL = '''
from typing import Optional

import flax.linen as nn


class TwoLayer(nn.Module):
    """The user's own model: Dense(hidden) -> tanh -> Dense(out_features)."""

    hidden: int = 32
    out_features: Optional[int] = None

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out_features)(nn.tanh(nn.Dense(self.hidden)(x)))
'''


@pytest.fixture
def project(tmp_path):
    """A research repo: its own package ``myproj`` (task, model) and config dir ``myconf``,
    plus top-level packages named like runner's folders (models/, tasks/, conf/)."""
    package = tmp_path / "myproj"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(TASK)
    (package / "models.py").write_text(MODEL)
    for group, name, text in (("task", "sine", "_target_: myproj.tasks.Sine\nnum_points: 48\n"),
                              ("model", "two_layer", "_target_: myproj.models.TwoLayer\n"
                                                     "hidden: 24\n")):
        (tmp_path / "myconf" / group).mkdir(parents=True)
        (tmp_path / "myconf" / group / f"{name}.yaml").write_text(text)
    for name in ("models", "tasks", "conf"):  # they shadow nothing of runner's
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user\\'s own')\n")
    (tmp_path / "tasks" / "base.py").write_text("")
    (tmp_path / "conf" / "config.yaml").write_text("defaults: [nope]\n")
    return tmp_path


def done(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed", metrics
    return metrics


@pytest.mark.slow
def test_runs_from_a_directory_with_its_own_models_tasks_and_conf(project):
    proc = run_cli([*TINY, "hydra.run.dir=out/a", "device=cpu"], cwd=project)
    assert done(project / "out/a")["steps"] == 4
    last = proc.stdout.strip().splitlines()[-1]  # where it went, and how to look at it
    assert last.startswith("done: out/a") and "eval loss=" in last
    assert last.endswith("tensorboard --logdir out/a")


@pytest.mark.slow
def test_a_user_task_and_model_from_their_own_package(project, monkeypatch):
    run_cli(["--config-dir", "myconf", *TINY, "task=sine", "model=two_layer",
             "task.freq=2", "hydra.run.dir=out/own"], cwd=project)
    metrics = done(project / "out/own")
    assert set(metrics["eval"]) == {"loss", "mse"}
    summary = (project / "out/own/model_summary.txt").read_text()
    assert "TwoLayer" in summary and "24" in summary  # hidden: 24 from the user's YAML
    stored = (project / "out/own/.hydra/config.yaml").read_text()
    assert "num_points: 48" in stored and "freq: 2" in stored
    # A task whose YAML names no model: runner's default model, or any model= by name.
    searchpath = f"hydra.searchpath=[file://{project / 'myconf'}]"
    run_cli([*TINY, searchpath, "task=sine", "hydra.run.dir=out/mlp"], cwd=project)
    assert "MLP" in (project / "out/mlp/model_summary.txt").read_text()
    # Resumed and evaluated from its run dir alone (no config dir given), once its module is
    # trusted: a stored config's targets are called only in runner's, optax's, flax's, jax's
    # modules and those named in RUNNER_TRUST.
    refused = run_cli(["resume=out/own", "trainer.steps=8"], cwd=project, check=False)
    assert refused.returncode == 1 and "RUNNER_TRUST=myproj" in refused.stderr
    monkeypatch.setenv("RUNNER_TRUST", "myproj")
    run_cli(["resume=out/own", "trainer.steps=8"], cwd=project)
    assert done(project / "out/own")["steps"] == 8
    proc = subprocess.run([sys.executable, "-m", "runner.eval", "out/own"], cwd=project,
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("task.num_points=-1", "error: task (myproj.tasks.Sine): num_points must be positive, "
                           "got -1"),
    ("task.num_points=abc", "error: task.num_points: Value 'abc' of type 'str' could not be "
                            "converted to Integer"),
    ("+task.nmu_points=3", "error: task.nmu_points: unknown key; myproj.tasks.Sine takes: "
                           "batch_size, freq, num_points"),
    ("model=cnn", "error: model=cnn needs images [batch, height, width, channels]; the task "
                  "gives inputs of shape (1, 1)"),
])
def test_a_bad_value_for_a_user_task_is_one_line(project, override, message):
    proc = run_cli(["--config-dir", "myconf", *TINY, "task=sine", override,
                    "hydra.run.dir=out/bad"], cwd=project, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == message


@pytest.mark.slow
def test_the_wheel_installs_runner_alone_and_runs_from_any_directory(tmp_path):
    """`pip install .` adds one top-level module, ``runner``, with its configs, and (as Hydra's
    own launchers ship) its launcher plugin in Hydra's ``hydra_plugins`` namespace."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path / "dist"), str(REPO)], check=True)
    (wheel,) = (tmp_path / "dist").glob("jax_yaml_runner-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(
        ".dist-info")} == {"runner", "hydra_plugins"}
    assert {name.split("/")[1] for name in names if name.startswith("hydra_plugins/")} == {
        "runner_fused_launcher", "runner_slurm_launcher", "runner_sweeper", "runner_search"}
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared
    assert {"runner/conf/config.yaml", "runner/conf/task/linear_fit.yaml",
            "runner/__main__.py", "runner/models/cnn.py", "runner/tasks/linear_fit.py"} <= set(
        names)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    where = subprocess.run([sys.executable, "-c", "import runner; print(runner.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True, env=env)
    assert where.stdout.startswith(str(site))
    proc = subprocess.run([sys.executable, "-m", "runner", *TINY, "hydra.run.dir=run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert done(tmp_path / "run")["steps"] == 4
    proc = subprocess.run([sys.executable, "-m", "runner", "-m", "hydra/launcher=fused",
                           "optimizer.lr=1e-3,1e-2", *TINY, "hydra.sweep.dir=sweep"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "into one group (2 members" in proc.stdout + proc.stderr
    assert [done(tmp_path / "sweep" / job)["steps"] for job in ("0", "1")] == [4, 4]


def test_pip_install_brings_the_tensorboard_every_run_names():
    """Every run ends with ``view: tensorboard --logdir <run dir>``: a base requirement of the
    installed distribution (no extra), its console script beside the interpreter."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    base = [Requirement(r) for r in requires("jax-yaml-runner") if "extra ==" not in r]
    assert "tensorboard" in {r.name for r in base}
    proc = subprocess.run([str(Path(sys.executable).parent / "tensorboard"), "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()[0].isdigit(), proc.stdout


def test_hparams_search_without_the_search_extra_names_the_install_command(tmp_path):
    """Without Optuna (the search extra's; not in a base install, which must not change a
    user's own optuna): one line, exit 1. Optuna is made unimportable here, as if it were not
    installed; runner's sweeper plugin still registers (its config imports no Optuna)."""
    code = textwrap.dedent("""
        import runpy, sys
        sys.modules["optuna"] = None
        sys.argv = ["runner", "-m", "hparams_search=linear_fit_optuna", "hydra.sweep.dir=s"]
        runpy.run_module("runner", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: hydra/sweeper=search needs Optuna: pip install "
                                   "'jax-yaml-runner[search]'")
    assert [p.name for p in (tmp_path / "s").iterdir()] == [".lock"]  # the sweep dir's, only
