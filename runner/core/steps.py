"""The pure, jitted layer: build the TrainState, one train step, many steps per dispatch, eval."""

import dataclasses
import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from runner.config.errors import ConfigError
from runner.core.examples import probe, read_all
from runner.core.optim import Optimizer
from runner.core.sharding import batch_sharding, check_fits, replicated
from runner.tasks.base import Batch, Data, HostData, HostExamples, PreparesBatch, Task
from runner.core.sampling import step_indices, step_keys

Metrics = Dict[str, jax.Array]
LAYER_GRAD_NORM = "grad_norm/"  # metric-name prefix of each top-level layer's gradient norm
# The data key of a ``HostExamples`` task's whole training set when it is kept on the device.
TRAIN_EXAMPLES = "train_examples"


def _constrain(tree, mesh: Optional[Mesh], sharding_of=replicated):
    """``tree`` laid out as ``sharding_of(mesh)`` inside a jitted function (as it is without a
    mesh)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding_of(mesh))


def _shard_batch(batch: Batch, mesh: Optional[Mesh]) -> Batch:
    """Split the batch over the mesh's devices (data parallelism), when it divides evenly."""
    if mesh is None or mesh.size == 1:
        return batch
    if any(np.shape(leaf)[0] % mesh.size for leaf in jax.tree.leaves(batch)):
        return _constrain(batch, mesh)  # e.g. an eval set of 100 on 8 devices: replicated
    return _constrain(batch, mesh, batch_sharding)


@dataclasses.dataclass(frozen=True)
class ModelApply:
    """``model.apply`` as a value: equal for equal models. ``TrainState.apply_fn`` is part of
    the jit cache key, and a bound method is equal only for the very same model object."""

    model: nn.Module

    def __call__(self, *args, **kwargs):
        return self.model.apply(*args, **kwargs)


class Setup(NamedTuple):
    """What a run starts from (see ``setup``)."""

    state: TrainState
    data: Data
    init_rng: jax.Array
    train_rng: jax.Array


def setup(seed: int, task: Task, model: nn.Module, optimizer: Optimizer, *,
          mesh: Optional[Mesh] = None, host_fed: bool = False) -> Setup:
    """A run's start from its seed, in one compiled call: the three keys (model init, task
    data, training steps), the TrainState (params and optimizer state, replicated over
    ``mesh``) and the task's data: made on device by ``task.make_data(key)``, or, for a task
    with ``load_data()`` (arrays read from files), those host arrays put on the devices
    (donated: the run's data is that one copy); a ``HostExamples`` task's whole training set
    is read and kept there too, as ``data[TRAIN_EXAMPLES]``, unless it is ``host_fed``
    (``runner.loop.feed``; or only evaluated). Eagerly, each of
    init's many small ops would compile a program of its own. Runs whose model, task and
    optimizer structure are equal share the call: this run's hyperparameter values are
    arguments."""
    host = task.load_data() if isinstance(task, (HostData, HostExamples)) else None
    if isinstance(task, HostExamples) and not host_fed:
        host = {**host, TRAIN_EXAMPLES: read_all(task)}
    if host is not None:
        check_fits(host, list(mesh.devices.flat) if mesh else jax.devices()[:1])
    step, params, opt_state, data, init_rng, train_rng = _setup(
        seed, optimizer.hyperparams, host, model=model, task=task, tx=optimizer.tx, mesh=mesh)
    state = TrainState(step=step, apply_fn=ModelApply(model), params=params, tx=optimizer.tx,
                       opt_state=opt_state)
    return Setup(state, data, init_rng, train_rng)


@functools.partial(jax.jit, static_argnames=("model", "task", "tx", "mesh"),
                   donate_argnames="host")
