"""What a host loop dispatches: a group's members' states, data and keys, and the compiled
program that trains them by ``spec``: one run's own ``train_steps`` (on its mesh); a fused
group's members each on that program in turn (the CPU); or a fused group's
``train_steps_fused`` over a leading member axis (accelerators: one device).

Either gives each member's metrics and state on the host when the loop asks (each fetch waits
for the device), at most once per dispatch. A member fed from the host (``runner.loop.feed``)
takes its feed's next block with each dispatch; members sharing a feed share the block.

Each member's step is its own (``state.step``, from which the step's data and randomness
follow), so a slot whose member ended can take a new one at its own step (``replace``): a
fused search keeps its group's width (``runner.run.refill``).
"""

from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from runner.core.spec import StepSpec, members_batched, train_steps_fused
from runner.core.steps import Metrics
from runner.loop.feed import HostFeed

Start = Tuple[Any, Any, jax.Array]  # a run's state, data and train key
Feeds = Sequence[Optional[HostFeed]]  # each member's (None: its examples are on the device)
FUSED_NAME = "train_steps_fused"


class Program(Protocol):
    spec: StepSpec
    size: int  # members

    def dispatch(self, alive: np.ndarray) -> Metrics:
        """``spec.steps_per_dispatch`` steps of every member ``alive``; the metrics, on the
        device."""

    def host_metrics(self) -> List[Dict[str, np.ndarray]]:
        """Each member's metrics of the last dispatch, on the host."""

    def host_states(self) -> List[Any]:
        """Each member's state after the last dispatch, where its actions read it."""

    def read_failure(self) -> Optional[Exception]:
        """Why a feed could not read the last dispatch's examples (a multi-process run
        dispatched zeros in their place: the run must fail), if it could not."""

    @property
    def refillable(self) -> bool:
        """Whether a slot whose member ended can take another (``replace``)."""

    def replace(self, i: int, start: Start, feed: Optional[HostFeed]) -> None:
        """Slot ``i`` trains a new member from ``start`` (at the step its state holds)."""


class SingleProgram:
    """One run's ``train_steps``: its state stays on its devices, where its actions read it."""

    size = 1

    def __init__(self, spec: StepSpec, start: Start, feed: Optional[HostFeed] = None):
        self.spec, self.feed = spec, feed
        self.state, self.data, self.rng = start
        self.metrics: Metrics = {}
        self.fetched: Optional[List[Dict[str, np.ndarray]]] = None

    def dispatch(self, alive: np.ndarray, blocks: Optional[Dict[int, Any]] = None) -> Metrics:
        """``blocks``: the blocks of this dispatch by feed (members in turn share them)."""
        block = _block_of(self.feed, {} if blocks is None else blocks)
        self.state, self.metrics = self.spec.train(self.state, self.data, self.rng, block)
        if self.feed is not None:
            self.feed.dispatched(self.metrics)
        self.fetched = None
        return self.metrics

    def host_metrics(self) -> List[Dict[str, np.ndarray]]:
        if self.fetched is None:
            self.fetched = [jax.device_get(self.metrics)]
        return self.fetched

    def host_states(self) -> List[Any]:
        return [self.state]

    def read_failure(self) -> Optional[Exception]:
        return None if self.feed is None else self.feed.failure

    refillable = True

    def replace(self, i: int, start: Start, feed: Optional[HostFeed]) -> None:
        self.state, self.data, self.rng = start
        self.feed, self.metrics, self.fetched = feed, {}, None


