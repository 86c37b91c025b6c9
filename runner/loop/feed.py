"""Feeding a run's steps from the host: a ``HostExamples`` task's examples read a dispatch or
two ahead on a thread of its own, placed on the devices, and bounded in memory.

Each step's indices are the ones the compiled steps would draw on the device
(``runner.core.sampling``: a function of the run's train key and the step), so where the
examples are read is no part of the result: a run fed from the host trains on exactly the
batches of one that keeps its training set on the device, and a resume reads on from the step
it restarts at. One reading thread per feed fills a queue of ``DEPTH`` blocks (a block: one
dispatch's ``[steps, batch, ...]`` examples, already on the devices); the loop keeps at most
``IN_FLIGHT`` dispatches queued on the devices (without a bound, each dispatch's block stays
alive until the device reaches it: host memory grew by 0.3-0.8 GB in 5 s here). In a
multi-process run each process reads only its own rows of each global batch.
"""

import collections
import contextlib
import functools
import logging
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from runner.config.errors import RunnerError, first_line
from runner.core.sharding import DATA_AXIS, free_bytes, local
from runner.core.examples import check_structure, probe
from runner.platform.device import available_memory
from runner.tasks.base import Batch, ChoosesFeed, HostExamples
from runner.core.sampling import step_indices, step_keys

log = logging.getLogger(__name__)

DEPTH = 2  # blocks read ahead
IN_FLIGHT = 2  # dispatches queued on the devices
# ``feed=auto`` keeps the training set on the device when it takes at most this share of the
# device's free memory and of the host's available memory (the model, its activations and a
# reading copy need the rest).
FIT_FRACTION = 0.5


def from_host(task: Any, devices: Sequence[jax.Device]) -> bool:
    """Whether the run's examples are read on the host a dispatch ahead (else the task's data
    is made or kept on the device): a ``HostExamples`` task's ``feed``, ``auto`` deciding by
    the training set's size (``FIT_FRACTION``)."""
    if not isinstance(task, HostExamples):
        return False
    feed = task.feed if isinstance(task, ChoosesFeed) else "host"
    if feed != "auto":
        return feed == "host"
    need = task.train_examples * sum(a.nbytes for a in probe(task).values())
    room = [free for free in (free_bytes(local(devices)), available_memory()) if free is not None]
    host = bool(room) and need > FIT_FRACTION * min(room)
    if jax.process_count() > 1:  # one choice for all: they must compile the same programs
        from jax.experimental import multihost_utils

        host = bool(np.any(multihost_utils.process_allgather(np.array(host))))
    log.info("task.feed=auto: the training set (%.2f GiB) %s (%.2f GiB free)", need / 2**30,
             "is read from the host a dispatch ahead" if host else "is kept on the device",
             min(room) / 2**30 if room else float("inf"))
    return host


@functools.partial(jax.jit, static_argnames=("count", "n", "k"))
def block_indices(rng: jax.Array, start: jax.Array, *, count: int, n: int, k: int):
    """The example indices of steps ``start .. start + count - 1``: ``[count, k]``, as each
    step draws them on the device (``runner.core.steps.step_batch``)."""
    steps = start + jnp.arange(count, dtype=jnp.int32)
    return jax.vmap(lambda s: step_indices(step_keys(rng, s)[0], n, k))(steps)