def _setup(seed, hyperparams, host, *, model, task, tx, mesh):
    init_rng, data_rng, train_rng = _constrain(
        tuple(jax.random.split(jax.random.PRNGKey(seed), 3)), mesh)
    params = model.init(init_rng, task.example_input())["params"]
    # This run's values (traced: runs of one structure share the call) also shape the initial
    # state where a factory's init reads one (rmsprop's initial_scale).
    opt_state = tx.transformation(hyperparams).init(params)
    # The step is a typed array (not TrainState.create's Python int), or the first call
    # of the jitted step would compile a second time for the int32 step it gets.
    state = _constrain((jnp.zeros((), jnp.int32), params, opt_state), mesh)
    data = task.make_data(data_rng) if host is None else host
    return (*state, _constrain(data, mesh), init_rng, train_rng)


def _compute(params, x, compute_dtype: Optional[str]):
    """Params and inputs in the compute dtype (mixed precision: the params stay float32)."""
    if compute_dtype is None:
        return params, x

    def cast(a):
        return a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, params), cast(x)


def step_batch(task: Task, data: Data, rng: jax.Array, examples: Optional[Batch]) -> Batch:
    """One step's batch: from ``examples`` read on the host for it, else drawn on the device
    (a ``HostExamples`` task's indices from ``rng``, as the host draws them)."""
    if examples is None and isinstance(task, HostExamples):
        idx = step_indices(rng, task.train_examples, task.batch_size)
        examples = jax.tree.map(lambda a: a[idx], dict(data[TRAIN_EXAMPLES]))
    if examples is None:
        return task.train_batch(data, rng)
    return task.device_batch(data, examples) if isinstance(task, PreparesBatch) else examples


def check_examples(task: HostExamples, data: Any) -> None:
    """The examples the task reads, as ``device_batch`` makes them, are what the model takes
    (``example_input``): one line before anything compiles, else an XLA shape error."""
    batch = jax.eval_shape(lambda d, e: step_batch(task, d, None, e), data, probe(task))
    want = jax.eval_shape(task.example_input)
    got = batch.get("x") if isinstance(batch, dict) else None
    if got is None or got.shape[1:] != want.shape[1:]:
        raise ConfigError(f"task ({type(task).__qualname__}): its examples give inputs x of "
                          f"shape {None if got is None else got.shape[1:]} per example, its "
                          f"example_input has {want.shape[1:]}")


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, task: Task,
               layer_norms: bool = False,
               compute_dtype: Optional[str] = None) -> Tuple[TrainState, Metrics]:
    """One optimizer step on ``batch``; ``rng`` feeds stochastic layers (dropout).
    ``layer_norms`` adds each top-level layer's gradient norm to the metrics.
    ``compute_dtype`` (e.g. ``bfloat16``) runs the model in that dtype; the loss, gradients
    and optimizer update stay in the params' float32."""

    def loss_fn(params):
        params, x = _compute(params, batch["x"], compute_dtype)
        outputs = state.apply_fn({"params": params}, x, rngs={"dropout": rng})
        return task.loss(outputs.astype(jnp.float32), batch)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    lr = state.tx.learning_rate(state.opt_state, state.step)  # the lr this update applies
    state = state.apply_gradients(grads=grads)
    metrics = {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads), "lr": lr}
    if layer_norms:
        metrics.update({f"{LAYER_GRAD_NORM}{name}": optax.tree.norm(g)
                        for name, g in grads.items()})
    return state, metrics


@functools.partial(jax.jit, static_argnames=("task", "steps_per_dispatch", "log_windows",
                                             "layer_norms", "unroll", "mesh", "compute_dtype"),
                   donate_argnames="state")
