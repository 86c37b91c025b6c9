"""The reference's CNN: (Conv -> relu -> max pool) per conv layer, flatten, Dense -> relu, Dense."""

from typing import Callable, Sequence

import flax.linen as nn
import jax

from models.conv import conv_general_dilated
from models.pooling import max_pool
from runner.errors import ConfigError

Initializer = Callable[..., jax.Array]


class CNN(nn.Module):
    """Conv stack over NHWC images with a dense head; defaults give 3,689,034 parameters on
    84x84x3 inputs. The first conv uses ``first_kernel_init`` (the reference: orthogonal(sqrt 2)).
    """

    conv_features: Sequence[int] = (64, 128)
    kernel_sizes: Sequence[int] = (3, 3)
    pool_size: int = 2
    dense_features: Sequence[int] = (64,)
    num_classes: int = 10
    first_kernel_init: Initializer = nn.initializers.orthogonal(2**0.5)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ConfigError(f"model=cnn needs images [batch, height, width, channels]; the "
                              f"task gives inputs of shape {tuple(x.shape)}")
        if len(self.kernel_sizes) != len(self.conv_features):
            raise ConfigError(
                f"model.kernel_sizes has {len(self.kernel_sizes)} entries but "
                f"model.conv_features has {len(self.conv_features)}; give one size per conv layer")
        for i, (features, size) in enumerate(zip(self.conv_features, self.kernel_sizes)):
            init = {"kernel_init": self.first_kernel_init} if i == 0 else {}
            conv = nn.Conv(features, kernel_size=(size, size), **init,
                           conv_general_dilated=conv_general_dilated)
            x = nn.relu(conv(x))
            x = max_pool(x, (self.pool_size, self.pool_size))
        x = x.reshape(x.shape[0], -1)
        for features in self.dense_features:
            x = nn.relu(nn.Dense(features)(x))
        return nn.Dense(self.num_classes)(x)
