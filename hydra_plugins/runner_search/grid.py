"""``hydra.sweeper.sampler: {_target_: optuna.samplers.GridSampler}``: Optuna's grid sampler
needs the grid given to it; the sweeper builds it from ``hydra.sweeper.params`` (as
hydra-optuna-sweeper did), each key's discrete values, and the search ends at the grid's size.
Optuna is imported only when a grid is built (Hydra imports this module on every command)."""

import functools
import math
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.override_parser.types import Override

GRID = "optuna.samplers.GridSampler"


def is_grid(spec: Dict[str, Any]) -> bool:
    """Whether the sampler's config names Optuna's ``GridSampler``."""
    from hydra.utils import get_object

    try:
        target = get_object(str(spec.get("_target_")))
    except Exception:  # noqa: BLE001 (not a class at all: build_optuna names it)
        return False
    import optuna

    return target is optuna.samplers.GridSampler


def build(spec: Dict[str, Any], parsed: Sequence[Override], space: Dict[str, Any]):
    """The grid sampler of ``spec`` (its arguments but the grid) over the search space
    ``space`` (``space.distributions`` of the ``parsed`` overrides)."""
    from runner.config.errors import RunnerError, first_line

    if "search_space" in spec:
        raise RunnerError("hydra.sweeper.sampler.search_space: the grid is built from "
                          "hydra.sweeper.params; leave it out")
    arguments = {k: v for k, v in spec.items() if k != "_target_"}
    try:
        return sampler_class()(values(parsed, space), **arguments)
    except TypeError as err:
        raise RunnerError(f"hydra.sweeper.sampler._target_={GRID}: {first_line(err)} (its "
                          f"arguments: hydra.sweeper.sampler.<name>)") from None


def values(parsed: Sequence[Override], space: Dict[str, Any]) -> Dict[str, List[Any]]:
    """Each searched key's values: a choice's, a range's. An interval has none to list."""
    from optuna.distributions import CategoricalDistribution

    from runner.config.errors import RunnerError

    last = {override.get_key_element(): override for override in parsed}
    grid: Dict[str, List[Any]] = {}
    for key, distribution in space.items():
        if last[key].is_interval_sweep():
            raise RunnerError(f"{last[key].input_line}: optuna.samplers.GridSampler needs a "
                              f"key's values listed: choice(...), range(...) or a,b,c, not an "
                              f"interval")
        if isinstance(distribution, CategoricalDistribution):
            grid[key] = list(distribution.choices)
        else:  # an int range's IntDistribution
            grid[key] = list(range(distribution.low, distribution.high + 1, distribution.step))
    return grid


def n_trials(sampler: Any, given: Optional[int]) -> int:
    """The search's trials in all: ``hydra.sweeper.n_trials``, at most a grid's size (null: the
    grid's size; a search of another sampler has no end of its own)."""
    from runner.config.errors import RunnerError

    size = getattr(sampler, "grid_size", None)
    if size is None:
        if given is None:
            raise RunnerError("hydra.sweeper.n_trials=null: only a GridSampler's search ends "
                              "by itself; give the number of trials")
        return given
    return size if given is None else min(given, size)


@functools.lru_cache(maxsize=None)
def sampler_class() -> type:
    """Optuna's ``GridSampler``, but for its ``after_trial``: once the grid is done it calls
    ``Study.stop``, which raises outside ``Study.optimize`` (optuna/optuna#4121) where the
    sweeper asks and tells; the sweeper ends the search itself, at ``n_trials``. Made on first
    use, so that importing this module imports no Optuna."""
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        def __init__(self, search_space: Dict[str, List[Any]], seed: Optional[int] = None):
            super().__init__(search_space, seed=seed)
            self.grid_size = math.prod(len(v) for v in search_space.values())

        def after_trial(self, study, trial, state, values) -> None:
            """Nothing: the sweeper stops asking at the grid's size (``n_trials``)."""

    return GridSampler
