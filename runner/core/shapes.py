"""The model's output shape checked against the task's before anything compiles.

A model whose output does not fit the task's loss fails late and misleadingly otherwise: too
few classes make the cross-entropy NaN (the run then blames the learning rate), and a
regression width of 1 against 2 targets broadcasts silently. The model's output on the task's
``example_input()`` is traced abstractly (``jax.eval_shape``: no compilation, no FLOPs, no
device touched, so it runs before ``runner.device.configure_jax`` sets the backend up) and
compared with the task's ``output_shape`` (default: ``(output_dim,)``).
"""

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax

from runner.config.errors import ConfigError
from runner.tasks.base import DeclaresOutputShape

Shape = Tuple[int, ...]


def expected_shape(task: Any) -> Shape:
    """One example's output as the task's loss needs it: the task's ``output_shape`` (an
    attribute, a property or a method) if it declares one, else ``(output_dim,)``."""
    shape = task.output_shape if isinstance(task, DeclaresOutputShape) else None
    if callable(shape):
        shape = shape()
    if shape is None:
        return (int(task.output_dim),)
    return tuple(int(n) for n in shape)


def model_output(task: Any, model: nn.Module) -> Tuple[Shape, Optional[Shape]]:
    """(the example input's shape (its first array's, if several), the model's output's shape
    on it); the output's is None when the model returns something other than one array (then
    the task's loss is its judge)."""

    def forward():
        x = task.example_input()
        # The rngs of the train step too, so that a model with dropout traces as it trains.
        key = jax.random.PRNGKey(0)
        return x, model.init_with_output({"params": key, "dropout": key}, x)[0]

    x, out = jax.eval_shape(forward)
    shape = tuple(out.shape) if isinstance(out, jax.ShapeDtypeStruct) else None
    return tuple(jax.tree.leaves(x)[0].shape), shape


def check_output(task: Any, model: nn.Module) -> None:
    """Raise ConfigError naming ``model.out_features`` (or the model, when it has no such
    field) when the model's output on the task's example input is not ``[batch,
    *expected_shape(task)]``."""
    want = expected_shape(task)
    x_shape, got = model_output(task, model)
    if got is None:
        return
    expected = (*x_shape[:1], *want)
    if got == expected:
        return
    raise ConfigError(f"{_model_key(model)}: the model's output on the task's example input "
                      f"is {_show(got)} but task {type(task).__name__} expects "
                      f"{_show(expected)} ({_declared(task, want)}); {_fix(model, want)}")


def _model_key(model: nn.Module) -> str:
    if hasattr(model, "out_features"):
        return f"model.out_features={model.out_features}"
    return f"model ({type(model).__name__})"


def _declared(task: Any, want: Shape) -> str:
    """Where the expected shape comes from, as the user would look it up."""
    if isinstance(task, DeclaresOutputShape) and task.output_shape is not None:
        return f"its output_shape={_show(want)}"
    return f"its output_dim={want[0]}"


def _fix(model: nn.Module, want: Shape) -> str:
    """out_features as the fix only where it is one (a model that ignores it needs another)."""
    if len(want) == 1 and getattr(model, "out_features", want[0]) != want[0]:
        return f"set model.out_features={want[0]} or leave it null"
    return f"use a model whose output per example is {_show(want)}"


def _show(shape: Shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
