"""Count and time compilations per jitted function, from JAX's own monitoring events."""

import collections
from typing import Tuple

import jax

# Events JAX records (jax/_src/dispatch.py, pxla.py) while turning a jitted call into an
# executable: tracing, lowering to MLIR and the XLA compilation itself (once per compile).
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"  # a persistent-cache hit (compiler.py)
_counts: collections.Counter = collections.Counter()
_seconds: collections.Counter = collections.Counter()


def _on_duration(event: str, duration: float, *, fun_name: str = "", **_) -> None:
    if event in (_TRACE, _LOWER, _COMPILE):
        name = fun_name[4:-1] if fun_name.startswith("jit(") else fun_name
        _seconds[name] += duration
        _counts[name] += event == _COMPILE


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT:
        _counts[_CACHE_HIT] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def compile_stats(fun_name: str) -> Tuple[int, float]:
    """(XLA compilations, seconds spent tracing, lowering and compiling) of the jitted
    function named ``fun_name``, so far in this process."""
    return _counts[fun_name], _seconds[fun_name]


def cache_hits() -> int:
    """Executables loaded from JAX's persistent compilation cache so far in this process."""
    return _counts[_CACHE_HIT]
