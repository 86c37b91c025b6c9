"""Config keys through the CLI: every parameter of a task's or model's class is a key, a
user's class's too (set without ``+``, listed with its default by ``--cfg job`` and in an
unknown key's error, typed in the job, swept with ``-m``); an unknown key, a ``_target_`` that
does not import and a model that does not fit its task are one line naming what was typed."""

import json

import pytest
import yaml

from conftest import TINY, run_cli

MODEL = '''
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp


class Wide(nn.Module):
    """A user's model whose YAML sets only ``hidden``; the defaults of ``activation`` (a
    function) and ``dtype`` (a dtype) are no config values."""

    hidden: int
    depth: int = 2
    use_layernorm: bool = False
    out_features: Optional[int] = None
    activation: Callable = nn.relu
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for _ in range(self.depth):
            x = self.activation(nn.Dense(self.hidden, dtype=self.dtype)(x))
            x = nn.LayerNorm()(x) if self.use_layernorm else x
        return nn.Dense(self.out_features)(x)
'''

CONFIGS = {
    "model/wide.yaml": "_target_: myproj.models.Wide\nhidden: 16\n",
    "model/broken.yaml": "_target_: myproj.nowhere.Wide\n",  # no such module
    "task/small_fit.yaml": "_target_: runner.tasks.linear_fit.LinearFit\nnum_train: 32\n",
}
WIDE = {"_target_": "myproj.models.Wide", "hidden": 16, "depth": 2, "use_layernorm": False,
        "out_features": None}


@pytest.fixture
def project(tmp_path):
    """A user's package ``myproj`` (the model) and config dir ``myconf``."""
    (tmp_path / "myproj").mkdir()
    (tmp_path / "myproj" / "__init__.py").write_text("")
    (tmp_path / "myproj" / "models.py").write_text(MODEL)
    for path, text in CONFIGS.items():
        (tmp_path / "myconf" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "myconf" / path).write_text(text)
    return tmp_path


