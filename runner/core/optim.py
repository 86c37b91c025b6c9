"""Optimizers from config: the optax factory named by ``_target_``, every numeric
hyperparameter injected into the optimizer state.

Because ``lr``, ``b1``, ``weight_decay``, ``clip_norm``... live in ``opt_state.hyperparams`` as
arrays rather than as constants of the compiled program, runs that differ only in them share
one compiled train step: the transformation a TrainState carries (part of the jit cache key)
is a ``Transformation``, equal for every optimizer of one *structure* (factory, schedule,
non-numeric arguments). The schedule only scales the peak lr.
"""

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import SET_BY_RUNNER, ConfigError, check_range
from runner.config.schema import OptimizerConf, Schedule, check_fields
from runner.config.targets import check, load_target

# Keys every optimizer config has (runner.config.schema.OptimizerConf); all other keys are the optax
# factory's own arguments.
COMMON_KEYS = tuple(f.name for f in dataclasses.fields(OptimizerConf))
# An optimizer config's schema: the optax factory's own arguments, less the lr (runner's: the
# schedule scales it), after runner's common keys (runner.config.targets.signature_schema, check).
SCHEMA = {"skip": tuple(SET_BY_RUNNER["optimizer"]), "base": OptimizerConf}
# Ranges of optax's usual argument names (optax checks none of them).
RANGES = {"b1": dict(ge=0, le=1), "b2": dict(ge=0, le=1), "decay": dict(ge=0, le=1),
          "momentum": dict(ge=0, le=1), "eps": dict(ge=0), "eps_root": dict(ge=0),
          "weight_decay": dict(ge=0)}


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the peak learning rate at a step (hashable: a static jit argument)."""

    kind: Schedule
    total_steps: int
    warmup_steps: int = 0

    def __call__(self, step: jax.Array) -> jax.Array:
        if self.kind == Schedule.constant:
            return jnp.ones_like(step, dtype=jnp.float32)
        if self.kind == Schedule.cosine:
            return optax.cosine_decay_schedule(1.0, self.total_steps)(step)
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, self.warmup_steps, self.total_steps, end_value=0.0)(step)


@dataclasses.dataclass(frozen=True)
class Transformation:
    """An optax transformation (``init``, ``update``) equal for equal structures: ``factory``
    wrapped by ``inject_hyperparams``, with the ``static`` (non-numeric) arguments baked in and
    the ``numeric`` ones read from ``opt_state.hyperparams``. (optax's own objects compare by
    identity, so two jobs' transformations would key two compilations.)"""

    factory: str
    schedule: LRSchedule
    static: Tuple[Tuple[str, Any], ...]
    numeric: Tuple[Tuple[str, type], ...]

    def transformation(self, values: Optional[Dict[str, Any]] = None
                       ) -> optax.GradientTransformation:
        """The optax transformation with these hyperparameter ``values`` (numbers or traced
        arrays; a missing one is a placeholder, for ``update``, which reads the state's)."""
        build = _scheduled(load_target(self.factory, "optimizer"), self.schedule)
        numeric = {name: (values or {}).get(name, kind(1)) for name, kind in self.numeric}
        return optax.inject_hyperparams(build)(**dict(self.static), **numeric)

    def init(self, params) -> optax.OptState:
        return self.transformation().init(params)

    def update(self, updates, state, params=None):
        return self.transformation().update(updates, state, params)


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What a run needs of its optimizer.

    ``tx`` steps the state: equal-structured optimizers have equal ones (one compiled step).
    ``schedule`` gives the lr in use: ``opt_state.hyperparams["learning_rate"] * schedule(step)``.
    ``hyperparams`` are this run's numeric hyperparameters (``opt_state.hyperparams``' keys).
    """

    tx: Transformation
    schedule: LRSchedule
    hyperparams: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def init(self, params) -> optax.OptState:
        """This run's initial optimizer state, holding its hyperparameter values."""
        return self.tx.transformation(self.hyperparams).init(params)


def make_optimizer(cfg: DictConfig, *, total_steps: int) -> Optimizer:
    """Build ``clip_by_global_norm(clip_norm)`` (when set) then the optax optimizer."""
    cfg = check(cfg, "optimizer", **SCHEMA)
    check_fields(OptimizerConf, cfg, "optimizer.")
    schedule = LRSchedule(Schedule(cfg.schedule), total_steps, cfg.warmup_steps)
    if schedule.kind == Schedule.warmup_cosine and not 0 < cfg.warmup_steps < total_steps:
        raise ConfigError(f"optimizer.warmup_steps={cfg.warmup_steps}: warmup_cosine needs "
                          f"0 < warmup_steps < trainer.steps={total_steps}")
    own = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
           if k not in COMMON_KEYS}
    for name, bounds in RANGES.items():
        if isinstance(own.get(name), (int, float)):
            check_range(f"optimizer.{name}", own[name], **bounds)
    hparams: Dict[str, Any] = dict(learning_rate=cfg.lr, max_grad_norm=cfg.clip_norm, **own)
    # As inject_hyperparams sorts them: numbers become state, anything else (None, bools) is
    # baked into the transformation and so belongs to its structure.
    numeric = {k: v for k, v in hparams.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tx = Transformation(cfg._target_, schedule,
                        tuple(sorted((k, _hashable(v)) for k, v in hparams.items()
                                     if k not in numeric)),
                        tuple(sorted((k, type(v)) for k, v in numeric.items())))
    return Optimizer(tx=tx, schedule=schedule, hyperparams=numeric)


def _hashable(value: Any) -> Any:
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


def _scheduled(factory: Callable[..., optax.GradientTransformation],
               schedule: LRSchedule) -> Callable[..., optax.GradientTransformation]:
    """Wrap ``factory`` so that its lr follows ``schedule`` and gradients are clipped first.

    The wrapper takes the factory's own keyword arguments plus ``max_grad_norm``;
    ``inject_hyperparams`` reads that signature to decide which arguments to inject.
    """

    def build(learning_rate, max_grad_norm: Optional[float] = None, **kwargs):
        tx = factory(learning_rate=lambda count: learning_rate * schedule(count), **kwargs)
        if max_grad_norm is None:
            return tx
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)

    params = list(inspect.signature(factory).parameters.values())
    clip = inspect.Parameter("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None)
    build.__signature__ = inspect.Signature([*params, clip])
    return build
