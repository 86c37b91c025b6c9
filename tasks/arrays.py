"""Your own arrays, no code: ``task=arrays task.path=data/digits.npz`` (see ``arrays_io``).

Integer labels ``[N]`` make a classification task (softmax cross-entropy, accuracy), float
targets ``[N]`` or ``[N, D]`` a regression (MSE; ``mse`` and ``mae`` in the targets' own units),
unless ``kind`` says otherwise. With ``standardize``, inputs (and regression targets) are scaled
by the training set's per-feature mean and std. The arrays go to the device once; each step's
batch is drawn without replacement inside the compiled loop from (seed, step), and eval covers
every eval example in equal batches, the last one padded and masked.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from runner.config.errors import ConfigError, check_range
from runner.tasks.arrays_io import KINDS, ArraysInfo, check, read, resolve
from runner.tasks.base import Batch, Data
from runner.tasks.figures import TEXT_PT, card_figure, confusion_matrix, sample_grid
from runner.tasks.sampling import distinct_indices


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Train on the arrays of ``path`` (an ``.npz``, or a directory of ``.npy`` files)."""

    path: str
    kind: Optional[str] = None  # classification | regression; null: from y_train's dtype
    num_classes: Optional[int] = None  # null: the largest label + 1
    standardize: bool = True
    batch_size: int = 128
    info: ArraysInfo = dataclasses.field(init=False)  # read from the file

    def __post_init__(self):
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"task.kind={self.kind}: use {' or '.join(KINDS)} (or null)")
        check_range("task.num_classes", self.num_classes, gt=1)
        check_range("task.batch_size", self.batch_size, gt=0)
        path = resolve(self.path)
        raw = read(path, self.path)
        info = check(raw, path=path, given=self.path, kind=self.kind,
                     num_classes=self.num_classes)
        if info.kind == "regression" and self.standardize:  # targets scaled, metrics not
            mean, std = _stats(raw["y_train"].reshape(info.n_train, -1), True)
            info = dataclasses.replace(info, y_mean=tuple(map(float, mean)),
                                       y_std=tuple(map(float, std)))
        if self.batch_size > info.n_train:
            raise ConfigError(f"task.batch_size={self.batch_size}: more than the "
                              f"{info.n_train} training examples of {self.path}")
        # frozen: set as the dataclass __init__ does. The input statistics are no field: not
        # part of the task's hash (a static argument of every compiled step).
        object.__setattr__(self, "info", info)
        object.__setattr__(self, "x_stats", _stats(
            raw["x_train"].reshape(info.n_train, *info.x_shape), self.standardize))

    @property
    def output_dim(self) -> int:
        return self.info.num_classes or self.info.y_dim

    @property
    def classification(self) -> bool:
        return self.info.kind == "classification"

    def inputs(self) -> Dict[str, Any]:
        """The file this task read and the statistics it standardizes with (recorded in the
        run dir: resume and eval read the same file, and refuse it if anything differs)."""
        x_mean, x_std = self.x_stats
        return {"path": self.info.path, "sha256": self.info.sha256,
                "x_mean": x_mean.ravel().tolist(), "x_std": x_std.ravel().tolist(),
                "y_mean": self.info.y_mean, "y_std": self.info.y_std}

    def load_data(self) -> Data:
        """The arrays as the model trains on them (host arrays, placed on device by runner)."""
        raw = read(resolve(self.info.path), self.path)
        x_mean, x_std = self.x_stats
        x = {}
        for s in ("train", "eval"):  # one float32 copy of each (a .npy dir is memory-mapped)
            x[s] = raw[f"x_{s}"].astype(np.float32).reshape(-1, *self.info.x_shape)
            x[s] -= x_mean
            x[s] /= x_std
        y = {s: self._targets(raw[f"y_{s}"]) for s in ("train", "eval")}
        padded = -self.info.n_eval % self._eval_batch
        mask = np.concatenate([np.ones(self.info.n_eval, np.float32),
                               np.zeros(padded, np.float32)])
        return {"train": {"x": x["train"], "y": y["train"]},
                "eval": {"x": _pad(x["eval"], padded), "y": _pad(y["eval"], padded),
                         "mask": mask},
                "stats": {"x_mean": x_mean, "x_std": x_std}}

    def _targets(self, y: np.ndarray) -> np.ndarray:
        """Class indices, or targets [N, D] scaled by the training set's statistics."""
        if self.classification:
            return y.astype(np.int32)
        y = y.astype(np.float32).reshape(len(y), self.info.y_dim)
        return (y - np.float32(self.info.y_mean)) / np.float32(self.info.y_std)

    @property
    def _eval_batch(self) -> int:
        return min(self.batch_size, self.info.n_eval)

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        if self.batch_size == self.info.n_train:
            return dict(data["train"])
        idx = distinct_indices(rng, self.info.n_train, self.batch_size)
        return jax.tree.map(lambda a: a[idx], dict(data["train"]))

    def eval_batches(self, data: Data) -> Batch:
        batch = self._eval_batch
        return jax.tree.map(lambda a: a.reshape(-1, batch, *a.shape[1:]), dict(data["eval"]))

    def loss(self, outputs: jax.Array, batch: Batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        weights = batch.get("mask", jnp.ones(len(outputs)))
        mean = lambda v: jnp.sum(v * weights) / jnp.maximum(jnp.sum(weights), 1)  # noqa: E731
        if self.classification:
            loss = mean(optax.softmax_cross_entropy_with_integer_labels(outputs, batch["y"]))
            return loss, {"accuracy": mean(jnp.argmax(outputs, -1) == batch["y"])}
        error = outputs - batch["y"]
        scale = jnp.asarray(self.info.y_std)  # metrics in the targets' own units
        return mean(jnp.mean(error ** 2, -1)), {
            "mse": mean(jnp.mean((error * scale) ** 2, -1)),
            "mae": mean(jnp.mean(jnp.abs(error * scale), -1))}

    def example_input(self) -> jax.Array:
        return jnp.zeros((1, *self.info.x_shape))

    def figures(self, data: Data, outputs: jax.Array) -> Dict[str, "Figure"]:  # noqa: F821
        """Classification: the eval confusion matrix, and eval samples with true/predicted
        labels when the inputs are images; regression: predicted against true targets."""
        n = self.info.n_eval
        outputs = np.asarray(outputs).reshape(-1, self.output_dim)[:n]
        if not self.classification:
            mean, std = np.float32(self.info.y_mean), np.float32(self.info.y_std)
            true = np.asarray(data["eval"]["y"])[:n] * std + mean
            return {"predicted_vs_true": _scatter(true[:, 0], (outputs * std + mean)[:, 0])}
        labels, predicted = np.asarray(data["eval"]["y"])[:n], outputs.argmax(-1)
        figures = {"confusion_matrix": confusion_matrix(labels, predicted, self.output_dim)}
        if len(self.info.x_shape) == 3 and self.info.x_shape[-1] in (1, 3, 4):
            figures["samples"] = sample_grid(np.asarray(data["eval"]["x"])[:8], labels,
                                             predicted)
        return figures


def _stats(a: np.ndarray, standardize: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the examples (a constant feature keeps std 1)."""
    if not standardize:
        return np.zeros(a.shape[1:], np.float32), np.ones(a.shape[1:], np.float32)
    mean, std = a.mean(0, dtype=np.float64), a.std(0, dtype=np.float64)
    return mean.astype(np.float32), np.where(std > 0, std, 1).astype(np.float32)


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((n, *a.shape[1:]), a.dtype)]) if n else a


def _scatter(true: np.ndarray, predicted: np.ndarray):
    fig, axes = card_figure(3.3)  # legible on TensorBoard's image card (tasks.figures)
    ax = axes[0, 0]
    ax.scatter(true, predicted, s=8, alpha=0.6)
    lo, hi = float(min(true.min(), predicted.min())), float(max(true.max(), predicted.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("true", fontsize=TEXT_PT, labelpad=1)
    ax.set_ylabel("predicted", fontsize=TEXT_PT, labelpad=1)
    fig.subplots_adjust(left=0.2, right=0.97, bottom=0.15, top=0.97)
    return fig
