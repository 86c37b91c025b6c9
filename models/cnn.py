"""The reference's CNN: (Conv -> relu -> max pool) per conv layer, flatten, Dense -> relu, Dense."""

from typing import Optional, Sequence

import flax.linen as nn
import jax

from runner.config.errors import ConfigError, check_range, chosen
from runner.models.conv import conv_general_dilated
from runner.models.init import Init
from runner.models.pooling import max_pool


class CNN(nn.Module):
    """Conv stack over NHWC images with a dense head; defaults give 3,689,034 parameters on
    84x84x3 inputs and 10 outputs. The first conv uses ``first_kernel_init`` (the reference:
    orthogonal(sqrt 2)). ``out_features`` null: the task's output size (runner fills it in).
    """

    conv_features: Sequence[int] = (64, 128)
    kernel_sizes: Sequence[int] = (3, 3)
    pool_size: int = 2
    dense_features: Sequence[int] = (64,)
    out_features: Optional[int] = None
    first_kernel_init: Init = Init("orthogonal", scale=2**0.5)

    def __post_init__(self):
        for key in ("conv_features", "kernel_sizes", "pool_size", "dense_features",
                    "out_features"):
            check_range(f"model.{key}", getattr(self, key), gt=0)
        if len(self.kernel_sizes) != len(self.conv_features):
            raise ConfigError(
                f"model.kernel_sizes has {len(self.kernel_sizes)} entries but "
                f"model.conv_features has {len(self.conv_features)}; give one size per conv layer")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ConfigError(f"{chosen('model', 'cnn')} needs images [batch, height, width, "
                              f"channels]; the task gives inputs of shape {tuple(x.shape)}")
        for i, (features, size) in enumerate(zip(self.conv_features, self.kernel_sizes)):
            init = {"kernel_init": self.first_kernel_init} if i == 0 else {}
            conv = nn.Conv(features, kernel_size=(size, size), **init,
                           conv_general_dilated=conv_general_dilated)
            x = nn.relu(conv(x))
            if min(x.shape[1:3]) < self.pool_size:
                raise ConfigError(
                    f"{chosen('model', 'cnn')}: conv layer {i} gives {x.shape[1]}x{x.shape[2]} "
                    f"images, smaller than model.pool_size={self.pool_size}: use fewer "
                    f"model.conv_features, a smaller pool_size or larger images")
            x = max_pool(x, (self.pool_size, self.pool_size))
        x = x.reshape(x.shape[0], -1)
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.out_features)(x)
