"""Steps per second between a host loop's syncs (``runner.loop.host``), compilation left out."""

import time
from typing import Optional

import jax


class Throughput:
    """Steps per second between host syncs. The first window starts once the compiling
    dispatch is done; a window ends when a fetch waits for the device."""

    def __init__(self):
        self.start, self.steps, self.compiled = time.perf_counter(), 0, False

    def dispatched(self, steps: int, outputs, *, excluded: float) -> None:
        """A dispatch of ``steps`` steps; ``excluded`` seconds of it were no step's."""
        self.start += excluded
        if self.compiled:
            self.steps += steps
        else:  # keep compilation out of steps/s: wait for it, start timing after
            jax.block_until_ready(outputs)

    def rate(self) -> Optional[float]:
        return self.steps / (time.perf_counter() - self.start) if self.steps else None

    def restart(self, *, synced: bool) -> None:
        """After a dispatch: the next window starts (host work ended this one) if it synced."""
        if not self.compiled or synced:
            self.compiled, self.start, self.steps = True, time.perf_counter(), 0
