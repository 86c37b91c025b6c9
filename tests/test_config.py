"""Config: every option composes and builds; keys and defaults come from the classes."""

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import optax
import pytest
from omegaconf import OmegaConf

from conftest import TINY_CNN, compose_config, group_options
from runner.config.errors import ConfigError, describe_error
from runner.config.schema import typed
from runner.config.targets import build, check, signature_schema
from runner.models.cnn import CNN
from runner.models.mlp import MLP
from runner.run.build import build_parts
from runner.tasks.cnn_random_images import CNNRandomImages
from runner.tasks.linear_fit import LinearFit


def test_default_config_is_linear_fit_mlp_adam_auto():
    cfg = compose_config()
    task, model, optimizer = build_parts(cfg)
    assert isinstance(task, LinearFit) and isinstance(model, MLP)
    assert model.out_features == 1  # the task's output size, filled in
    assert cfg.optimizer._target_ == "optax.adam" and cfg.optimizer.lr == 1e-3
    assert cfg.device.platform == "auto" and cfg.seed == 0


def test_each_task_brings_its_model_and_model_still_overrides():
    task, model, _ = build_parts(compose_config(["task=cnn_random_images"]))
    assert isinstance(model, CNN) and model.out_features == task.output_dim == 10
    task, model, _ = build_parts(compose_config(["task=cnn_random_images", "model=mlp"]))
    assert isinstance(model, MLP) and model.out_features == 10
    assert build_parts(compose_config(["model=cnn", *TINY_CNN[1:], "task=cnn_random_images",
                                       "task.num_classes=3", "model.out_features=3"])
                       ).model.out_features == 3


def test_cnn_task_defaults_and_trainer_settings():
    cfg = compose_config(["task=cnn_random_images", "trainer.steps=60"])
    task = build_parts(cfg).task
    assert isinstance(task, CNNRandomImages)
    assert (task.batch_size, task.image_size, task.channels, task.num_classes) == (32, 84, 3, 10)


@pytest.mark.parametrize("group", ["task", "model", "optimizer", "device"])
def test_every_option_of_every_group_composes_and_builds(group):
    for option in group_options(group):
        if option == "arrays":  # needs a file: tests/test_arrays.py
            continue
        extra = TINY_CNN if option in ("cnn", "cnn_small", "cnn_random_images") else []
        task, model, optimizer = build_parts(compose_config([*extra, f"{group}={option}"]))
        assert hash(task) == hash(build_parts(compose_config([*extra, f"{group}={option}"]))
                                  .task)
        assert model == build_parts(compose_config([*extra, f"{group}={option}"])).model


@pytest.mark.parametrize("target, defaults", [
    (LinearFit, {f.name: f.default for f in dataclasses.fields(LinearFit)}),
    (optax.adam, {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "nesterov": False}),
])
def test_composed_defaults_are_the_code_defaults(target, defaults):
    """A default lives once, in the class or factory: the composed config shows it."""
    group = "task" if target is LinearFit else "optimizer"
    composed = OmegaConf.to_container(compose_config()[group])
    for key, value in defaults.items():
        assert composed[key] == value, key
    mlp = OmegaConf.to_container(compose_config().model)
    assert mlp["features"] == list(MLP.features) and mlp["kernel_init"]["name"] == "lecun_normal"


