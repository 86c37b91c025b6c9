"""The task's figures, drawn on a worker thread while training goes on.

matplotlib costs ~0.5 s to import and tens of ms per figure; drawn on the training thread
that time would stall the loop. A one-thread ``concurrent.futures.ThreadPoolExecutor`` imports
matplotlib while the run builds and compiles (XLA's compiler and the device release the GIL),
then draws each eval's figures into RGB arrays, which the run writes to TensorBoard as they
come back. (A process pool measured ~0.5 s slower for the default run: a spawned process
imports JAX again to unpickle the task, and the data is copied to it.)
"""

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict

import numpy as np

from runner.config.errors import RunnerError
from runner.tasks.figures import pyplot

Images = Dict[str, np.ndarray]  # name -> (H, W, 3) uint8 pixels


def render(figure) -> np.ndarray:
    """A matplotlib figure (Agg canvas) as an (H, W, 3) uint8 array; the figure is closed."""
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(figure)
    return image


def draw(task, data, outputs) -> Images:
    """The task's figures of ``outputs``, rendered."""
    return {name: render(fig) for name, fig in task.figures(data, outputs).items()}


class FigureRenderer:
    """Draws ``task.figures(data, outputs)`` for a run's eval steps, on a worker thread.

    Create it first thing (its thread imports matplotlib while the run builds and compiles),
    ``set_data`` once the task and its data (host arrays) exist, ``submit`` each eval's
    outputs (host arrays); ``ready`` returns the finished steps' images without waiting
    (``wait=True``: all of them); an error in the task's figures raises there, naming the step.
    """

    def __init__(self):
        self.task = self.data = None
        self._pending: Dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="figures")
        self._pool.submit(pyplot)

    def set_data(self, task, data) -> None:
        self.task, self.data = task, data

    def submit(self, step: int, outputs) -> None:
        self._pending[step] = self._pool.submit(draw, self.task, self.data, outputs)

    def ready(self, *, wait: bool = False) -> Dict[int, Images]:
        """Images of the steps drawn so far ``{step: {name: pixels}}``; ``wait``: all."""
        finished = {}
        for step, future in list(self._pending.items()):
            if not (wait or future.done()):
                break  # steps come back in order
            del self._pending[step]
            try:
                finished[step] = future.result()
            except Exception as err:  # noqa: BLE001 (the task's own code)
                raise RunnerError(f"the task's figures at step {step} failed: "
                                  f"{type(err).__name__}: {err}") from err
        return finished

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "FigureRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
