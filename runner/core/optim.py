"""Optimizers from config: the optax factory named by ``_target_``, every numeric
hyperparameter injected into the optimizer state.

Because ``lr``, ``b1``, ``weight_decay``, ``clip_norm``, a chain's numbers and a ``_target_``
schedule's values live in the optimizer state as arrays rather than as constants of the
compiled program, runs that differ only in them share one compiled train step: the
transformation a TrainState carries (part of the jit cache key) is a ``Transformation``, equal
for every optimizer of one *structure* (factory, schedule kind, accumulation, non-numeric
arguments). The schedule scales the peak lr (``runner.core.schedules``); the factory's own
arguments, nested transforms and the weight-decay mask are ``runner.core.transforms``'.
"""

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
import optax
from flax import serialization
from omegaconf import DictConfig, OmegaConf

from runner.config.errors import SET_BY_RUNNER, ConfigError, check_range
from runner.config.schema import OptimizerConf, check_fields
from runner.config.targets import check
from runner.core.schedules import VALUES, LRSchedule, make_schedule, values
from runner.core.transforms import DecayMask, Transform, mask_error, split, takes_mask, uses_mask

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
class Transformation:
    """The run's optax transformation (``init``, ``update``) as a value, equal for equal
    structures: the factory's ``Transform`` (``static`` arguments baked in, ``numeric`` ones
    read from ``opt_state.hyperparams``), its lr following ``schedule`` (the one static
    schedule a run has: the train step reads the lr in use through ``learning_rate``), and
    with ``accumulate_steps``, ``optax.MultiSteps`` around it all. (optax's own objects compare
    by identity, so two jobs' transformations would key two compilations.)"""

    factory: str
    schedule: LRSchedule
    static: tuple
    numeric: tuple
    accumulate_steps: Optional[int] = None

    def transformation(self, values: Optional[Dict[str, Any]] = None
                       ) -> optax.GradientTransformation:
        """The optax transformation with these hyperparameter ``values`` (numbers or traced
        arrays; a missing one is a placeholder, for ``update``, which reads the state's)."""
        wrap = functools.partial(_scheduled, schedule=self.schedule,
                                 accumulate=self.accumulate_steps or 1)
        tx = Transform(self.factory, self.static, self.numeric).transformation(values, wrap=wrap)
        if self.accumulate_steps:
            tx = optax.MultiSteps(tx, every_k_schedule=self.accumulate_steps
                                  ).gradient_transformation()
        return tx

    def init(self, params) -> optax.OptState:
        return self.transformation().init(params)

    def update(self, updates, state, params=None):
        return self.transformation().update(updates, state, params)

    def learning_rate(self, opt_state: optax.OptState, step: jax.Array) -> jax.Array:
        """The lr of the update at (micro-)step ``step``: ``optimizer.lr`` times the schedule
        at the step that update's accumulation began."""
        hyperparams = self.hyperparams(opt_state)
        if self.accumulate_steps:
            step = step // self.accumulate_steps * self.accumulate_steps
        return hyperparams["learning_rate"] * self.schedule(step, hyperparams.get(VALUES))

    def hyperparams(self, opt_state: optax.OptState) -> Dict[str, jax.Array]:
        """The factory's injected hyperparameters in ``opt_state``."""
        return (opt_state.inner_opt_state if self.accumulate_steps else opt_state).hyperparams


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What a run needs of its optimizer.

    ``tx`` steps the state: equal-structured optimizers have equal ones (one compiled step).
    ``hyperparams`` are this run's numbers (the values ``tx`` injects into the state), with a
    ``_target_`` schedule's values, computed on first use (once JAX is configured).
    """

    tx: Transformation
    numbers: Dict[str, Any] = dataclasses.field(default_factory=dict)
    schedule_fn: Optional[Callable] = None

    @functools.cached_property
    def hyperparams(self) -> Dict[str, Any]:
        if self.schedule_fn is None:
            return dict(self.numbers)
        return {**self.numbers, VALUES: values(self.schedule_fn, self.tx.schedule.total_steps)}

    def init(self, params) -> optax.OptState:
        """This run's initial optimizer state, holding its hyperparameter values."""
        return self.tx.transformation(self.hyperparams).init(params)


