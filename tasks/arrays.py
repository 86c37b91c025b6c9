"""Your own arrays, no code: ``task=arrays task.path=data/digits.npz`` (see ``arrays_io``).

Integer labels ``[N]`` make a classification task (softmax cross-entropy, accuracy), float
targets ``[N]`` or ``[N, D]`` a regression (MSE; ``mse`` and ``mae`` in the targets' own units),
unless ``kind`` says otherwise. With ``standardize``, inputs (and regression targets) are scaled
by the training set's per-feature mean and std, on the device, batch by batch: the arrays stay
in their file's dtype (a uint8 image stays a byte). Each step's batch is drawn without
replacement from (seed, step): gathered on the device from the whole training set kept there
(``feed=device``), or read from the file a dispatch ahead (``feed=host``: a training set of any
size; ``auto``: on the device when it fits, ``runner.loop.feed``). Eval covers every eval
example in equal batches, the last one padded and masked.
"""

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from runner.config.errors import ConfigError, check_range
from runner.tasks.arrays_io import (KEYS, KINDS, ArraysInfo, check, chunked_stats, read, resolve,
                                     scan, stamp)
from runner.tasks.arrays_rows import rows
from runner.tasks.base import Batch, Data
from runner.tasks.figures import TEXT_PT, card_figure, confusion_matrix, sample_grid

FEEDS = ("auto", "device", "host")
_SCANNED: Dict[Any, Dict[str, Any]] = {}  # (files' stamp, standardize) -> their scan, per process


