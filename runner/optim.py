"""Optimizers from config: the optax factory named by ``_target_``, every numeric
hyperparameter injected into the optimizer state.

Because ``lr``, ``b1``, ``weight_decay``, ``clip_norm``... live in ``opt_state.hyperparams`` as
arrays rather than as constants of the compiled program, runs that differ only in them share
one compiled train step: the transformation a TrainState carries (part of the jit cache key)
is one object per optimizer *structure* in this process. The schedule only scales the peak lr.
"""

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from hydra.utils import instantiate
from omegaconf import DictConfig

from runner.errors import ConfigError
from runner.schema import Schedule

# Keys every optimizer config has; all other keys are the optax factory's own arguments.
COMMON_KEYS = ("_target_", "lr", "schedule", "warmup_steps", "clip_norm")


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
class Optimizer:
    """What a run needs of its optimizer.

    ``tx`` steps the state: equal-structured optimizers share it, so it keys one compiled step.
    ``init`` makes this run's initial optimizer state, holding this run's hyperparameter values.
    ``schedule`` gives the lr in use: ``opt_state.hyperparams["learning_rate"] * schedule(step)``.
    ``hyperparams`` are this run's numeric hyperparameters (``opt_state.hyperparams``' keys).
    """

    tx: optax.GradientTransformation
    init: Callable[[Any], optax.OptState]
    schedule: LRSchedule
    hyperparams: Dict[str, Any] = dataclasses.field(default_factory=dict)


# One transformation per optimizer structure (factory, schedule, static arguments) per process.
_SHARED_TX: Dict[Tuple, optax.GradientTransformation] = {}


def make_optimizer(cfg: DictConfig, *, total_steps: int) -> Optimizer:
    """Build ``clip_by_global_norm(clip_norm)`` (when set) then the optax optimizer."""
    schedule = LRSchedule(Schedule(cfg.schedule), total_steps, cfg.warmup_steps)
    if schedule.kind == Schedule.warmup_cosine and not 0 < cfg.warmup_steps < total_steps:
        raise ConfigError(f"optimizer.warmup_steps={cfg.warmup_steps}: warmup_cosine needs "
                          f"0 < warmup_steps < trainer.steps={total_steps}")
    own = {k: v for k, v in cfg.items() if k not in COMMON_KEYS}
    factory = instantiate({"_target_": cfg._target_}, _partial_=True).func
    build = _scheduled(factory, schedule)
    hparams: Dict[str, Any] = dict(learning_rate=cfg.lr, max_grad_norm=cfg.clip_norm, **own)
    tx = optax.inject_hyperparams(build)(**hparams)
    # As inject_hyperparams sorts them: numbers become state, anything else (None, bools) is
    # baked into the transformation and so belongs to its structure.
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    structure = (cfg._target_, schedule,
                 tuple(sorted((k, v) for k, v in hparams.items() if not numeric(v))),
                 tuple(sorted(k for k, v in hparams.items() if numeric(v))))
    return Optimizer(tx=_SHARED_TX.setdefault(structure, tx), init=tx.init, schedule=schedule,
                     hyperparams={k: v for k, v in hparams.items() if numeric(v)})


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

