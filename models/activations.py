"""Activation functions named in configs (``model.activation=relu``), looked up in ``jax.nn``."""

from typing import Callable, Optional

import jax

from runner.config.errors import ConfigError

# Names in jax.nn that are elementwise activations (jax.nn also holds softmax, one_hot, ...).
ACTIVATIONS = ("relu", "gelu", "silu", "swish", "tanh", "sigmoid", "elu", "selu", "celu",
               "leaky_relu", "softplus", "relu6", "mish", "hard_tanh")


def get_activation(name: Optional[str]) -> Callable[[jax.Array], jax.Array]:
    """Return ``jax.nn.<name>``, or the identity for ``None`` (a purely linear network)."""
    if name is None:
        return lambda x: x
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation={name}: unknown; valid: null, "
                          f"{', '.join(ACTIVATIONS)}")
    return getattr(jax.nn, name)
