"""The host loop of a fused group: one dispatch of one program trains every member; after it,
each member's own periodic work runs on its slice of the states and metrics (its
``HostLoop``'s actions: logging, eval, checkpoints into its own run dir).

A member whose loss or gradient norm goes non-finite fails (the one-line reason a single run
gives) and its updates stop: the program keeps its state as it was (``alive`` masks it) while
the others go on. SIGTERM/SIGINT checkpoints every member and marks each interrupted.
"""

import contextvars
import functools
import logging
import time
from typing import Any, Dict, List, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from runner.loop.host import HostLoop, check_finite
from runner.platform.preemption import StopRequest
from runner.core.steps import train_steps

log = logging.getLogger(__name__)
# The run dir of the member whose work is being done, for its own runner.log (None: the
# whole group's work).
MEMBER: contextvars.ContextVar = contextvars.ContextVar("member", default=None)
COMPILED_NAME = "train_steps_fused"


@functools.partial(jax.jit, static_argnames=("options",), donate_argnames=("states",))
def train_steps_fused(states, data, rngs, alive, *, options):
    """``train_steps`` of every member in one program (``options``: its static arguments, as
    sorted (name, value) pairs); a member not ``alive`` keeps its state. On accelerators the
    members are batched (``jax.vmap``); on the CPU they run one after another inside the
    program (``lax.map``): XLA:CPU runs a batch of small matmuls no faster than one after
    another, and a batch of convolutions slower (a grouped convolution), while each member's
    own kernels are a single run's."""
    kwargs = dict(options)
    batched = kwargs.pop("batched")

    def step(s, d, r):
        return train_steps(s, d, r, **kwargs)

    if batched:
        new, metrics = jax.vmap(step)(states, data, rngs)
    else:
        new, metrics = jax.lax.map(lambda args: step(*args), (states, data, rngs))

    def keep(n, o):
        return jnp.where(alive.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(keep, new, states), metrics


def group_key(loop: HostLoop) -> Any:
    """Everything that shapes a run's compiled program and its host loop's cadence: runs with
    equal keys train as one program. A run on several devices or processes runs alone."""
    mesh = loop.options.mesh
    if (mesh is not None and mesh.size > 1) or jax.process_count() > 1:
        log.info("a run on %d devices trains alone: fused members share one device "
                 "(device.num_devices=1)", mesh.size if mesh is not None else 1)
        return ("alone", id(loop))
    arrays = (loop.state, loop.data, loop.rng)
    return (loop.task, loop.state.apply_fn, loop.state.tx, loop.schedule, loop.chunk,
            loop.windows, loop.step, OmegaConf.to_yaml(loop.trainer),
            loop.options._replace(mesh=None), jax.tree.structure(arrays),
            tuple((np.shape(a), str(a.dtype)) for a in jax.tree.leaves(arrays)))


def free_memory() -> Optional[int]:
    """Bytes free on the device a fused group runs on; None where JAX does not say (CPU)."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def split_to_fit(loops: List[HostLoop]) -> List[List[HostLoop]]:
    """``loops`` in groups whose fused program fits the device's free memory: the program is
    compiled for the whole group first (``memory_analysis``), and a group that would not fit
    is halved until it does, each split logged."""
    free = free_memory()
    if free is None or len(loops) == 1:
        return [loops]
    options = _options(loops[0])
    size = len(loops)

    def stacked(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((size, *np.shape(a)), a.dtype), tree)

    first = loops[0]
    memory = train_steps_fused.lower(
        stacked(first.state), stacked(first.data), stacked(first.rng),
        jax.ShapeDtypeStruct((size,), jnp.bool_), options=options).compile().memory_analysis()
    need = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    if need <= free:
        return [loops]
    log.info("a fused group of %d jobs needs %.0f MiB, the device has %.0f MiB free: split "
             "in two", size, need / 2**20, free / 2**20)
    half = size // 2
    return split_to_fit(loops[:half]) + split_to_fit(loops[half:])


def _options(loop: HostLoop) -> tuple:
    """The static arguments of ``train_steps`` for ``loop``'s runs (one device, no mesh), and
    whether the members are batched (``vmap``: not on the CPU, see ``train_steps_fused``)."""
    return tuple(sorted(dict(
        loop.options._replace(mesh=None)._asdict(), task=loop.task, schedule=loop.schedule,
        num_steps=loop.chunk, windows=loop.windows, layer_norms=loop.trainer.log_histograms,
        batched=jax.devices()[0].platform != "cpu").items()))


def _stack(trees: List[Any]) -> Any:
    """The members' arrays stacked on the host and put on the device once (stacking on the
    device compiled one small program per array shape)."""
    return jax.device_put(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                       *trees))


class FusedLoop:
    """Trains ``loops`` (equal ``group_key``) as one program; ``run`` gives each member's
    summary, or the exception it ended with (failed, or interrupted)."""

    def __init__(self, loops: List[HostLoop], stop: StopRequest):
        self.loops, self.stop = loops, stop
        first = loops[0]
        self.trainer, self.chunk, self.windows = first.trainer, first.chunk, first.windows
        self.options = _options(first)
        for loop in loops:
            loop.bar = None  # one bar per process, not per member
            loop.group_members = len(loops)  # its perf scalars are the group's

    def run(self) -> Dict[int, Union[Dict[str, Any], BaseException]]:
        states = _stack([m.state for m in self.loops])
        data, rngs = _stack([m.data for m in self.loops]), _stack([m.rng for m in self.loops])
        alive = np.ones(len(self.loops), bool)
        results: Dict[int, Union[Dict[str, Any], BaseException]] = {}
        step, compiled = self.loops[0].step, False
        window_start, window_steps = time.perf_counter(), 0
        while step < self.trainer.steps and alive.any():
            try:
                states, metrics = train_steps_fused(states, data, rngs, jnp.asarray(alive),
                                                    options=self.options)
            except Exception as err:  # noqa: BLE001 (the program itself: every member's end)
                for i in np.flatnonzero(alive):
                    results[int(i)] = err
                return results
            step += self.chunk
            if compiled:
                window_steps += self.chunk
            else:  # keep compilation out of steps/s
                jax.block_until_ready(metrics)
            last = step == self.trainer.steps
            due = [k for k, a in enumerate(self.loops[0].actions) if a.due(step, last)]
            stopping = self.stop.requested
            host: Optional[Dict[str, np.ndarray]] = None
            host_states, perf = None, {}
            if due or stopping:
                # To the host once; each member's slice is then a numpy view (slicing on the
                # device compiled a program per array shape). The states only when an action
                # reads them (eval, a checkpoint, histograms) or a stop saves them.
                needs_state = stopping or self.trainer.log_histograms or any(
                    self.loops[0].actions[k].action != self.loops[0].log_train for k in due)
                host, host_states = jax.device_get((metrics, states if needs_state else None))
                if window_steps:
                    # One dispatch advances every member: a member's own rate is the group
                    # program's, named so (a perf/steps_per_sec would read as a run's alone,
                    # N times slower); the group trains group_members times as many steps.
                    perf = {"group_steps_per_sec":
                            window_steps / (time.perf_counter() - window_start)}
            for i in np.flatnonzero(alive):
                try:
                    self._member_work(self.loops[i], int(i), host_states, host, perf, due,
                                      last, stopping, step)
                except Exception as err:  # noqa: BLE001 (this member's end; the rest go on)
                    results[int(i)], alive[i] = err, False
                if self.loops[i].stopped_early_at is not None and int(i) not in results:
                    results[int(i)], alive[i] = self.loops[i].summary(), False
            if not compiled or due:
                compiled, window_start, window_steps = True, time.perf_counter(), 0
        for i in np.flatnonzero(alive):
            loop = self.loops[i]
            token = MEMBER.set(loop.checkpointer.dir.parent)
            try:
                loop.log_figures(wait=True)
                results[int(i)] = loop.summary()
            except Exception as err:  # noqa: BLE001
                results[int(i)] = err
            finally:
                MEMBER.reset(token)
        return results

    def _member_work(self, loop: HostLoop, i: int, states, host, perf, due: List[int],
                     last: bool, stopping: bool, step: int) -> None:
        """Member ``i``'s share of the dispatch that ended at ``step``: its metrics checked,
        its actions due, a checkpoint and ``Interrupted`` on a stop request."""
        token = MEMBER.set(loop.checkpointer.dir.parent)
        try:
            loop.start, loop.step = step - self.chunk, step
            if host is not None:
                loop.metrics = {k: v[i] for k, v in host.items()}
                loop.perf = perf
                check_finite(loop.metrics, loop.start, self.chunk // self.windows)
            if states is not None:
                # Arrays, as a single run's state is: x[i] of a 1-D leaf (``step``) is a numpy
                # scalar, which flax's msgpack encodes as another type (the checkpoint's bytes
                # then differed from the basic launcher's for equal values).
                loop.state = jax.tree.map(lambda x: np.asarray(x[i]), states)
            loop.act([loop.actions[k] for k in due], last=last)
            if stopping:
                loop.interrupt(saved=any(loop.actions[k].action == loop.save for k in due),
                               last=last)
        finally:
            MEMBER.reset(token)
