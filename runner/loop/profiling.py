"""``debug=profile``: a ``jax.profiler`` trace of a few train steps in the run's ``tb/``.

The trace starts after the first dispatch (which compiles) and covers ``trainer.profile_steps``
steps, each dispatch marked as a step (``StepTraceAnnotation``, numbered by its first step),
so TensorBoard's Profile tab (the ``tensorboard-plugin-profile`` package) shows the run's step
time broken down by XLA operation. JAX writes it to
``tb/plugins/profile/<time>/<host>.xplane.pb``.

A dispatch returns as soon as its program is queued (JAX's asynchronous dispatch, on the CPU
too): a mark around the call alone spanned 0.3-8 ms of a CNN step of ~0.8 s, and the
Overview's "Average Step Time" read 2.4 ms. So while tracing, the mark waits for the
dispatch's results before it closes: it spans the step's compute (``task=cnn_random_images
debug=profile``: 461 ms, where ``perf/steps_per_sec`` 2.12 gives 472 ms). Only the traced steps
wait (the host queues the next one after the compute instead of during it). Starting and
writing the trace are left out of ``perf/steps_per_sec`` (``after_dispatch``'s return).
"""

import logging
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import jax

log = logging.getLogger(__name__)
T = TypeVar("T")


class StepProfiler:
    """Traces ``steps`` steps into ``log_dir`` (None: off), after the first dispatch."""

    def __init__(self, log_dir: Optional[Path], steps: Optional[int]):
        self.log_dir, self.steps = log_dir, steps if log_dir is not None else None
        self.traced, self.active = 0, False

    def step(self, step: int, dispatch: Callable[[], T]) -> T:
        """``dispatch()``'s results; while tracing, marked as step ``step`` of the trace from
        the call until the results are computed (see the module doc)."""
        if not self.active:
            return dispatch()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            return jax.block_until_ready(dispatch())

    def after_dispatch(self, num_steps: int, outputs) -> float:
        """Start tracing after the first dispatch; stop once ``steps`` steps are traced. Returns
        the seconds this took (starting the trace, writing it), which are no step's time."""
        if not self.steps or self.traced >= self.steps:
            return 0.0
        if not self.active:
            jax.block_until_ready(outputs)  # the compiling dispatch stays out of the trace
            start = time.perf_counter()
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True
            return time.perf_counter() - start
        self.traced += num_steps
        start = time.perf_counter()
        if self.traced >= self.steps:
            self.close()
            traces = sorted((self.log_dir / "plugins" / "profile").glob("*/*.xplane.pb"))
            log.info("profile: %d steps traced to %s; TensorBoard's Profile tab shows it",
                     self.traced, traces[-1] if traces else self.log_dir)
        return time.perf_counter() - start

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
