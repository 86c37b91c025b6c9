"""``debug=profile``: a ``jax.profiler`` trace of a few train steps in the run's ``tb/``.

The trace starts after the first dispatch (which compiles) and covers ``trainer.profile_steps``
steps, each dispatch annotated as a step (``StepTraceAnnotation``, numbered by its first
step), so TensorBoard's Profile tab (the ``tensorboard-plugin-profile`` package) shows the
run's step time broken down by XLA operation. JAX writes it to
``tb/plugins/profile/<time>/<host>.xplane.pb``.
"""

import contextlib
import logging
from pathlib import Path
from typing import Any, ContextManager, Optional

import jax

log = logging.getLogger(__name__)


class StepProfiler:
    """Traces ``steps`` steps into ``log_dir`` (None: off), after the first dispatch."""

    def __init__(self, log_dir: Optional[Path], steps: Optional[int]):
        self.log_dir, self.steps = log_dir, steps if log_dir is not None else None
        self.traced, self.active = 0, False

    def annotate(self, step: int) -> ContextManager:
        """Around a dispatch: marks it as a step of the trace while tracing."""
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after_dispatch(self, num_steps: int, outputs: Any) -> None:
        """Start tracing after the first dispatch; stop once ``steps`` steps are traced (the
        device done with them)."""
        if not self.steps or self.traced >= self.steps:
            return
        if not self.active:
            jax.block_until_ready(outputs)  # the compiling dispatch stays out of the trace
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True
            return
        self.traced += num_steps
        if self.traced >= self.steps:
            jax.block_until_ready(outputs)
            self.close()
            traces = sorted((self.log_dir / "plugins" / "profile").glob("*/*.xplane.pb"))
            log.info("profile: %d steps traced to %s; TensorBoard's Profile tab shows it",
                     self.traced, traces[-1] if traces else self.log_dir)

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
