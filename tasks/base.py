"""The task interface: the hooks every task has, the optional ones it may add, and the check
that a task's class has what runner calls.

A task is a frozen (hashable) dataclass built from ``conf/task/<name>.yaml`` via ``_target_``:
its fields are the config keys (typed by their annotations, defaults once, in the class), and
``__post_init__`` checks their values (``runner.config.errors.check_range`` names the key). Being
hashable lets it be a static argument of the jitted train step: runs whose task configs are
equal share one compiled step. A task needs no base class: it has the ``Task`` hooks, its data
from exactly one source (``DeviceData``, ``HostData`` or ``HostExamples``), and any of the
optional hooks below.
Runner asks for an optional hook only through these protocols (``isinstance``), so the list
here is the whole interface.
"""

from typing import Any, Dict, Optional, Protocol, Tuple, runtime_checkable

import jax
import numpy as np

from runner.config.errors import ConfigError
from runner.config.schema import choice_value

Batch = Dict[str, jax.Array]  # at least "x" (model input) and "y" (target)
Data = Dict[str, Any]  # whatever the task keeps on device: datasets, class prototypes, ...


@runtime_checkable
class Task(Protocol):
    """Required of every task."""

    batch_size: int
    # The size of the model's output (a field or a property): runner gives it to models whose
    # ``out_features`` is left null.
    output_dim: int

    def eval_batches(self, data: Data) -> Batch:
        """The held-out set as equal batches stacked on a leading axis: [batches, batch, ...]."""

    def loss(self, outputs: jax.Array, batch: Batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Scalar loss (means over the batch) and a dict of scalar metrics."""

    def example_input(self) -> jax.Array:
        """A one-example input batch, to initialise, summarise and shape-check the model."""


# The task's data: one of the three.
@runtime_checkable
class DeviceData(Protocol):
    def make_data(self, rng: jax.Array) -> Data:
        """All fixed arrays of the task (training and held-out sets...), made once on device,
        inside the run's compiled set-up."""

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        """The batch for one step; pure and jittable, so it runs inside the scanned step."""


@runtime_checkable
class HostData(Protocol):
    def load_data(self) -> Data:
        """The task's arrays read on the host (e.g. from files); runner checks they fit the
        device's free memory and puts them there once."""

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        """The batch for one step; pure and jittable, so it runs inside the scanned step."""


@runtime_checkable
class HostExamples(Protocol):
    """Training examples read on the host, a dispatch's worth at a time (``runner.loop.feed``):
    a training set of any size. Runner draws each step's ``batch_size`` distinct indices from
    (seed, step) (``runner.core.sampling.step_indices``), reads them a dispatch or two ahead
    on a thread of its own, and feeds them to the compiled steps; the data position is part of
    every checkpoint for free (a resume reads on from the step it restarts at)."""

    train_examples: int  # N: the indices are drawn from [0, N)

    def read_examples(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        """The examples at ``indices`` (int64 ``[n]``, any order) as host arrays with that
        leading axis, e.g. ``{"x": [n, ...], "y": [n]}``; called on runner's reading thread,
        so it may decode or augment with NumPy but must not call JAX. Equal shapes and dtypes
        every call."""

    def load_data(self) -> Data:
        """The held-out set (as ``eval_batches`` takes it) and any arrays ``device_batch``
        reads, as host arrays: runner puts them on the device once."""


# Optional hooks.
@runtime_checkable
class PreparesBatch(Protocol):
    def device_batch(self, data: Data, examples: Batch) -> Batch:
        """(``HostExamples``) A step's batch from the examples read, on the device (pure and
        jittable: e.g. standardize, or bytes to floats); without it the examples are the
        batch."""


@runtime_checkable
class ChoosesFeed(Protocol):
    # (``HostExamples``) ``device``: every training example read once and kept on the
    # device, each step's batch gathered there; ``host``: read a dispatch ahead;
    # ``auto``: on the device when the training set fits (``runner.loop.feed``).
    feed: str


@runtime_checkable
class RecordsInputs(Protocol):
    def inputs(self, recorded: Dict[str, Any]) -> Dict[str, Any]:
        """The files the task reads, as JSON values (paths, sizes, hashes): recorded in the run
        dir's ``inputs.json`` when it starts and verified when it resumes. ``recorded``: the
        run's record when it resumes (else empty), which the task may reuse where it still
        holds (e.g. a hash, for a file of the same size and modification time)."""


@runtime_checkable
class DrawsFigures(Protocol):
    def figures(self, data: Data, outputs: jax.Array) -> Dict[str, Any]:
        """matplotlib figures of the model's eval ``outputs`` (stacked as ``eval_batches``),
        logged to TensorBoard's IMAGES tab at eval steps as ``eval/<name>``. Import matplotlib
        inside (``runner.tasks.figures.pyplot``): runs without images skip it."""


@runtime_checkable
class DeclaresOutputShape(Protocol):
    # One example's model output as ``loss`` takes it (a field, a property, or a method
    # returning it), checked before the first compile (``runner.core.shapes``); without it,
    # ``(output_dim,)`` (e.g. ``()`` for a scalar per example).
    output_shape: Any


@runtime_checkable
class DeclaresBestMetric(Protocol):
    # The eval metric that judges the task's runs when ``trainer.best_metric`` is null:
    # ``"loss"`` or a key of the metrics ``loss`` returns (e.g. ``"accuracy"``), and
    # ``best_mode``, ``"max"`` or ``"min"``: whether higher or lower is better (fields,
    # properties or class attributes). Without them: the loss, lower is better.
    best_metric: str
    best_mode: str


REQUIRED = ("batch_size", "output_dim", "eval_batches", "loss", "example_input")
LOSS_RULE = ("loss", "min")  # a task's best metric and mode unless it declares its own
SOURCES = (DeviceData, HostData, HostExamples)


def check_task(task: Any) -> None:
    """A one-line error naming what ``task``'s class lacks, before anything is built on it."""
    name = f"task ({type(task).__module__}.{type(task).__qualname__})"
    if not isinstance(task, Task):
        missing = [hook for hook in REQUIRED if not hasattr(task, hook)]
        raise ConfigError(f"{name}: lacks {', '.join(missing)} (see runner.tasks.base.Task)")
    sources = [source.__name__ for source in SOURCES if isinstance(task, source)]
    if sources == ["HostExamples"] and not 0 < task.batch_size <= task.train_examples:
        # each step draws batch_size distinct examples of train_examples
        raise ConfigError(f"task.batch_size={task.batch_size}: {name} has "
                          f"{task.train_examples} training examples (train_examples); a batch "
                          f"is 1 to that many distinct ones")
    declared = {hook: getattr(task, hook) for hook in ("best_metric", "best_mode")
                if hasattr(task, hook)}
    if declared and (len(declared) == 1 or task.best_mode not in ("max", "min")):
        shown = " and ".join(f"{k}={v!r}" for k, v in declared.items())
        raise ConfigError(f"{name}: declares {shown}; its own best metric needs both, "
                          f"best_mode max or min (see runner.tasks.base.DeclaresBestMetric)")
    if len(sources) != 1:
        raise ConfigError(f"{name}: needs exactly one data source: make_data(rng) and "
                          f"train_batch (arrays made on device), load_data() and train_batch "
                          f"(host arrays put on device), or load_data(), train_examples and "
                          f"read_examples(indices) (examples read on the host); it has "
                          f"{' and '.join(sources) or 'none'} (see runner.tasks.base)")


def best_rule(task: Any, metric: Optional[str], mode: Optional[str]) -> Tuple[str, str]:
    """``trainer.best_metric`` and ``best_mode`` with null filled in for ``task``: the metric
    is the task's own (``DeclaresBestMetric``), else the loss; the mode is the task's for its
    own metric, ``min`` for the loss. Any other metric needs its mode given: a ConfigError
    naming the key. This one rule picks ``best.msgpack``, early stopping's best, a sweep's
    best job and the value a sweep job returns to its sweeper."""
    own = (task.best_metric, task.best_mode) if isinstance(task, DeclaresBestMetric) \
        else LOSS_RULE
    metric = own[0] if metric is None else metric
    if mode is None:
        implied = {own[0]: own[1], LOSS_RULE[0]: LOSS_RULE[1]}
        if metric not in implied:
            known = " and ".join(f"{k} ({v})" for k, v in implied.items())
            raise ConfigError(f"trainer.best_metric={metric}: give trainer.best_mode=max or "
                              f"min too (whether higher or lower is better; it is implied "
                              f"only for {known})")
        mode = implied[metric]
    return metric, choice_value(mode)
