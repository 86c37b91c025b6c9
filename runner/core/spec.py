"""``StepSpec``: every static argument of a run's compiled train and eval programs, as one
value; and the program of a fused group, which trains several runs of one spec at once.

Runs whose specs are equal (and whose arrays have equal structures, shapes and dtypes) share a
compilation: the single run's ``train_steps`` and a fused sweep's ``train_steps_fused`` both
take their static arguments from a ``StepSpec``, and a fused group's key is derived from it
(``runner.loop.groups.group_key``).
"""

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from runner.core.steps import Metrics, evaluate, train_steps
from runner.tasks.base import Batch, Data, Task


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static arguments of ``train_steps`` (its keyword arguments: ``steps_per_dispatch``
    steps, returning the metrics of ``log_windows`` log windows: from the run's
    ``runner.core.cadence.Cadence``; the lr schedule is the state's: its ``tx``,
    ``runner.core.optim.Transformation``) and of ``evaluate`` (``task``, ``mesh``,
    ``compute_dtype``). Frozen and hashable: itself a static jit argument."""

    task: Task
    steps_per_dispatch: int
    log_windows: int = 1
    layer_norms: bool = False
    unroll: int = 1
    compute_dtype: Optional[str] = None
    mesh: Optional[Mesh] = None

    def train(self, state, data: Data, rng: jax.Array,
              blocks: Optional[Batch] = None) -> Tuple[Any, Metrics]:
        """``steps_per_dispatch`` train steps from ``state`` (``runner.core.steps.train_steps``), on
        ``blocks`` of examples read on the host where given."""
        return train_steps(state, data, rng, blocks, **self.train_arguments())

    def evaluate(self, state, data: Data) -> Tuple[Metrics, jax.Array]:
        """Eval metrics and outputs of ``state`` (``runner.core.steps.evaluate``)."""
        return evaluate(state, data, task=self.task, mesh=self.mesh,
                        compute_dtype=self.compute_dtype)

    def train_arguments(self) -> Dict[str, Any]:
        """``train_steps``' keyword arguments."""
        # Not dataclasses.asdict: it would turn the task (a dataclass) into a dict.
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def on_one_device(self) -> "StepSpec":
        """The spec without its mesh: a fused group's members share one device."""
        return dataclasses.replace(self, mesh=None)


def members_batched() -> bool:
    """Whether a fused group's members train as one batch (``train_steps_fused``) rather than
    in turn, each dispatch running every member's own ``spec.train``: on accelerators. On the
    CPU a batch is no gain: XLA:CPU ran 8 vmapped linear_fit steps no faster than in turn and 2
    vmapped CNN steps 1.7-3x slower (a grouped convolution); running the members one after
    another inside one program (``lax.map``) compiled 0.5-0.8 s longer than a single run's
    step, which no dispatch won back. In turn, every member runs a single run's compiled step
    (its hyperparameters are arguments: compiled once for the group), bit for bit."""
    return jax.devices()[0].platform != "cpu"


@functools.partial(jax.jit, static_argnames=("spec", "shared_blocks"),
                   donate_argnames=("states",))
def train_steps_fused(states, data, rngs, alive, blocks=None, *, spec: StepSpec,
                      shared_blocks: bool = False):
    """``spec.train`` of every member (the leading axis of ``states``, ``data``, ``rngs`` and
    ``blocks``, unless ``shared_blocks``: one block of host-read examples for all) in one
    batched program (``jax.vmap``); a member not ``alive`` keeps its state."""
    new, metrics = jax.vmap(spec.train, in_axes=(0, 0, 0, None if shared_blocks else 0))(
        states, data, rngs, blocks)

    def keep(n, o):
        return jnp.where(alive.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(keep, new, states), metrics


def fused_bytes(spec: StepSpec, arrays: Tuple[Any, Any, jax.Array], members: int) -> int:
    """Device memory the fused program of ``members`` runs shaped like ``arrays`` (one run's
    state, data and key) needs, from its compiled (not run) program's memory analysis."""
    def stacked(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((members, *np.shape(a)), a.dtype),
                            tree)

    memory = train_steps_fused.lower(
        *stacked(arrays), jax.ShapeDtypeStruct((members,), jnp.bool_),
        spec=spec.on_one_device()).compile().memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
