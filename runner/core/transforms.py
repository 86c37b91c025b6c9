"""Optax transformations from config, with their numbers in the optimizer state.

A factory's arguments split in two: the numbers (``b1``, ``weight_decay``, ``max_norm``...) are
injected into its state (``optax.inject_hyperparams``), everything else (bools, None, a mask,
nested transformations) is its *structure*, baked into the program. ``Transform`` holds a call
as a hashable value, equal for equal structures: so optimizers that differ only in numbers
share one compiled step, and a fused sweep trains them together.

``chain`` is the factory of ``optimizer=chain``: the transforms a config lists (each a
``_target_`` node), then runner's lr scaling. ``DecayMask`` spares parameters from weight
decay by their path (``optimizer.decay_exclude``).
"""

import dataclasses
import fnmatch
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import optax
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import ConfigError
from runner.config.targets import check, load_target, parameters


@dataclasses.dataclass(frozen=True)
class DecayMask:
    """``mask`` for a weight-decaying factory: True (decay) for every parameter whose path
    (its '/'-joined names, ``Dense_0/kernel``) matches none of ``exclude``; a pattern (glob:
    ``*``, ``?``, ``[...]``) matches the whole path or its last name (``bias``)."""

    exclude: Tuple[str, ...]

    def __call__(self, params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not self.excluded(jax.tree_util.keystr(path, simple=True,
                                                                   separator="/")), params)

    def excluded(self, path: str) -> bool:
        last = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(last, p)
                   for p in self.exclude)


def chain(learning_rate: Any, transforms: Sequence[Any] = ()) -> optax.GradientTransformation:
    """``optax.chain`` of ``transforms`` (built from ``optimizer.transforms``), then the
    updates scaled by ``-learning_rate`` (runner's: ``optimizer.lr`` times the schedule)."""
    return optax.chain(*transforms, optax.scale_by_learning_rate(learning_rate))


@dataclasses.dataclass(frozen=True)
class Transform:
    """A ``_target_`` factory's call as a value: its ``static`` arguments (nested ``Transform``s
    among them) baked in, its ``numeric`` ones (name, type) read from its state."""

    factory: str
    static: Tuple[Tuple[str, Any], ...]
    numeric: Tuple[Tuple[str, type], ...]

    def transformation(self, values: Optional[Dict[str, Any]] = None, *,
                       wrap=None) -> optax.GradientTransformation:
        """The transformation with these ``values`` (numbers or traced arrays, nested like
        the arguments; a missing one is a placeholder, for ``update``, which reads the state's).
        ``wrap`` adapts the factory first (runner's lr schedule and clipping)."""
        values = values or {}
        factory = load_target(self.factory, "optimizer")
        static = {k: built(v, values.get(k)) for k, v in self.static}
        numeric = {name: values.get(name, kind(1)) for name, kind in self.numeric}
        return optax.inject_hyperparams((wrap or (lambda f: f))(factory),
                                        static_args=tuple(static))(**static, **numeric)


def built(value: Any, values: Any) -> Any:
    """A static argument as the factory takes it: nested transforms built (with their
    ``values``), anything else as it is."""
    if isinstance(value, Transform):
        return value.transformation(values)
    if isinstance(value, tuple) and value and all(isinstance(v, Transform) for v in value):
        return tuple(t.transformation(v) for t, v in zip(value, values or [None] * len(value)))
    return value


def split(arguments: Dict[str, Any], key: str, mask: Optional[DecayMask]
          ) -> Tuple[Tuple[Tuple[str, Any], ...], Tuple[Tuple[str, type], ...], Dict[str, Any]]:
    """``(static, numeric, values)`` of a factory's ``arguments``: numbers become state, as
    ``inject_hyperparams`` sorts them; ``_target_`` nodes (alone or in a list) become nested
    ``Transform``s, checked against their factories and named ``key.<name>[.<i>]`` in errors."""
    static, values = {}, {}
    for name, value in arguments.items():
        if isinstance(value, dict) and "_target_" in value:
            static[name], values[name] = nested(value, f"{key}.{name}", mask)
        elif (isinstance(value, list) and value
              and all(isinstance(v, dict) and "_target_" in v for v in value)):
            pairs = [nested(v, f"{key}.{name}.{i}", mask) for i, v in enumerate(value)]
            static[name] = tuple(t for t, _ in pairs)
            values[name] = tuple(v for _, v in pairs)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            values[name] = value
        else:
            static[name] = tuple(value) if isinstance(value, list) else value
    numeric = tuple(sorted((k, type(v)) for k, v in values.items() if k not in static))
    return tuple(sorted(static.items())), numeric, values


def nested(node: Dict[str, Any], key: str, mask: Optional[DecayMask]):
    """A ``_target_`` node's ``Transform`` and its values; ``mask`` given to a factory that
    takes one (``optax.add_decayed_weights``)."""
    cfg = check(OmegaConf.create(node) if not isinstance(node, DictConfig) else node, key)
    arguments = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
                 if k != "_target_"}
    if mask is not None and "mask" in takes_mask(cfg._target_, key):
        arguments["mask"] = mask
    static, numeric, values = split(arguments, key, mask)
    return Transform(cfg._target_, static, numeric), values


def takes_mask(path: str, key: str) -> Tuple[str, ...]:
    """``("mask",)`` when the factory ``path`` takes a ``mask`` argument, else ``()``."""
    return ("mask",) if "mask" in parameters(load_target(path, key)) else ()


def uses_mask(static: Tuple[Tuple[str, Any], ...]) -> bool:
    """Whether a ``DecayMask`` is among these static arguments, or their nested transforms'."""
    for _, value in static:
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, DecayMask) or (isinstance(item, Transform)
                                               and uses_mask(item.static)):
                return True
    return False


def mask_error(factory: str) -> ConfigError:
    return ConfigError(f"optimizer.decay_exclude: {factory} takes no mask (no weight decay to "
                       f"spare); use optimizer=adamw, or a chain with optax.add_decayed_weights")
