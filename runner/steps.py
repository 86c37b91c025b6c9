"""The pure, jitted layer: build the TrainState, one train step, many steps per dispatch, eval."""

import functools
from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from runner.optim import LRSchedule, Optimizer
from tasks.base import Batch, Data, Task

Metrics = Dict[str, jax.Array]
LAYER_GRAD_NORM = "grad_norm/"  # metric-name prefix of each top-level layer's gradient norm


def create_train_state(rng: jax.Array, model: nn.Module, task: Task,
                       optimizer: Optimizer) -> TrainState:
    """Initialise the model's params on the task's example input and the optimizer state."""
    params = model.init(rng, task.example_input())["params"]
    # The step is a typed array (not TrainState.create's Python int), or the first call of the
    # jitted step would compile a second time for the int32 step it gets back.
    return TrainState(step=jnp.zeros((), jnp.int32), apply_fn=model.apply, params=params,
                      tx=optimizer.tx, opt_state=optimizer.init(params))


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


@functools.partial(jax.jit, static_argnames=("task", "schedule", "num_steps", "layer_norms"),
                   donate_argnames="state")
def train_steps(state: TrainState, data: Data, rng: jax.Array, *, task: Task,
                schedule: LRSchedule, num_steps: int,
                layer_norms: bool = False) -> Tuple[TrainState, Metrics]:
    """``num_steps`` train steps fused into one dispatch with ``lax.scan``.

    Each step's randomness is ``fold_in(rng, step)``, so it depends on the seed and the step
    alone. Returns the metrics averaged over the steps, except ``lr``: the last step's value.
    """

    def body(state, _):
        batch_rng, step_rng = jax.random.split(jax.random.fold_in(rng, state.step))
        batch = task.train_batch(data, batch_rng)
        return train_step(state, batch, step_rng, task=task, schedule=schedule,
                          layer_norms=layer_norms)

    state, metrics = jax.lax.scan(body, state, length=num_steps)
    means = {k: jnp.mean(v) for k, v in metrics.items()}
    return state, {**means, "lr": metrics["lr"][-1]}


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