class HostFeed:
    """The blocks of a run's dispatches of ``steps_per_dispatch`` steps from ``start`` to
    ``steps``, read by ``task.read_examples`` on one thread, ``DEPTH`` ahead, placed on
    ``mesh`` (each step's batch split over its ``data`` axis, as the compiled step splits it)
    or on the default device. ``next()`` gives them in order; an error while reading ends
    the run with one line naming the steps; ``close()`` stops the thread."""

    def __init__(self, task: HostExamples, rng: jax.Array, *, start: int,
                 steps_per_dispatch: int, steps: int, mesh: Optional[Mesh]):
        self.task, self.reference = task, probe(task)
        self.steps_per_dispatch = steps_per_dispatch
        self.rng = jax.device_get(rng)
        k = task.batch_size
        self.sharding = (NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)) if mesh is not None
                         else SingleDeviceSharding(jax.devices()[0]))
        self.rows = _local_rows(self.sharding, (steps_per_dispatch, k))
        if self.rows != slice(0, k):
            log.info("this process reads rows %d..%d of each batch of %d", self.rows.start,
                     self.rows.stop, k)
        self.steps = range(start, steps, steps_per_dispatch)
        self.expected = iter(self.steps)
        self.queue: "queue.Queue" = queue.Queue(maxsize=DEPTH)
        self.closed = threading.Event()
        self.in_flight: "collections.deque" = collections.deque()
        self.failure: Optional[RunnerError] = None  # a read that failed (multi-process runs)
        self.thread = threading.Thread(target=self._produce, name="runner-feed", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        for step in self.steps:
            if self.closed.is_set():
                return
            try:
                item = self._block(step)
            except Exception as err:  # noqa: BLE001 (handed to the training thread)
                item = err
            while not self.closed.is_set():
                try:
                    self.queue.put((step, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return

    def _block(self, step: int) -> Batch:
        k = self.task.batch_size
        indices = np.asarray(block_indices(self.rng, np.int32(step),
                                           count=self.steps_per_dispatch,
                                           n=self.task.train_examples, k=k))
        mine = indices[:, self.rows]
        examples = self.task.read_examples(mine.reshape(-1).astype(np.int64))
        check_structure(examples, mine.size, self.reference, what="read_examples")
        return self._placed({name: a.reshape(*mine.shape, *a.shape[1:])
                             for name, a in examples.items()})

    def _placed(self, block: Dict[str, np.ndarray]) -> Batch:
        """This process's rows of a block, as the global arrays the compiled steps take."""
        if jax.process_count() == 1:  # the whole batch is this process's
            return jax.device_put(block, self.sharding)
        k = self.task.batch_size
        return {name: jax.make_array_from_process_local_data(
            self.sharding, a, (self.steps_per_dispatch, k, *a.shape[2:]))
            for name, a in block.items()}

    def next(self) -> Batch:
        """The next dispatch's block (waiting for the reading thread if it is behind)."""
        expected = next(self.expected)
        while True:
            try:
                step, item = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():  # its last put counts
                    raise RunnerError(f"steps {expected + 1}.."
                                      f"{expected + self.steps_per_dispatch}: the reading "
                                      f"thread ended without their examples") from None
        if isinstance(item, Exception):
            error = RunnerError(f"reading the training examples of steps {step + 1}.."
                                f"{step + self.steps_per_dispatch}: {first_line(item)}")
            error.__cause__ = item
            if jax.process_count() == 1:
                raise error
            # The other processes are entering this dispatch's collectives: take part with
            # zeros, and fail after it (``failure``), all together (runner.loop.host)
            self.failure = self.failure or error
            rows = self.rows.stop - self.rows.start
            return self._placed({
                name: np.zeros((self.steps_per_dispatch, rows, *a.shape[1:]), a.dtype)
                for name, a in self.reference.items()})
        return item

    def dispatched(self, outputs: Any) -> None:
        """A dispatch was queued: wait for the one ``IN_FLIGHT`` before it, so that at most
        that many blocks wait on the devices."""
        self.in_flight.append(outputs)
        if len(self.in_flight) > IN_FLIGHT:
            jax.block_until_ready(self.in_flight.popleft())

    def close(self) -> None:
        self.closed.set()
        while True:  # a full queue frees the thread's put
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(timeout=10)
        self.in_flight.clear()


@contextlib.contextmanager
def feeds_for(runs: Sequence[Any]) -> Iterator[List[Optional[HostFeed]]]:
    """Each run's feed (None: its data is on the device), closed on leaving. Runs of one task,
    train key and start step (a fused group's members of one seed) share one: a block is read
    once for them."""
    feeds: Dict[Any, HostFeed] = {}
    out: List[Optional[HostFeed]] = []
    try:
        for run in runs:
            if not run.host_fed:
                out.append(None)
                continue
            key = (run.parts.task, np.asarray(jax.device_get(run.train_rng)).tobytes(),
                   run.start_step)
            if key not in feeds:
                feeds[key] = HostFeed(run.parts.task, run.train_rng, start=run.start_step,
                                      steps_per_dispatch=run.cadence.steps_per_dispatch,
                                      steps=run.cfg.trainer.steps,
                                      mesh=run.spec.mesh)
            out.append(feeds[key])
        if feeds:
            log.info("examples read on the host for %d run(s) by %d reading thread(s)",
                     len(out) - out.count(None), len(feeds))
        yield out
    finally:
        for feed in feeds.values():
            feed.close()


def _local_rows(sharding, shape) -> slice:
    """This process's rows of each step's batch (all of them in a single process)."""
    spans = {(s[1].start or 0, shape[1] if s[1].stop is None else s[1].stop)
             for s in sharding.addressable_devices_indices_map(shape).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise RunnerError(f"this process's devices hold rows {sorted(spans)} of each batch, "
                          f"not one span: a feed from the host needs them consecutive")
    return slice(start, stop)
