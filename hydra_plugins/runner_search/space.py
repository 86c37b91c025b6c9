"""A search space from Hydra's override grammar, as hydra-optuna-sweeper reads it, mapped to
Optuna's distributions; and a trial's parameters back to a job's overrides.

| override | distribution |
|---|---|
| ``interval(a, b)`` | ``FloatDistribution(a, b)`` (``int(interval(a, b))``: ``IntDistribution``) |
| ``tag(log, interval(a, b))`` | the same with ``log=True`` |
| ``range(a, b, s)`` of ints | ``IntDistribution(a, last, step=s)`` (``b`` left out, as Hydra's) |
| ``range`` of floats | ``CategoricalDistribution`` of its values (``shuffle(...)``: the same) |
| ``choice(x, y)``, ``x,y`` | ``CategoricalDistribution`` (lists and dicts as their override text) |
| ``x`` | fixed: the same value for every trial |
"""

from typing import Any, Dict, List, Sequence, Tuple

from hydra.core.override_parser.types import Override, Transformer
from hydra.errors import HydraException


def distributions(overrides: Sequence[Override]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The search space (name -> Optuna distribution) and the fixed overrides (name -> value
    text) of parsed ``overrides``; a key given twice keeps its last value."""
    space: Dict[str, Any] = {}
    fixed: Dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def distribution(override: Override):
    """One sweep override's Optuna distribution."""
    from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                      IntDistribution)

    value = override.value()
    if getattr(value, "shuffle", False):  # a sampler draws in its own order: as written
        value.shuffle = False
    if override.is_interval_sweep():
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    if override.is_range_sweep() and all(
            isinstance(v, int) for v in (value.start, value.stop, value.step)):
        values = list(range(value.start, value.stop, value.step))
        if not values:
            raise HydraException(f"{override.input_line}: an empty range")
        return IntDistribution(min(values), max(values), step=abs(value.step))
    if override.is_discrete_sweep():
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        return CategoricalDistribution(choices)
    raise HydraException(f"{override.input_line}: hydra/sweeper=search takes interval(...), "
                         f"range(...), choice(...) or a,b,c, not this sweep")


def overrides(params: Dict[str, Any], fixed: Dict[str, str]) -> List[str]:
    """A trial's job overrides: its parameters' values, then the fixed ones."""
    return [*(f"{key}={text(value)}" for key, value in params.items()),
            *(f"{key}={value}" for key, value in fixed.items())]


def text(value: Any) -> str:
    """A parameter's value as override text (a categorical list's text is already one)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