def one_line_error(args, cwd) -> str:
    """The CLI's stderr for ``args``, which must fail with exactly one line and no log block."""
    proc = run_cli([*args, f"hydra.run.dir={cwd}/out/bad"], cwd=cwd, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "[hydra.utils]" not in proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


@pytest.mark.parametrize("config_dir", ["--config-dir", "hydra.searchpath"])
def test_cfg_job_lists_every_parameter_of_a_user_option_with_its_default(project, config_dir):
    where = (["--config-dir", "myconf"] if config_dir == "--config-dir"
             else [f"hydra.searchpath=[file://{project / 'myconf'}]"])
    proc = run_cli([*where, "model=wide", "task=small_fit", "--cfg", "job"], cwd=project)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"] == WIDE  # activation: its default (a function) is no config value
    assert cfg["task"]["num_train"] == 32 and cfg["task"]["noise_std"] == 0.2


def test_a_user_option_takes_its_class_parameters_without_plus(project):
    run_cli(["--config-dir", "myconf", *TINY, "model=wide", "model.use_layernorm=true",
             "model.depth=1", "task=small_fit", "task.noise_std=0.1", "hydra.run.dir=out/run"],
            cwd=project)
    assert json.loads((project / "out/run/metrics.json").read_text())["status"] == "completed"
    stored = yaml.safe_load((project / "out/run/.hydra/config.yaml").read_text())
    assert stored["model"] == {**WIDE, "use_layernorm": True, "depth": 1}
    assert stored["task"]["noise_std"] == 0.1
    assert "LayerNorm" in (project / "out/run/model_summary.txt").read_text()


def test_a_sweep_over_a_user_class_parameter(project):
    run_cli(["-m", "--config-dir", "myconf", *TINY, "model=wide", "model.depth=1,3",
             "hydra.sweep.dir=sweep"], cwd=project)
    for job, depth in (("0", 1), ("1", 3)):
        assert json.loads((project / "sweep" / job / "metrics.json").read_text())[
            "status"] == "completed"
        stored = yaml.safe_load((project / "sweep" / job / ".hydra/config.yaml").read_text())
        assert stored["model"]["depth"] == depth


STEPS_KEYS = ("steps, log_every, eval_every, checkpoint_every, steps_per_dispatch, scan_unroll, "
              "progress_bar, log_images, log_histograms, keep_checkpoints, best_metric, "
              "best_mode, early_stop, profile_steps")


LEARNING_RATE = ("optimizer.learning_rate: runner sets optax.adam's learning_rate from "
                 "optimizer.lr; set optimizer.lr=... instead")


@pytest.mark.parametrize("args, message", [
    (["model=wide", "model.use_layernrom=true"],
     "model.use_layernrom: unknown key; valid keys: hidden, depth, use_layernorm, out_features"),
    (["model=wide", "model.depth=abc"],  # typed in the job, as its annotation says
     "model.depth: Value 'abc' of type 'str' could not be converted to Integer"),
    (["model=wide", "model.activation=gelu"],
     "model.activation: a parameter of myproj.models.Wide that the config leaves out (its "
     "default is no config value); set it with +model.activation=..."),
    (["+trainer.stesp=100"], f"trainer.stesp: unknown key; valid keys: {STEPS_KEYS}"),
    (["trainer.stesp=100"], f"trainer.stesp: unknown key; valid keys: {STEPS_KEYS}"),
    (["model=wide", "+model.depth=3"],  # a key already: Hydra's whole message, one line
     "Could not append to config. An item is already at 'model.depth'. Either remove + "
     "prefix: 'model.depth=3' Or add a second + to add or override 'model.depth': "
     "'++model.depth=3'"),
    (["~model"], "model: no option chosen; pick one with model=<name>"),
    # a parameter of the factory that runner sets itself: `+` cannot add it either
    (["optimizer.learning_rate=1e-3"], LEARNING_RATE),
    (["+optimizer.learning_rate=1e-3"], LEARNING_RATE),
    (["optimizer=sgd", "+optimizer.learning_rate=1e-3"], LEARNING_RATE.replace("adam", "sgd")),
])
def test_a_key_error_is_one_line_suggesting_plus_only_where_it_works(project, args, message):
    assert one_line_error(["--config-dir", "myconf", *args], project) == f"error: {message}"


def test_the_plus_advice_works_where_it_is_given(project):
    """A parameter whose default is no config value: the error says `+`, and `+` sets it."""
    assert one_line_error(["--config-dir", "myconf", "model=wide", "model.dtype=bfloat16"],
                          project) == (
        "error: model.dtype: a parameter of myproj.models.Wide that the config leaves out (its "
        "default is no config value); set it with +model.dtype=...")
    run_cli(["--config-dir", "myconf", *TINY, "model=wide", "task=small_fit",
             "+model.dtype=bfloat16", "hydra.run.dir=out/run"], cwd=project)
    assert json.loads((project / "out/run/metrics.json").read_text())["status"] == "completed"
    stored = yaml.safe_load((project / "out/run/.hydra/config.yaml").read_text())
    assert stored["model"]["dtype"] == "bfloat16"
    assert "bfloat16" in (project / "out/run/model_summary.txt").read_text()


@pytest.mark.parametrize("args, message", [
    (["model._target_=nope.Nope"], "model._target_=nope.Nope: cannot import it (No module "
                                   "named 'nope')"),
    (["--config-dir", "myconf", "model=broken"],
     "model._target_=myproj.nowhere.Wide: cannot import it (No module named 'myproj.nowhere')"),
    (["--config-dir", "myconf", "model=wide", "model._target_=myproj.models.Nope"],
     "model._target_=myproj.models.Nope: cannot import it (module 'myproj.models' has no "
     "attribute 'Nope')"),
])
def test_a_target_that_does_not_import_is_one_line(project, args, message):
    assert one_line_error(args, project) == f"error: {message}"


def test_a_model_that_does_not_fit_the_task_names_the_option_typed(project):
    assert one_line_error(["model=cnn_small"], project) == (
        "error: model=cnn_small needs images [batch, height, width, channels]; the task gives "
        "inputs of shape (1, 1)")
