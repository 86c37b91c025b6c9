"""A multilayer perceptron: Dense(128) -> relu -> Dense(out) by default (``model=mlp``);
``activation: null`` makes it the reference's linear model (``model=linear``)."""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from runner.config.errors import check_range
from runner.models.activations import get_activation
from runner.models.init import Init


class MLP(nn.Module):
    """Dense layers of ``features`` (each followed by ``activation``; None: none, a linear
    map), then Dense(out_features).

    Inputs with more than one feature axis (images) are flattened first. ``out_features``
    null: the task's output size (runner fills it in).
    """

    features: Sequence[int] = (128,)
    out_features: Optional[int] = None
    activation: Optional[str] = "relu"
    kernel_init: Init = Init("lecun_normal")
    bias_init: Init = Init("zeros_init")

    def __post_init__(self):
        check_range("model.features", self.features, gt=0)
        check_range("model.out_features", self.out_features, gt=0)
        get_activation(self.activation)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = get_activation(self.activation)
        x = jnp.reshape(x, (x.shape[0], -1))
        for width in self.features:
            x = act(nn.Dense(width, kernel_init=self.kernel_init, bias_init=self.bias_init)(x))
        return nn.Dense(self.out_features, kernel_init=self.kernel_init,
                        bias_init=self.bias_init)(x)
