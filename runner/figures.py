"""The task's figures, drawn in a separate process while training goes on.

matplotlib costs ~0.5 s to import and tens of ms per figure; drawn in the training process
that time stalls the loop (and, for a short run, is a fifth of its wall time). A worker
process (``python -m runner.figures``) started with the run imports matplotlib on another core
while the run compiles and trains, draws each eval's figures and sends back RGB arrays, which
the run writes to TensorBoard as they arrive. If the worker cannot run, the figures are drawn
in-process as before; an error in the task's ``figures`` fails the run either way.
"""

import atexit
import io
import os
import pickle
import queue
import subprocess
import sys
import threading
import traceback
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from runner.errors import RunnerError


class EncodedImage(NamedTuple):
    """An image as TensorBoard stores it: PNG bytes, and the (H, W, C) shape of the pixels."""

    png: bytes
    shape: Tuple[int, int, int]

    def pixels(self) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.png)))


Images = Dict[str, EncodedImage]  # name -> image


def render(figure) -> np.ndarray:
    """A matplotlib figure (Agg canvas) as an (H, W, 3) uint8 array; the figure is closed."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def encode(image: np.ndarray) -> EncodedImage:
    """(H, W, C) uint8 pixels as PNG (what tensorboardX's ``add_image`` writes for them)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return EncodedImage(buffer.getvalue(), image.shape)


def draw(task, data, outputs) -> Images:
    """The task's figures, rendered and PNG-encoded (in the worker: off the run's thread)."""
    return {name: encode(render(fig)) for name, fig in task.figures(data, outputs).items()}


def _warm_up() -> None:
    """Draw and encode a throwaway figure: the first figure of a process loads fonts and
    more (~40 ms), which would otherwise delay the run's first figure."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(2, 2), dpi=40)
    axes.scatter([0, 1], [0, 1], s=4, label="a")
    axes.plot([0, 1], [1, 0], "r--", label="b")
    axes.set_xlabel("x")
    axes.legend()
    encode(render(figure))


class _Worker:
    """A ``python -m runner.figures`` process, and a thread that queues its answers."""

    def __init__(self):
        # The worker never needs an accelerator: keep it off the GPU (and its memory).
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen([sys.executable, "-m", "runner.figures"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.answers: "queue.Queue[Tuple[Optional[int], Any]]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self.answers.put(pickle.load(self.proc.stdout))
        except Exception:  # noqa: BLE001 (EOF, broken pipe: the worker has gone)
            self.answers.put((None, "the figure worker exited"))

    def send(self, message) -> None:
        pickle.dump(message, self.proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.flush()

    def stop(self, *, kill: bool = False) -> None:
        """End the worker: at the end of its input (after what it is drawing), or at once."""
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()  # the worker exits at the end of its input
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_IDLE: List[_Worker] = []  # at most one worker between runs of this process


def prestart() -> None:
    """Start a worker now, for the next run of this process to take: ``python -m runner``
    calls this first thing, so that the worker's imports overlap the run's own."""
    if not _IDLE:
        try:
            _IDLE.append(_Worker())
        except OSError:
            pass


@atexit.register
def _stop_idle() -> None:
    while _IDLE:  # an idle worker owes nothing: no need to wait for its imports to finish
        _IDLE.pop().stop(kill=True)


class FigureRenderer:
    """Draws ``task.figures(data, outputs)`` for a run's eval steps, in a worker process.

    Create it early (a new worker imports matplotlib meanwhile), ``set_data`` once the task
    and its data exist, ``submit`` each eval's outputs (host arrays); ``ready`` returns the
    finished steps' images without waiting (``wait=True``: all of them). ``close`` hands the
    worker on to the next run of this process (sweep jobs share one). If the worker dies, its
    pending and later figures are drawn in-process.
    """

    def __init__(self, *, background: bool = True):
        self.task, self.data = None, None
        self._waiting: Dict[int, Any] = {}  # step -> outputs sent to the worker, not yet back
        self._drawn: "queue.Queue[Tuple[int, Any]]" = queue.Queue()  # drawn in-process
        self._worker: Optional[_Worker] = None
        if background:
            prestart()
            self._worker = _IDLE.pop() if _IDLE else None

    def set_data(self, task, data) -> None:
        """The task and its data (host arrays), the same for every step's figures."""
        self.task, self.data = task, data
        self._to_worker(("data", task, data))

    def submit(self, step: int, outputs) -> None:
        self._waiting[step] = outputs
        had_worker = self._worker is not None
        if not self._to_worker(("draw", step, outputs)) and not had_worker:
            # (a worker lost while sending drew every waiting step, this one included)
            self._drawn.put((step, draw(self.task, self.data, outputs)))

    def _to_worker(self, message) -> bool:
        if self._worker is not None:
            try:
                self._worker.send(message)
                return True
            except Exception:  # noqa: BLE001 (unpicklable task, dead worker: draw here)
                self._worker_lost()
        return False

    def ready(self, *, wait: bool = False) -> Dict[int, Images]:
        """Images of the steps drawn so far ``{step: {name: image}}``; ``wait``: all of them.
        An error in the task's figures raises here."""
        finished = {}
        while self._waiting:
            source = self._drawn if self._worker is None else self._worker.answers
            try:
                step, images = source.get(block=wait)
            except queue.Empty:
                break
            if step is None:  # the worker died: draw what it still owed here
                self._worker_lost()
                continue
            if isinstance(images, str):  # the task's figures raised in the worker
                raise RunnerError(f"the task's figures at step {step} failed:\n{images}")
            self._waiting.pop(step, None)
            finished[step] = images
        return finished

    def _worker_lost(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        for step, outputs in self._waiting.items():
            self._drawn.put((step, draw(self.task, self.data, outputs)))

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if self._waiting or _IDLE:  # answers still due would reach the next run: stop it
            worker.stop()
        else:
            _IDLE.append(worker)

    def __enter__(self) -> "FigureRenderer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker() -> None:
    """Answer messages from stdin: ``("data", task, data)`` sets what to draw from;
    ``("draw", step, outputs)`` is answered with ``(step, images)``, or ``(step, traceback
    text)`` when the task's figures raise. Exits at the end of its input."""
    import gc

    import matplotlib

    matplotlib.use("Agg")
    # Import now, while the run starts up: matplotlib, and what task modules import (jax).
    import matplotlib.pyplot  # noqa: F401
    import jax  # noqa: F401

    # The answers get the real stdout to themselves; anything printed goes to stderr.
    stdin, stdout = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        _warm_up()
    except Exception:  # noqa: BLE001 (only a head start: the real figures report their errors)
        pass
    gc.collect()
    gc.freeze()  # the garbage collector skips the imported modules' objects: ~25% per figure
    task = data = None
    while True:
        try:
            kind, *message = pickle.load(stdin)
        except EOFError:  # the run is done: exit without the interpreter's slow teardown
            stdout.flush()
            os._exit(0)
        if kind == "data":
            task, data = message
            continue
        step, outputs = message
        try:
            answer = draw(task, data, outputs)
        except Exception:  # noqa: BLE001 (reported to the run, which fails with it)
            answer = traceback.format_exc()
        pickle.dump((step, answer), stdout, protocol=pickle.HIGHEST_PROTOCOL)
        stdout.flush()


if __name__ == "__main__":
    # Run as the module runner.figures (not __main__): the images it pickles back name their
    # class by that module, which the run can import.
    from runner.figures import worker as run_worker

    run_worker()