def test_initializers_take_their_arguments():
    cfg = compose_config(["model.kernel_init.name=orthogonal", "model.kernel_init.scale=2.0",
                          "model.bias_init.name=constant", "model.bias_init.value=0.5"])
    model = build_parts(cfg).model
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))["params"]
    assert float(params["Dense_0"]["bias"][0]) == 0.5
    kernel = params["Dense_1"]["kernel"]  # 128 x 1, orthogonal columns of norm `scale`
    assert float(jnp.linalg.norm(kernel)) == pytest.approx(2.0, rel=1e-5)
    with pytest.raises(ConfigError, match="initializer zeros_init takes no scale"):
        build_parts(compose_config(["model.kernel_init.name=zeros_init",
                                    "model.kernel_init.scale=2"]))


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-1", "optimizer.lr=-1.0: must be > 0"),
    ("trainer.steps=0", "trainer.steps=0: must be > 0"),
    ("model.features=[0]", "model.features=[0]: must be > 0"),
    ("optimizer.b1=2", "optimizer.b1=2.0: must be <= 1"),
    ("task.noise_std=-0.1", "task.noise_std=-0.1: must be >= 0"),
    ("seed=2147483648", "seed=2147483648: must be <= 2147483647"),
    ("model.kernel_init.name=nope", "initializer name=nope: unknown"),
])
def test_out_of_range_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_parts(compose_config([override]))


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lrr=1", "optimizer.lrr: unknown key; valid keys: lr, schedule"),
    ("task=nope", "task=nope: no such option; available: arrays, cnn_random_images, "
                  "linear_fit"),
    ("trainer.stepz=3", "trainer.stepz: unknown key; valid keys: steps"),
])
def test_composition_errors_become_one_line(override, fragment):
    with pytest.raises(Exception) as info:
        compose_config([override])
    message = describe_error(info.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize("override, fragment", [
    ("optimizer.lr=abc", "optimizer.lr: Value 'abc'"),
    ("optimizer.b1=abc", "optimizer.b1: Value 'abc'"),
    ("optimizer.schedule=step", "optimizer.schedule=step: not a schedule; use one of constant, "
                                "cosine, warmup_cosine"),
    ("task.num_train=1.5", "task.num_train: Value '1.5'"),
    ("trainer.steps=abc", "trainer.steps: Value 'abc'"),
    ("device.platform=cuda", "device.platform: Invalid value 'cuda'"),
    ("seed=1.5", "seed: Value '1.5'"),
])
def test_values_of_the_wrong_type_fail_in_the_job_as_one_line(override, fragment):
    """Hydra composes them (so a sweep with one such value runs its other jobs); the job's
    typing names the key."""
    cfg = compose_config([override])
    with pytest.raises(ConfigError) as info:
        build_parts(typed(cfg))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_describe_error_leaves_bugs_alone():
    assert describe_error(ZeroDivisionError("x")) is None


@dataclasses.dataclass(frozen=True)
class Toy:
    """A user's task-like class: annotations and defaults are its config schema."""

    width: int = 3
    rate: float = 0.5
    name: Optional[str] = None
    sizes: Sequence[int] = (1, 2)

    def __post_init__(self):
        if self.width > 10:
            raise ValueError(f"width={self.width} is too wide")


def test_a_class_signature_types_checks_and_builds_its_config():
    path = f"{__name__}.Toy"
    schema = OmegaConf.structured(signature_schema(Toy, path=path))
    assert OmegaConf.to_container(schema) == {"_target_": path, "width": 3, "rate": 0.5,
                                              "name": None, "sizes": [1, 2]}
    given = OmegaConf.create({"_target_": path, "rate": 1, "sizes": [4]})
    toy = build(check(given, "task"), "task")
    assert toy == Toy(rate=1.0, sizes=(4,)) and isinstance(toy.rate, float)  # lists: tuples
    for bad, message in (({"width": "x"}, "task.width: Value 'x'"),
                         ({"widht": 1}, "task.widht: unknown key; .*Toy takes: name, rate"),
                         ({"width": 11}, "task (" + path + "): width=11 is too wide")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build(check(OmegaConf.create({"_target_": path, **bad}), "task"), "task")
    with pytest.raises(ConfigError, match=r"task._target_=nowhere.Nothing: cannot import"):
        check(OmegaConf.create({"_target_": "nowhere.Nothing"}), "task")


@dataclasses.dataclass(frozen=True)
class Needs:
    """A class with a required output size and a default no config can hold."""

    out_features: int
    act: object = print
    scale: float = None


def test_a_required_out_features_is_filled_and_untyped_values_pass():
    path = f"{__name__}.Needs"
    cfg = check(OmegaConf.create({"_target_": path, "act": "relu", "scale": 2}), "model")
    assert build(cfg, "model", out_features=7) == Needs(out_features=7, act="relu", scale=2.0)
    assert build(check(OmegaConf.create({"_target_": path}), "model"), "model",
                 out_features=3).scale is None  # a None default makes the type Optional
