"""The interface every task implements: data made on device, a batch per step, a loss.

A task is a frozen (hashable) dataclass built from ``conf/task/<name>.yaml`` via ``_target_``:
its fields are the config keys (typed by their annotations, defaults once, in the class), and
``__post_init__`` checks their values (``runner.config.errors.check_range`` names the key). Being
hashable lets it be a static argument of the jitted train step: runs whose task configs are
equal share one compiled step. ``output_dim`` (a field or a property) is the size of the model's
output: runner gives it to models whose ``out_features`` is left null. Before anything compiles,
runner checks the model's output on ``example_input()`` against ``[batch, *output_shape]``
(``runner.core.shapes``): a task whose loss wants another shape than ``(output_dim,)`` per example
declares ``output_shape`` (optional; e.g. ``()`` for a scalar per example).
"""

from typing import Any, Dict, Protocol, Tuple

import jax

Batch = Dict[str, jax.Array]  # at least "x" (model input) and "y" (target)
Data = Dict[str, Any]  # whatever the task keeps on device: datasets, class prototypes, ...


class Task(Protocol):
    batch_size: int
    output_dim: int

    def make_data(self, rng: jax.Array) -> Data:
        """All fixed arrays of the task (training and held-out sets...), made once on device."""

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        """The batch for one step; pure and jittable, so it runs inside the scanned step."""

    def eval_batches(self, data: Data) -> Batch:
        """The held-out set as equal batches stacked on a leading axis: [batches, batch, ...]."""

    def loss(self, outputs: jax.Array, batch: Batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        """Scalar loss (means over the batch) and a dict of scalar metrics."""

    def example_input(self) -> jax.Array:
        """A one-example input batch, to initialise, summarise and shape-check the model."""

    @property
    def output_shape(self) -> Tuple[int, ...]:
        """Optional (a field, a property or a method): one example's model output as ``loss``
        takes it, checked before the first compile; without it, ``(output_dim,)``."""

    def figures(self, data: Data, outputs: jax.Array) -> Dict[str, Any]:
        """Optional: matplotlib figures of the model's eval ``outputs`` (stacked as
        ``eval_batches``), logged to TensorBoard's IMAGES tab at eval steps as ``eval/<name>``.
        Import matplotlib inside (``runner.tasks.figures.pyplot``): runs without images skip
        it."""
