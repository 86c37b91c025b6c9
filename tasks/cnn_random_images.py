"""Random images a CNN can learn: a smooth prototype image per class, plus pixel noise."""

import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from runner.config.errors import ConfigError, check_range
from runner.tasks.base import Batch, Data
from runner.tasks.figures import confusion_matrix, sample_grid


@dataclasses.dataclass(frozen=True)
class CNNRandomImages:
    """Classify ``image_size``^2 x ``channels`` images into ``num_classes`` classes.

    Each class has a prototype: Gaussian noise on a ``prototype_size``^2 grid, resized
    (bilinear) to the image size and standardised. An example is its class prototype plus
    N(0, noise_std^2) per pixel, rescaled to unit variance; everything is made on device from
    the PRNG. ``noise_std`` sets the difficulty.
    """

    batch_size: int = 32
    num_eval: int = 320
    image_size: int = 84
    channels: int = 3
    num_classes: int = 10
    prototype_size: int = 7
    noise_std: float = 3.0
    # Its runs are judged by eval accuracy (runner.tasks.base.DeclaresBestMetric); no fields.
    best_metric = "accuracy"
    best_mode = "max"

    def __post_init__(self):
        for key in ("batch_size", "num_eval", "image_size", "channels", "prototype_size"):
            check_range(f"task.{key}", getattr(self, key), gt=0)
        check_range("task.num_classes", self.num_classes, gt=1)
        check_range("task.noise_std", self.noise_std, ge=0)
        if self.num_eval % self.batch_size:
            raise ConfigError(f"task.num_eval={self.num_eval}: must be a multiple of "
                              f"task.batch_size={self.batch_size} (eval runs in equal batches)")

    @property
    def output_dim(self) -> int:
        return self.num_classes

    def _sample(self, prototypes: jax.Array, rng: jax.Array, n: int) -> Batch:
        label_rng, noise_rng = jax.random.split(rng)
        y = jax.random.randint(label_rng, (n,), 0, self.num_classes)
        noise = jax.random.normal(noise_rng, (n, self.image_size, self.image_size, self.channels))
        # Unit variance per pixel whatever the noise level, as for normalised real images.
        x = (prototypes[y] + self.noise_std * noise) / jnp.sqrt(1.0 + self.noise_std**2)
        return {"x": x, "y": y}

    def make_data(self, rng: jax.Array) -> Data:
        proto_rng, eval_rng = jax.random.split(rng)
        coarse = jax.random.normal(
            proto_rng, (self.num_classes, self.prototype_size, self.prototype_size, self.channels))
        shape = (self.num_classes, self.image_size, self.image_size, self.channels)
        prototypes = jax.image.resize(coarse, shape, method="bilinear")
        prototypes = (prototypes - prototypes.mean()) / prototypes.std()
        return {"prototypes": prototypes,
                "eval": self._sample(prototypes, eval_rng, self.num_eval)}

    def train_batch(self, data: Data, rng: jax.Array) -> Batch:
        return self._sample(data["prototypes"], rng, self.batch_size)

    def eval_batches(self, data: Data) -> Batch:
        num_batches = self.num_eval // self.batch_size
        return jax.tree.map(lambda a: a.reshape(num_batches, self.batch_size, *a.shape[1:]),
                            data["eval"])

    def loss(self, outputs: jax.Array, batch: Batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        loss = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["y"]).mean()
        accuracy = jnp.mean(jnp.argmax(outputs, axis=-1) == batch["y"])
        return loss, {"accuracy": accuracy}

    def example_input(self) -> jax.Array:
        return jnp.zeros((1, self.image_size, self.image_size, self.channels))

    def figures(self, data: Data, outputs: jax.Array) -> Dict[str, "Figure"]:  # noqa: F821
        """Sample eval images with true/predicted labels, and the eval confusion matrix."""
        images, labels = np.asarray(data["eval"]["x"]), np.asarray(data["eval"]["y"])
        predicted = np.asarray(outputs).reshape(len(labels), -1).argmax(-1)
        return {"samples": sample_grid(images[:8], labels, predicted),
                "confusion_matrix": confusion_matrix(labels, predicted, self.num_classes)}
