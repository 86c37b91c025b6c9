"""Initializers named in configs (``model.kernel_init.name=orthogonal``): flax's own
(``flax.linen.initializers``), as values that compare equal for equal settings, so that
models built from equal configs are equal and share one compiled step."""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from runner.config.errors import ConfigError

# The initializers of flax.linen.initializers a config may name, with the argument each takes.
INITIALIZERS = {"lecun_normal": (), "he_normal": (), "xavier_uniform": (), "zeros_init": (),
                "ones_init": (), "orthogonal": ("scale",), "normal": ("stddev",),
                "truncated_normal": ("stddev",), "uniform": ("scale",), "constant": ("value",)}


@dataclasses.dataclass(frozen=True)
class Init:
    """``flax.linen.initializers.<name>``, called with the arguments set here (a null one
    keeps flax's default): ``scale`` (orthogonal, uniform), ``stddev`` (normal,
    truncated_normal), ``value`` (constant)."""

    name: str = "lecun_normal"
    scale: Optional[float] = None
    stddev: Optional[float] = None
    value: Optional[float] = None

    def __post_init__(self):
        if self.name not in INITIALIZERS:
            raise ConfigError(f"initializer name={self.name}: unknown; valid: "
                              f"{', '.join(INITIALIZERS)}")
        for arg in ("scale", "stddev", "value"):
            if getattr(self, arg) is not None and arg not in INITIALIZERS[self.name]:
                raise ConfigError(f"initializer {self.name} takes no {arg} (it takes: "
                                  f"{', '.join(INITIALIZERS[self.name]) or 'nothing'})")

    def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        args = {a: getattr(self, a) for a in INITIALIZERS[self.name]
                if getattr(self, a) is not None}
        return getattr(nn.initializers, self.name)(**args)(key, shape, dtype)