def train_steps(state: TrainState, data: Data, rng: jax.Array,
                blocks: Optional[Batch] = None, *, task: Task, steps_per_dispatch: int,
                log_windows: int = 1,
                layer_norms: bool = False, unroll: int = 1, mesh: Optional[Mesh] = None,
                compute_dtype: Optional[str] = None) -> Tuple[TrainState, Metrics]:
    """``steps_per_dispatch`` train steps fused into one dispatch with ``lax.scan``.

    Each step's randomness is ``fold_in(rng, step)``, so it depends on the seed and the step
    alone. ``blocks``: the steps' examples read on the host (``[steps_per_dispatch, batch, ...]``,
    ``runner.loop.feed``); without them each step's batch is drawn on the device. Returns the
    metrics of ``log_windows`` equal consecutive runs of steps (the log windows:
    each metric has shape ``(log_windows,)``), each averaged over its steps, except ``lr``: the
    value at the window's last step. ``unroll`` steps run per iteration of the loop.

    With a ``mesh``, each batch is split over its devices (data parallelism: every device
    computes the gradient of its part, XLA all-reduces them) and the state stays replicated.
    """

    def body(state, examples):
        batch_rng, step_rng = step_keys(rng, state.step)
        batch = _shard_batch(step_batch(task, data, batch_rng, examples), mesh)
        state, metrics = train_step(state, batch, step_rng, task=task,
                                    layer_norms=layer_norms, compute_dtype=compute_dtype)
        return _constrain(state, mesh), metrics

    if steps_per_dispatch == 1:  # no scan around a lone step: debug_nans names its operations
        state, metrics = body(state, jax.tree.map(lambda a: a[0], blocks))
        metrics = jax.tree.map(lambda m: m[None], metrics)
    else:
        state, metrics = jax.lax.scan(body, state, blocks, length=steps_per_dispatch, unroll=unroll)
    per_window = {k: v.reshape(log_windows, steps_per_dispatch // log_windows)
                  for k, v in metrics.items()}
    means = {k: jnp.mean(v, axis=1) for k, v in per_window.items()}
    return state, _constrain({**means, "lr": per_window["lr"][:, -1]}, mesh)


def step_flops(state: TrainState, data: Data, rng: jax.Array, *, task: Task,
               compute_dtype: Optional[str] = None,
               examples: Optional[Batch] = None) -> Optional[float]:
    """FLOPs of one train step (batch included), by XLA's cost analysis of the lowered step
    (no compilation). GPU and TPU plugins do not analyse lowered programs (and the compiled
    analysis on GPU counts no FLOPs in cuDNN's convolutions): there the same step is lowered
    for the CPU, from the arrays' shapes, and analysed. ``examples``: one step's, for a task
    fed from the host."""
    def one(state, data, rng, examples):
        return train_step(state, step_batch(task, data, rng, examples), rng, task=task,
                          compute_dtype=compute_dtype)

    cost = jax.jit(one).lower(state, data, rng, examples).cost_analysis()
    if not cost and jax.devices()[0].platform != "cpu":
        try:
            cpu = jax.devices("cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS without the CPU: no FLOPs, no perf/mfu
            return None
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                              (state, data, rng, examples))
        with jax.default_device(cpu):
            cost = jax.jit(one).lower(*shapes).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None


@functools.partial(jax.jit, static_argnames=("task", "mesh", "compute_dtype"))
def evaluate(state: TrainState, data: Data, *, task: Task, mesh: Optional[Mesh] = None,
             compute_dtype: Optional[str] = None) -> Tuple[Metrics, jax.Array]:
    """Loss and metrics on the task's held-out set, averaged over its equal-sized batches,
    and the model's outputs for those batches (stacked like ``task.eval_batches``). Batches
    with a ``mask`` (1 for a real example, 0 for padding) weigh by their real examples, so a
    padded last batch counts exactly its own."""

    def batch_metrics(batch):
        batch = _shard_batch(batch, mesh)
        params, x = _compute(state.params, batch["x"], compute_dtype)
        outputs = state.apply_fn({"params": params}, x).astype(jnp.float32)
        loss, metrics = task.loss(outputs, batch)
        return {"loss": loss, **metrics}, outputs

    batches = task.eval_batches(data)
    metrics, outputs = jax.lax.map(batch_metrics, batches)
    if "mask" in batches:
        weights = jnp.sum(batches["mask"], axis=1)
        means = jax.tree.map(lambda m: jnp.sum(m * weights) / jnp.sum(weights), metrics)
    else:
        means = jax.tree.map(jnp.mean, metrics)
    return _constrain((means, outputs), mesh)