def make_optimizer(cfg: DictConfig, *, total_steps: int) -> Optimizer:
    """Build the optax optimizer: ``clip_by_global_norm(clip_norm)`` (when set), the factory
    with its lr following the schedule (a weight-decay ``mask`` from ``decay_exclude``), and
    ``optax.MultiSteps`` around them (``accumulate_steps``)."""
    cfg = check(cfg, "optimizer", **SCHEMA)
    check_fields(OptimizerConf, cfg, "optimizer.")
    schedule, schedule_fn = make_schedule(cfg, total_steps=total_steps)
    own = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
           if k not in COMMON_KEYS}
    for name, bounds in RANGES.items():
        if isinstance(own.get(name), (int, float)):
            check_range(f"optimizer.{name}", own[name], **bounds)
    mask = DecayMask(tuple(cfg.decay_exclude)) if cfg.decay_exclude else None
    if mask is not None and takes_mask(cfg._target_, "optimizer"):
        if own.get("mask") is not None:
            raise ConfigError("optimizer.mask: set by optimizer.decay_exclude; give one of them")
        own["mask"] = mask
    static, numeric, numbers = split(
        dict(learning_rate=cfg.lr, max_grad_norm=cfg.clip_norm, **own), "optimizer", mask)
    if mask is not None and not uses_mask(static):
        raise mask_error(cfg._target_)
    if schedule_fn is not None:  # its values: computed on first use (Optimizer.hyperparams)
        numeric = (*numeric, (VALUES, float))
    accumulate = cfg.accumulate_steps if (cfg.accumulate_steps or 1) > 1 else None
    tx = Transformation(cfg._target_, schedule, static, numeric, accumulate)
    return Optimizer(tx=tx, numbers=numbers, schedule_fn=schedule_fn)


def with_hyperparams(opt_state: optax.OptState, source: optax.OptState) -> optax.OptState:
    """``opt_state`` (a restored one) with the injected hyperparameters of ``source`` (this
    config's), wherever in the state they are (a chain's transforms, inside MultiSteps)."""
    def injected(node):
        return isinstance(node, optax.InjectStatefulHyperparamsState)

    return jax.tree.map(lambda old, new: old._replace(hyperparams=new.hyperparams)
                        if injected(old) else old, opt_state, source, is_leaf=injected)


def with_schedule_length(state: Any, saved: bytes) -> Any:
    """``state`` (a template to restore into) with its ``_target_`` schedule's values as long
    as those in the checkpoint bytes ``saved``: they are this config's, never learned (the
    restored state takes them anew: ``with_hyperparams``), and a resume may change
    ``trainer.steps``, their length. ``state`` as it is where either holds none."""
    try:
        length = _saved_length(serialization.msgpack_restore(saved))
    except Exception:  # noqa: BLE001 (a torn file: restoring it names the problem)
        length = None
    if length is None:
        return state

    def resize(path, leaf):
        named = getattr(path[-1], "key", None) if path else None
        return np.zeros(length, np.float32) if named == VALUES else leaf

    return jax.tree_util.tree_map_with_path(resize, state)


def _saved_length(saved: Any) -> Optional[int]:
    if not isinstance(saved, dict):
        return None
    if VALUES in saved:
        return int(np.shape(saved[VALUES])[0])
    return next((n for n in map(_saved_length, saved.values()) if n is not None), None)


def _scheduled(factory: Callable[..., optax.GradientTransformation], *, schedule: LRSchedule,
               accumulate: int) -> Callable[..., optax.GradientTransformation]:
    """Wrap ``factory`` so that its lr follows ``schedule`` and gradients are clipped first.

    The wrapper takes the factory's own keyword arguments plus ``max_grad_norm`` and the
    schedule's values; ``inject_hyperparams`` reads that signature to decide which arguments to
    inject. Under accumulation the factory counts optimizer steps, the schedule micro-steps.
    """

    def build(learning_rate, max_grad_norm: Optional[float] = None, schedule_values=None,
              **kwargs):
        def lr(count):
            return learning_rate * schedule(count * accumulate if accumulate > 1 else count,
                                            schedule_values)

        tx = factory(learning_rate=lr, **kwargs)
        if max_grad_norm is None:
            return tx
        return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)

    params = list(inspect.signature(factory).parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
             for name in ("max_grad_norm", VALUES)]
    build.__signature__ = inspect.Signature([*params, *extra])
    return build