@dataclasses.dataclass(frozen=True)
class Arrays:
    """Train on the arrays of ``path`` (an ``.npz``, or a directory of ``.npy`` files)."""

    path: str
    kind: Optional[str] = None  # classification | regression; null: from y_train's dtype
    num_classes: Optional[int] = None  # null: the largest label + 1
    standardize: bool = True
    batch_size: int = 128
    feed: str = "auto"  # device | host | auto: where each step's examples are read from
    read_threads: int = 8  # feed=host: threads reading a .npy file's rows
    info: ArraysInfo = dataclasses.field(init=False)  # read from the file

    def __post_init__(self):
        if self.kind is not None and self.kind not in KINDS:
            raise ConfigError(f"task.kind={self.kind}: use {' or '.join(KINDS)} (or null)")
        if self.feed not in FEEDS:
            raise ConfigError(f"task.feed={self.feed}: use {', '.join(FEEDS)}")
        check_range("task.num_classes", self.num_classes, gt=1)
        check_range("task.batch_size", self.batch_size, gt=0)
        check_range("task.read_threads", self.read_threads, gt=0)
        path = resolve(self.path)
        raw = read(path, self.path)  # a .npy directory: memory-mapped, only headers read
        info = check(raw, path=path, given=self.path, kind=self.kind,
                     num_classes=self.num_classes)
        if info.kind == "regression" and self.standardize:  # targets scaled, metrics not
            mean, std = chunked_stats(raw["y_train"])
            info = dataclasses.replace(info, y_mean=tuple(map(float, mean)),
                                       y_std=tuple(map(float, std)))
        x = raw["x_train"]
        if isinstance(x, np.memmap) and x.ndim > 1 and not x.flags.c_contiguous:
            raise ConfigError(f"task.path={self.path}: x_train.npy is stored in Fortran order; "
                              f"save it C-ordered (np.save(path, np.ascontiguousarray(a)))")
        if self.batch_size > info.n_train:
            raise ConfigError(f"task.batch_size={self.batch_size}: more than the "
                              f"{info.n_train} training examples of {self.path}")
        # frozen: set as the dataclass __init__ does. The arrays and their contents (hash,
        # statistics) are no field: not part of the task's hash (a static argument of every
        # compiled step).
        object.__setattr__(self, "info", info)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "scanned", None)
        # The labels in memory (checked whole above; a few bytes an example): a read each
        # would cost as much as the example's inputs
        object.__setattr__(self, "labels", _as_jax_takes(np.array(raw["y_train"])))

    @property
    def output_dim(self) -> int:
        return self.info.num_classes or self.info.y_dim

    @property
    def classification(self) -> bool:
        return self.info.kind == "classification"

    # Runs are judged by eval accuracy for a classifier, by the loss for a regression
    # (runner.tasks.base.DeclaresBestMetric).
    @property
    def best_metric(self) -> str:
        return "accuracy" if self.classification else "loss"

    @property
    def best_mode(self) -> str:
        return "max" if self.classification else "min"

    @property
    def train_examples(self) -> int:
        return self.info.n_train

    def contents(self, recorded: Dict[str, Any]) -> Dict[str, Any]:
        """The files' stamp (sizes, modification times), SHA-256 and input statistics, in one
        chunked pass the first time (``arrays_io.scan``); a ``recorded`` scan of the same
        files, sizes and modification times (a resume's ``inputs.json``), or one this process
        made already (an earlier job of a sweep), is taken as it is."""
        if self.scanned is None:
            path = resolve(self.info.path)
            now = {"path": self.info.path, **stamp(path)}
            key = (repr(now), self.standardize)
            if {k: recorded.get(k) for k in now} == now:  # the files as recorded
                _SCANNED[key] = {**recorded, **{k: np.asarray(recorded[k], np.float32).reshape(
                    self.info.x_shape) for k in ("x_mean", "x_std")}}
            elif key not in _SCANNED:
                _SCANNED[key] = scan(self.raw, path, self.path, self.standardize,
                                     self.info.x_shape)
            object.__setattr__(self, "scanned", _SCANNED[key])
        return self.scanned

    def inputs(self, recorded: Dict[str, Any]) -> Dict[str, Any]:
        """The file this task reads, its stamp and hash, and the statistics it standardizes
        with (recorded in the run dir: resume and eval read the same file, and refuse it if
        anything differs)."""
        scanned = self.contents(recorded)
        return {"path": self.info.path, "bytes": scanned["bytes"],
                "mtime_ns": scanned["mtime_ns"], "sha256": scanned["sha256"],
                "x_mean": scanned["x_mean"].ravel().tolist(),
                "x_std": scanned["x_std"].ravel().tolist(),
                "y_mean": self.info.y_mean, "y_std": self.info.y_std}

    def read_examples(self, indices: np.ndarray) -> Dict[str, np.ndarray]:
        """Training examples by index, in the file's dtype (64-bit values as JAX takes them)."""
        if isinstance(self.raw["x_train"], np.memmap):  # a .npy directory: positioned reads
            # the file as scanned when the run started: a change since is refused
            path, scanned, i = resolve(self.info.path), self.contents({}), KEYS.index("x_train")
            x = rows(path / "x_train.npy", self.read_threads,
                     (scanned["bytes"][i], scanned["mtime_ns"][i])).read(indices)
        else:
            x = self.raw["x_train"][indices]
        return {"x": _as_jax_takes(x), "y": self.labels[indices]}

    def load_data(self) -> Data:
        """The eval set as the file holds it, padded to equal batches, and the statistics the
        device standardizes with."""
        scanned = self.contents({})
        padded = -self.info.n_eval % self._eval_batch
        mask = np.concatenate([np.ones(self.info.n_eval, np.float32),
                               np.zeros(padded, np.float32)])
        x, y = (_as_jax_takes(np.asarray(self.raw[k])) for k in ("x_eval", "y_eval"))
        return {"eval": {"x": _pad(x, padded), "y": _pad(y, padded), "mask": mask},
                "stats": {"x_mean": scanned["x_mean"], "x_std": scanned["x_std"]}}

    def device_batch(self, data: Data, examples: Batch) -> Batch:
        """Examples as the model trains on them: float32 inputs of ``x_shape``, standardized;
        class indices, or regression targets [n, D] scaled by the training set's statistics."""
        x = examples["x"].astype(jnp.float32).reshape(-1, *self.info.x_shape)
        x = (x - data["stats"]["x_mean"]) / data["stats"]["x_std"]
        y = examples["y"]
        if self.classification:
            y = y.astype(jnp.int32)
        else:
            y = y.astype(jnp.float32).reshape(len(y), self.info.y_dim)
            y = (y - jnp.float32(self.info.y_mean)) / jnp.float32(self.info.y_std)
        return {**examples, "x": x, "y": y}

    @property
    def _eval_batch(self) -> int:
        return min(self.batch_size, self.info.n_eval)

    def eval_batches(self, data: Data) -> Batch:
        batch = self._eval_batch
        examples = self.device_batch(data, dict(data["eval"]))
        return jax.tree.map(lambda a: a.reshape(-1, batch, *a.shape[1:]), examples)

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
            true = np.asarray(data["eval"]["y"], np.float32)[:n].reshape(n, -1)
            return {"predicted_vs_true": _scatter(true[:, 0], (outputs * std + mean)[:, 0])}
        labels, predicted = np.asarray(data["eval"]["y"])[:n], outputs.argmax(-1)
        figures = {"confusion_matrix": confusion_matrix(labels, predicted, self.output_dim)}
        if len(self.info.x_shape) == 3 and self.info.x_shape[-1] in (1, 3, 4):
            images = np.asarray(data["eval"]["x"][:8], np.float32)
            figures["samples"] = sample_grid(images.reshape(-1, *self.info.x_shape), labels,
                                             predicted)
        return figures


def _as_jax_takes(a: np.ndarray) -> np.ndarray:
    """``a`` in the dtype JAX keeps it in (64-bit values as 32-bit without jax_enable_x64),
    converted here, on the reading thread, rather than by ``device_put``."""
    return a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)


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