class FusedProgram:
    """``train_steps_fused`` over the members' stacked states, data and keys: a member not
    ``alive`` keeps its state while the others train."""

    def __init__(self, spec: StepSpec, starts: Sequence[Start], feeds: Feeds):
        self.spec, self.size, self.feeds = spec.on_one_device(), len(starts), feeds
        self.states, self.data, self.rngs = (_stack(trees) for trees in zip(*starts))
        self.metrics: Metrics = {}
        self.fetched: Optional[List[Dict[str, np.ndarray]]] = None
        self.fetched_states: Optional[List[Any]] = None

    def dispatch(self, alive: np.ndarray) -> Metrics:
        # Every feed gives its block, a member alive or not (the program runs every slot).
        blocks: Dict[int, Any] = {}
        per_member = [_block_of(feed, blocks) for feed in self.feeds]
        shared = len(blocks) == 1 and self.size > 1
        stacked = per_member[0] if shared or not blocks else jax.tree.map(
            lambda *b: jnp.stack(b), *per_member)
        self.states, self.metrics = train_steps_fused(
            self.states, self.data, self.rngs, jnp.asarray(alive), stacked, spec=self.spec,
            shared_blocks=shared)
        for feed in {id(f): f for f in self.feeds if f is not None}.values():
            feed.dispatched(self.metrics)
        self.fetched = self.fetched_states = None
        return self.metrics

    def host_metrics(self) -> List[Dict[str, np.ndarray]]:
        # To the host once; each member's slice is then a numpy view (slicing on the device
        # compiled a program per array shape).
        if self.fetched is None:
            host = jax.device_get(self.metrics)
            self.fetched = [{k: v[i] for k, v in host.items()} for i in range(self.size)]
        return self.fetched

    def host_states(self) -> List[Any]:
        if self.fetched_states is None:
            host = jax.device_get(self.states)
            # Arrays, as a single run's state is: x[i] of a 1-D leaf (``step``) is a numpy
            # scalar, which flax's msgpack encodes as another type (the checkpoint's bytes
            # then differed from the basic launcher's for equal values).
            self.fetched_states = [jax.tree.map(lambda x, i=i: np.asarray(x[i]), host)
                                   for i in range(self.size)]
        return self.fetched_states

    def read_failure(self) -> Optional[Exception]:
        return next((f.failure for f in self.feeds if f is not None and f.failure), None)

    @property
    def refillable(self) -> bool:
        # Every slot's feed gives a block each dispatch, an ended member's too: a feed that
        # read its member's last block would have none for the slot's next member's steps.
        return all(feed is None for feed in self.feeds)

    def replace(self, i: int, start: Start, feed: Optional[HostFeed]) -> None:
        """The new member's state, data and key replace slice ``i`` of the stacks, its step
        (``state.step``) with them: the program steps each member from its own step."""
        assert feed is None and self.refillable
        self.states, self.data, self.rngs = (_with_slice(stacked, i, tree) for stacked, tree
                                             in zip((self.states, self.data, self.rngs), start))
        self.fetched = self.fetched_states = None


class InTurnProgram:
    """Each member ``alive`` on a single run's ``train_steps`` in turn (see
    ``runner.core.spec.members_batched``): one compiled step for the group, dispatched
    asynchronously one member after another; each member's state stays its own, on the
    device, where its actions read it."""

    def __init__(self, spec: StepSpec, starts: Sequence[Start], feeds: Feeds):
        self.spec, self.size = spec, len(starts)
        self.members = [SingleProgram(spec, one, feed) for one, feed in zip(starts, feeds)]

    def dispatch(self, alive: np.ndarray) -> Metrics:
        blocks: Dict[int, Any] = {}  # a feed's block, read once for the members sharing it
        return [self.members[i].dispatch(alive[i:i + 1], blocks) for i in np.flatnonzero(alive)]

    def host_metrics(self) -> List[Dict[str, np.ndarray]]:
        # One transfer for all (each waits for its member's dispatch); a member no longer
        # alive keeps its last metrics, which the loop no longer reads.
        pending = [m for m in self.members if m.fetched is None]
        for member, metrics in zip(pending, jax.device_get([m.metrics for m in pending])):
            member.fetched = [metrics]
        return [m.fetched[0] for m in self.members]

    def host_states(self) -> List[Any]:
        return [m.state for m in self.members]

    def read_failure(self) -> Optional[Exception]:
        return next((m.read_failure() for m in self.members if m.read_failure()), None)

    refillable = True

    def replace(self, i: int, start: Start, feed: Optional[HostFeed]) -> None:
        self.members[i] = SingleProgram(self.spec, start, feed)


def compiled_name(members: int) -> str:
    """The jitted function a group of ``members`` runs (its compilations are the runs')."""
    return FUSED_NAME if members > 1 and members_batched() else "train_steps"


def program_for(spec: StepSpec, starts: Sequence[Start], feeds: Feeds) -> Program:
    """The program of a group: one run's own (unbatched, on its mesh); several in turn on
    that program (the CPU) or batched into one (accelerators)."""
    if len(starts) == 1:
        return SingleProgram(spec, starts[0], feeds[0])
    if not members_batched():
        return InTurnProgram(spec, starts, feeds)
    return FusedProgram(spec, starts, feeds)


def _block_of(feed: Optional[HostFeed], blocks: Dict[int, Any]) -> Any:
    """``feed``'s block of this dispatch: read once, kept in ``blocks`` for its other members."""
    if feed is None:
        return None
    if id(feed) not in blocks:
        blocks[id(feed)] = feed.next()
    return blocks[id(feed)]


def _stack(trees: Sequence[Any]) -> Any:
    """The members' arrays stacked on the host and put on the device once (stacking on the
    device compiled one small program per array shape)."""
    return jax.device_put(jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                       *trees))


def _with_slice(stacked: Any, i: int, tree: Any) -> Any:
    """``stacked`` with slice ``i`` of each array set to ``tree``'s: on the host and put back
    once, as ``_stack`` does (setting a slice on the device compiles a program per shape)."""
    def put(stack, one):
        host = np.array(stack)  # a writable copy
        host[i] = np.asarray(one)
        return host

    return jax.device_put(jax.tree.map(put, jax.device_get(stacked), tree))
