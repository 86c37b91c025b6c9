"""Which runs of a fused sweep train as one program (``runner.loop.programs.FusedProgram``):
runs of equal ``group_key``, in parts whose program fits the device's free memory."""

import dataclasses
import logging
from typing import Any, Callable, Hashable, List, Optional, TypeVar

import jax
import numpy as np
from omegaconf import OmegaConf

from runner.core.cadence import Cadence
from runner.core.spec import StepSpec
from runner.loop.programs import Start

log = logging.getLogger(__name__)
T = TypeVar("T")


def group_key(spec: StepSpec, cadence: Cadence, trainer: Any, start_step: int,
              start: Start) -> Optional[Hashable]:
    """Everything that shapes a run's compiled program and its host loop's cadence (all of
    the ``Cadence`` but the callbacks' ``every``: each member calls its own): runs with equal
    keys train as one program. None: a run that trains alone, on several devices or
    processes, or under ``debug=nans``."""
    if jax.config.jax_debug_nans:
        # Its check names the operation that made a NaN in a run's own program only (in a
        # fused one: "in scan" under lax.map, nothing at all under vmap with JAX 0.10), and
        # a NaN would stop every member of the program.
        log.info("debug=nans: each job trains alone, as a single run")
        return None
    mesh = spec.mesh
    if (mesh is not None and mesh.size > 1) or jax.process_count() > 1:
        log.info("a run on %d devices trains alone: fused members share one device "
                 "(device.num_devices=1)", mesh.size if mesh is not None else 1)
        return None
    # The tree structure holds the state's static fields too: its apply_fn (the model) and
    # its tx (the optimizer's structure), compared by equality.
    return (spec.on_one_device(), dataclasses.replace(cadence, callbacks=()), start_step,
            OmegaConf.to_yaml(trainer),
            jax.tree.structure(start),
            tuple((np.shape(a), str(a.dtype)) for a in jax.tree.leaves(start)))


def split_to_fit(group: List[T], need: Callable[[int], int],
                 free: Optional[int]) -> List[List[T]]:
    """``group`` in parts whose fused program fits ``free`` bytes (None: unknown, one part):
    ``need(size)`` is the program's for ``size`` members, and a part that would not fit is
    halved until it does, each split logged."""
    if free is None or len(group) == 1:
        return [group]
    size = len(group)
    bytes_needed = need(size)
    if bytes_needed <= free:
        return [group]
    log.info("a fused group of %d jobs needs %.0f MiB, the device has %.0f MiB free: split "
             "in two", size, bytes_needed / 2**20, free / 2**20)
    half = size // 2
    return split_to_fit(group[:half], need, free) + split_to_fit(group[half:], need, free)
