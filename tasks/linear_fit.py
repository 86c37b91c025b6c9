"""The reference's linear fit: y = slope * x + intercept + N(0, noise_std^2), x ~ N(0, 1)."""

import dataclasses
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from runner.config.errors import ConfigError, check_range
from runner.tasks.base import Batch, Data
from runner.tasks.figures import TEXT_PT, TICK_PT, card_figure


@dataclasses.dataclass(frozen=True)
class LinearFit:
    """Full-batch regression of a noisy line (minibatches when batch_size < num_train)."""

    num_train: int = 100
    num_eval: int = 100
    batch_size: Optional[int] = None  # null: full batch (num_train)
    slope: float = 2.0
    intercept: float = 1.0
    noise_std: float = 0.2

    def __post_init__(self):
        for key in ("num_train", "num_eval", "batch_size"):
            check_range(f"task.{key}", getattr(self, key), gt=0)
        check_range("task.noise_std", self.noise_std, ge=0)
        if self.batch_size is None:  # frozen: set the field as the dataclass __init__ does
            object.__setattr__(self, "batch_size", self.num_train)
        if self.batch_size > self.num_train:
            raise ConfigError(f"task.batch_size={self.batch_size}: must be <= task.num_train="
                              f"{self.num_train}")

    @property
    def output_dim(self) -> int:
        return 1

    def _sample(self, rng: jax.Array, n: int) -> Batch:
        x_rng, noise_rng = jax.random.split(rng)
        x = jax.random.normal(x_rng, (n, 1))
        y = self.slope * x + self.intercept + self.noise_std * jax.random.normal(noise_rng, (n, 1))
        return {"x": x, "y": y}

    def make_data(self, rng: jax.Array) -> Data:
        train_rng, eval_rng = jax.random.split(rng)
        return {"train": self._sample(train_rng, self.num_train),
                "eval": self._sample(eval_rng, self.num_eval)}

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        if self.batch_size == self.num_train:
            return data["train"]
        idx = jax.random.choice(rng, self.num_train, (self.batch_size,), replace=False)
        return jax.tree.map(lambda a: a[idx], data["train"])

    def eval_batches(self, data: Data) -> Batch:
        return jax.tree.map(lambda a: a[None], data["eval"])

    def loss(self, outputs: jax.Array, batch: Batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        mse = jnp.mean((outputs - batch["y"]) ** 2)
        return mse, {"mse": mse}

    def example_input(self) -> jax.Array:
        return jnp.zeros((1, 1))

    def figures(self, data: Data, outputs: jax.Array) -> Dict[str, "Figure"]:  # noqa: F821
        """The reference's picture: the data, the model's line and the true line."""
        fig, axes = card_figure(3.8)  # legible on TensorBoard's image card (tasks.figures)
        ax = axes[0, 0]
        ax.scatter(np.asarray(data["train"]["x"]), np.asarray(data["train"]["y"]), s=10,
                   alpha=0.6, label="train data")
        x = np.asarray(data["eval"]["x"]).reshape(-1)
        order = np.argsort(x)
        ax.plot(x[order], np.asarray(outputs).reshape(-1)[order], "r", label="model")
        ax.plot(x[order], self.slope * x[order] + self.intercept, "k--", lw=1, label="truth")
        ax.set_xlabel("x", fontsize=TEXT_PT, labelpad=1)
        ax.set_ylabel("y", fontsize=TEXT_PT, labelpad=1)
        ax.legend(loc="upper left", fontsize=TICK_PT)
        # Fixed margins: tight_layout would lay the figure out twice (a third of its time).
        fig.subplots_adjust(left=0.14, right=0.98, bottom=0.15, top=0.98)
        return {"fit": fig}
