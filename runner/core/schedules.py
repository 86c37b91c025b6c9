"""Learning-rate schedules: multipliers of the peak ``optimizer.lr`` at a step.

``optimizer.schedule`` is a name (``constant``, ``cosine``, ``warmup_cosine``: computed in the
step from ``trainer.steps`` and ``optimizer.warmup_steps``) or a ``_target_`` node: any
function returning an optax schedule (``optax.exponential_decay``, ``optax.join_schedules`` of
nested ones, a user's own), called with the node's keys. A ``_target_`` schedule is evaluated
once, on the host, at every step of the run (``0..trainer.steps``); those values travel in the
optimizer state (``opt_state.hyperparams["schedule_values"]``) and the step reads the value at
its count. So a sweep over a schedule's numbers (``decay_rate``, warmup lengths, even the
schedule function itself) compiles one step: a schedule's only static part is its length.
"""

import dataclasses
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from omegaconf import DictConfig

from runner.config.errors import ConfigError, first_line
from runner.config.schema import Schedule
from runner.config.targets import build, check

KEY = "optimizer.schedule"
# opt_state.hyperparams' key of a _target_ schedule's values (one per step)
VALUES = "schedule_values"


@dataclasses.dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the peak learning rate at a step (hashable: a static jit argument).
    ``kind`` None: the values given (a ``_target_`` schedule's, ``tabulate``), clamped to the
    last one past the end."""

    kind: Optional[Schedule]
    total_steps: int
    warmup_steps: int = 0

    def __call__(self, step: jax.Array, values: Optional[jax.Array] = None) -> jax.Array:
        if self.kind is None:
            return values[jnp.clip(step, 0, values.shape[0] - 1)]
        if self.kind == Schedule.constant:
            return jnp.ones_like(step, dtype=jnp.float32)
        if self.kind == Schedule.cosine:
            return optax.cosine_decay_schedule(1.0, self.total_steps)(step)
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, self.warmup_steps, self.total_steps, end_value=0.0)(step)


def make_schedule(cfg: DictConfig, *, total_steps: int) -> Tuple[LRSchedule, Optional[Callable]]:
    """The optimizer config ``cfg``'s ``LRSchedule`` and, for a ``_target_`` schedule, the
    schedule function it builds (checked now: its import, its keys, the call; its values are
    computed later, once JAX is configured: ``values``)."""
    node = cfg.schedule
    if isinstance(node, DictConfig):
        schedule_fn = build(check(node, KEY), KEY)
        if not callable(schedule_fn):
            raise ConfigError(f"{KEY} ({node._target_}): returned "
                              f"{type(schedule_fn).__name__}, not a schedule (a function of "
                              f"the step)")
        return LRSchedule(None, total_steps), schedule_fn
    try:
        kind = Schedule(node)
    except ValueError:
        raise ConfigError(f"{KEY}={node}: not a schedule; use one of "
                          f"{', '.join(s.value for s in Schedule)}, or a _target_ "
                          f"(optimizer/schedule=<name>: conf/optimizer/schedule/)") from None
    if kind == Schedule.warmup_cosine and not 0 < cfg.warmup_steps < total_steps:
        raise ConfigError(f"optimizer.warmup_steps={cfg.warmup_steps}: warmup_cosine needs "
                          f"0 < warmup_steps < trainer.steps={total_steps}")
    return LRSchedule(kind, total_steps, cfg.warmup_steps), None


def values(schedule_fn: Callable, total_steps: int) -> np.ndarray:
    """``schedule_fn`` at steps ``0..total_steps`` (float32), or one line naming
    ``optimizer.schedule`` where the call fails or does not give one finite number a step."""
    steps = np.arange(total_steps + 1)
    name = getattr(schedule_fn, "__qualname__", type(schedule_fn).__name__)
    try:
        result = np.asarray(schedule_fn(jnp.asarray(steps)), dtype=np.float32)
    except Exception as err:  # noqa: BLE001 (whatever a user's schedule raises)
        raise ConfigError(f"{KEY}: {name} failed at steps 0..{total_steps}: "
                          f"{first_line(err)}") from None
    if result.ndim == 0:  # a constant
        result = np.full(steps.shape, result, dtype=np.float32)
    if result.shape != steps.shape or not np.all(np.isfinite(result)):
        raise ConfigError(f"{KEY}: {name} gave values of shape {result.shape}, not one finite "
                          f"number per step 0..{total_steps}")
    return result
