"""The task interface: the hooks every task has, the optional ones it may add, and the check
that a task's class has what runner calls.

A task is a frozen (hashable) dataclass built from ``conf/task/<name>.yaml`` via ``_target_``:
its fields are the config keys (typed by their annotations, defaults once, in the class), and
``__post_init__`` checks their values (``runner.config.errors.check_range`` names the key). Being
hashable lets it be a static argument of the jitted train step: runs whose task configs are
equal share one compiled step. A task needs no base class: it has the ``Task`` hooks, its data
from exactly one source (``DeviceData`` or ``HostData``), and any of the optional hooks below.
Runner asks for an optional hook only through these protocols (``isinstance``), so the list
here is the whole interface.
"""

from typing import Any, Dict, Protocol, Tuple, runtime_checkable

import jax

from runner.config.errors import ConfigError

Batch = Dict[str, jax.Array]  # at least "x" (model input) and "y" (target)
Data = Dict[str, Any]  # whatever the task keeps on device: datasets, class prototypes, ...


@runtime_checkable
class Task(Protocol):
    """Required of every task."""

    batch_size: int
    # The size of the model's output (a field or a property): runner gives it to models whose
    # ``out_features`` is left null.
    output_dim: int

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        """The batch for one step; pure and jittable, so it runs inside the scanned step."""

    def eval_batches(self, data: Data) -> Batch:
        """The held-out set as equal batches stacked on a leading axis: [batches, batch, ...]."""

    def loss(self, outputs: jax.Array, batch: Batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Scalar loss (means over the batch) and a dict of scalar metrics."""

    def example_input(self) -> jax.Array:
        """A one-example input batch, to initialise, summarise and shape-check the model."""


# The task's data: one of the two.
@runtime_checkable
class DeviceData(Protocol):
    def make_data(self, rng: jax.Array) -> Data:
        """All fixed arrays of the task (training and held-out sets...), made once on device,
        inside the run's compiled set-up."""


@runtime_checkable
class HostData(Protocol):
    def load_data(self) -> Data:
        """The task's arrays read on the host (e.g. from files); runner checks they fit the
        device's free memory and puts them there once."""


# Optional hooks.
@runtime_checkable
class RecordsInputs(Protocol):
    def inputs(self) -> Dict[str, Any]:
        """The files the task reads, as JSON values (paths, sizes, hashes): recorded in the run
        dir's ``inputs.json`` when it starts and verified when it resumes."""


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


REQUIRED = ("batch_size", "output_dim", "train_batch", "eval_batches", "loss", "example_input")


def check_task(task: Any) -> None:
    """A one-line error naming what ``task``'s class lacks, before anything is built on it."""
    name = f"task ({type(task).__module__}.{type(task).__qualname__})"
    if not isinstance(task, Task):
        missing = [hook for hook in REQUIRED if not hasattr(task, hook)]
        raise ConfigError(f"{name}: lacks {', '.join(missing)} (see runner.tasks.base.Task)")
    sources = isinstance(task, DeviceData) + isinstance(task, HostData)
    if sources != 1:
        raise ConfigError(f"{name}: needs exactly one data hook, make_data(rng) (arrays made on "
                          f"device) or load_data() (host arrays); it has "
                          f"{'both' if sources else 'neither'}")
