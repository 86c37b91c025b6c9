"""Config: every option of every group composes and instantiates; typed validation."""

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import TINY_CNN, compose_config, group_options
from models.cnn import CNN
from models.mlp import MLP
from runner.errors import ConfigError, describe_error
from runner.schema import validate
from tasks.cnn_random_images import CNNRandomImages
from tasks.linear_fit import LinearFit


def test_default_config_is_linear_fit_mlp_adam_auto():
    cfg = compose_config()
    assert isinstance(instantiate(cfg.task), LinearFit)
    assert isinstance(instantiate(cfg.model), MLP)
    assert cfg.optimizer._target_ == "optax.adam" and cfg.optimizer.lr == 1e-3
    assert cfg.device.platform == "auto" and cfg.seed == 0


def test_each_task_brings_its_model_and_model_still_overrides():
    cfg = compose_config(["task=cnn_random_images"])
    assert isinstance(instantiate(cfg.model), CNN)
    assert instantiate(cfg.model).num_classes == 10
    cfg = compose_config(["task=cnn_random_images", "model=mlp"])
    assert isinstance(instantiate(cfg.model), MLP) and cfg.model.out_features == 10


def test_cnn_task_defaults_and_trainer_settings():
    cfg = compose_config(["task=cnn_random_images", "trainer.steps=60"])
    task = instantiate(cfg.task)
    assert isinstance(task, CNNRandomImages)
    assert (task.batch_size, task.image_size, task.channels, task.num_classes) == (32, 84, 3, 10)


@pytest.mark.parametrize("group", ["task", "model", "optimizer", "device", "model/init"])
def test_every_option_of_every_group_composes_and_instantiates(group):
    for option in group_options(group):
        if group == "model/init":
            cfg = compose_config([f"model/init@model.kernel_init={option}"])
            assert callable(instantiate(cfg.model.kernel_init))
            assert callable(instantiate(cfg.model).kernel_init)
            continue
        extra = TINY_CNN if (group, option) == ("model", "cnn") else []
        cfg = compose_config([*extra, f"{group}={option}"])
        validate(cfg)
        node = cfg[group]
        if "_target_" in node and group != "optimizer":
            assert instantiate(node) is not None
        else:
            assert OmegaConf.to_container(node, resolve=True)


def test_initializer_options_take_their_arguments():
    cfg = compose_config(["model/init@model.kernel_init=orthogonal",
                          "model.kernel_init.scale=2.0",
                          "model/init@model.bias_init=constant", "model.bias_init.value=0.5"])
    import jax
    import jax.numpy as jnp

    params = instantiate(cfg.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]
    assert float(params["Dense_0"]["bias"][0]) == 0.5
    kernel = params["Dense_1"]["kernel"]  # 128 x 1, orthogonal columns of norm `scale`
    assert float(jnp.linalg.norm(kernel)) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr=-1.0: must be > 0"),
    ("trainer.steps=0", "trainer.steps=0: must be > 0"),
    ("model.features=[0]", "model.features=[0]: must be > 0"),
    ("optimizer.b1=2", "optimizer.b1=2.0: must be <= 1"),
    ("task.noise_std=-0.1", "task.noise_std=-0.1: must be >= 0"),
    ("seed=2147483648", "seed=2147483648: must be <= 2147483647"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(compose_config([override]))


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr=abc", "optimizer.lr: Value 'abc'"),
    ("optimizer.lrr=1", "optimizer.lrr: unknown key; valid keys: lr, schedule"),
    ("task=nope", "task=nope: no such option; available: cnn_random_images, linear_fit"),
    ("optimizer.schedule=step", "expected one of [constant, cosine, warmup_cosine]"),
    ("trainer.stepz=3", "trainer.stepz: unknown key; valid keys: steps"),
])
def test_composition_errors_become_one_line(override, fragment):
    with pytest.raises(Exception) as info:
        compose_config([override])
    message = describe_error(info.value)
    assert fragment in message and "\n" not in message


def test_describe_error_leaves_bugs_alone():
    assert describe_error(ZeroDivisionError("x")) is None
