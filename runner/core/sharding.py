"""Where a run's arrays live: the 1-D ``data`` mesh, placement and sharding of arrays on it,
a device's free memory and the fit of a task's arrays there. Pure JAX: no environment, no I/O."""

from typing import List, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from omegaconf import DictConfig

from runner.config.errors import RunnerError

DATA_AXIS = "data"


def make_mesh(cfg: DictConfig, devices: List[jax.Device]) -> Mesh:
    """A 1-D mesh (axis ``data``) over ``device.num_devices`` devices (null: all of them)."""
    wanted = cfg.num_devices
    if wanted is None:
        return Mesh(np.array(devices), (DATA_AXIS,))
    if jax.process_count() > 1 and wanted != len(devices):
        raise RunnerError(f"device.num_devices={wanted}: a run over {jax.process_count()} "
                          f"processes uses all their {len(devices)} devices (leave "
                          f"device.num_devices=null)")
    if wanted > len(devices):
        hint = (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{wanted} gives {wanted} devices)" if devices[0].platform == "cpu" else "")
        raise RunnerError(f"device.num_devices={wanted}: only {len(devices)} "
                          f"{devices[0].platform} device(s) visible{hint}")
    return Mesh(np.array(devices[:wanted]), (DATA_AXIS,))


def free_bytes(device: jax.Device) -> Optional[int]:
    """Bytes free on ``device``; None where JAX does not say (CPUs report no limit)."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def local(devices: List[jax.Device]) -> jax.Device:
    """The first of ``devices`` this process drives (only its own report their memory)."""
    return next(d for d in devices if d.process_index == jax.process_index())


def check_fits(host_data, devices: List[jax.Device]) -> None:
    """A one-line error, before anything is placed, when a task's arrays exceed the memory
    the devices report free (each device holds a replica). CPUs report none: no check."""
    free = free_bytes(local(devices))
    if free is None:
        return
    sizes = {jax.tree_util.keystr(path): leaf.nbytes
             for path, leaf in jax.tree_util.tree_leaves_with_path(host_data)}
    if sum(sizes.values()) > free:
        largest = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in sorted(
            sizes.items(), key=lambda item: -item[1])[:4])
        raise RunnerError(f"the task's arrays take {sum(sizes.values()) / 2**20:.0f} MiB "
                          f"({largest}) but {devices[0].device_kind} has {free / 2**20:.0f} "
                          f"MiB free: use a smaller file, a device with more memory, or a "
                          f"feed from the host (task=arrays: task.feed=host)")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def place(tree, sharding: NamedSharding):
    """Host arrays (e.g. a restored checkpoint) as global arrays with ``sharding``; every
    process passes the same values (``make_array_from_callback`` works across processes)."""
    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)
