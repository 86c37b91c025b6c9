"""The pure, jitted layer: build the TrainState, one train step, many steps per dispatch, eval."""

import functools
from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState

from runner.optim import LRSchedule, Optimizer
from tasks.base import Batch, Data, Task

Metrics = Dict[str, jax.Array]
LAYER_GRAD_NORM = "grad_norm/"  # metric-name prefix of each top-level layer's gradient norm


@jax.jit
def seed_keys(seed: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The run's three keys from its seed: model init, task data, training steps.
    (One compiled call: eager PRNG ops would each compile a tiny program.)"""
    return tuple(jax.random.split(jax.random.PRNGKey(seed), 3))


def create_train_state(rng: jax.Array, model: nn.Module, task: Task,
                       optimizer: Optimizer) -> TrainState:
    """Initialise the model's params on the task's example input and the optimizer state."""
    params, opt_state = _jitted_init(model, task, optimizer.tx)(rng)
    # The step is a typed array (not TrainState.create's Python int), or the first call of the
    # jitted step would compile a second time for the int32 step it gets back.
    return TrainState(step=jnp.asarray(np.int32(0)), apply_fn=model.apply, params=params,
                      tx=optimizer.tx, opt_state=optimizer.with_own_hyperparams(opt_state))


def _jitted_init(model: nn.Module, task: Task, tx: optax.GradientTransformation):
    """Params and optimizer state in one compiled call (eagerly, each of init's many small ops
    compiles on its own: ~0.3 s). ``tx`` is shared by the optimizers of one structure, so the
    caller puts its own hyperparameter values in. One function per (model, task, tx) objects
    (modules with list attributes cannot be hashed as static arguments)."""
    key = (id(model), task, id(tx))
    if key not in _INITS:
        def init(rng):
            params = model.init(rng, task.example_input())["params"]
            return params, tx.init(params)

        _INITS[key] = (model, tx, jax.jit(init))  # holding model and tx keeps their ids
    return _INITS[key][2]


_INITS: Dict = {}


@functools.partial(jax.jit, static_argnames="task")
def make_data(rng: jax.Array, *, task: Task) -> Data:
    """The task's fixed arrays, made on device in one compiled call."""
    return task.make_data(rng)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, task: Task,
               schedule: LRSchedule, layer_norms: bool = False) -> Tuple[TrainState, Metrics]:
    """One optimizer step on ``batch``; ``rng`` feeds stochastic layers (dropout).
    ``layer_norms`` adds each top-level layer's gradient norm to the metrics."""

    def loss_fn(params):
        outputs = state.apply_fn({"params": params}, batch["x"], rngs={"dropout": rng})
        return task.loss(outputs, batch)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    lr = state.opt_state.hyperparams["learning_rate"] * schedule(state.step)
    state = state.apply_gradients(grads=grads)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads), "lr": lr}
    if layer_norms:
        metrics.update({f"{LAYER_GRAD_NORM}{name}": optax.tree.norm(g)
                        for name, g in grads.items()})
    return state, metrics


@functools.partial(jax.jit, static_argnames=("task", "schedule", "num_steps", "windows",
                                             "layer_norms", "unroll"), donate_argnames="state")
def train_steps(state: TrainState, data: Data, rng: jax.Array, *, task: Task,
                schedule: LRSchedule, num_steps: int, windows: int = 1,
                layer_norms: bool = False, unroll: int = 1) -> Tuple[TrainState, Metrics]:
    """``num_steps`` train steps fused into one dispatch with ``lax.scan``.

    Each step's randomness is ``fold_in(rng, step)``, so it depends on the seed and the step
    alone. Returns the metrics of ``windows`` equal consecutive runs of steps (the log windows:
    each metric has shape ``(windows,)``), each averaged over its steps, except ``lr``: the
    value at the window's last step. ``unroll`` steps run per iteration of the loop.
    """

    def body(state, _):
        batch_rng, step_rng = jax.random.split(jax.random.fold_in(rng, state.step))
        batch = task.train_batch(data, batch_rng)
        return train_step(state, batch, step_rng, task=task, schedule=schedule,
                          layer_norms=layer_norms)

    state, metrics = jax.lax.scan(body, state, length=num_steps, unroll=unroll)
    per_window = {k: v.reshape(windows, num_steps // windows) for k, v in metrics.items()}
    means = {k: jnp.mean(v, axis=1) for k, v in per_window.items()}
    return state, {**means, "lr": per_window["lr"][:, -1]}


@functools.partial(jax.jit, static_argnames="task")
def evaluate(state: TrainState, data: Data, *, task: Task) -> Tuple[Metrics, jax.Array]:
    """Loss and metrics on the task's held-out set, averaged over its equal-sized batches,
    and the model's outputs for those batches (stacked like ``task.eval_batches``)."""

    def batch_metrics(batch):
        outputs = state.apply_fn({"params": state.params}, batch["x"])
        loss, metrics = task.loss(outputs, batch)
        return {"loss": loss, **metrics}, outputs

    metrics, outputs = jax.lax.map(batch_metrics, task.eval_batches(data))
    return jax.tree.map(jnp.mean, metrics), outputs
