"""A multilayer perceptron; the default is the reference's Dense(128) -> Dense(1)."""

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.activations import get_activation

Initializer = Callable[..., jax.Array]


class MLP(nn.Module):
    """Dense layers of ``features`` (each followed by ``activation``), then Dense(out_features).

    Inputs with more than one feature axis (images) are flattened first.
    """

    features: Sequence[int] = (128,)
    out_features: int = 1
    activation: Optional[str] = None
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        x = jnp.reshape(x, (x.shape[0], -1))
        for width in self.features:
            x = act(nn.Dense(width, kernel_init=self.kernel_init, bias_init=self.bias_init)(x))
        return nn.Dense(self.out_features, kernel_init=self.kernel_init,
                        bias_init=self.bias_init)(x)
