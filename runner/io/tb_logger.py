"""TensorBoard logging into the run's ``tb/`` directory (tensorboardX)."""

import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import numpy as np

from runner.config.errors import WriteError


def _import_tensorboardx():
    """tensorboardX's writer module imports torch when it is installed (to accept torch
    tensors; ~1.3 s here). Runner passes numpy only, so hide torch during that import; torch
    stays importable afterwards."""
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX
        import tensorboardX.summary
        return tensorboardX
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import tensorboardX
        import tensorboardX.summary
    finally:
        del sys.modules["torch"]
    return tensorboardX


tensorboardX = _import_tensorboardx()
summaries = tensorboardX.summary
from tensorboardX.event_file_writer import EventsWriter  # noqa: E402 (after the import above)
from tensorboardX.proto.api_pb2 import Status  # noqa: E402
from tensorboardX.proto.event_pb2 import Event, SessionLog  # noqa: E402
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData  # noqa: E402


# TensorFlow's histogram buckets (SummaryWriter's default_bins): +-1e-12 * 1.1^k up to 1e20.
_EDGES = 1e-12 * 1.1 ** np.arange(int(np.ceil(np.log(1e32) / np.log(1.1))))
HISTOGRAM_BINS = [*(-_EDGES[::-1]), 0.0, *_EDGES]

# A run's end (metrics.json's status) as its HParams session's status. TensorBoard's statuses
# are unknown, success, failure and running, none of them "pruned": a pruned run ended without
# training to its end, and FAILURE is the one box of the HPARAMS tab's Status filter that sets
# it apart both from completed runs (SUCCESS) and from runs that never ended (failed or
# interrupted: no session end, UNKNOWN). Its `status` column says `pruned`.
SESSION_END = {"completed": "STATUS_SUCCESS", "pruned": "STATUS_FAILURE"}


class TensorBoardLogger:
    """Scalars grouped by prefix (``train/loss``, ``eval/accuracy``, ``perf/...``, ``opt/...``),
    text, images, histograms, and the HParams row of this run.

    Events are written on the calling thread (tensorboardX's ``EventsWriter``), not through
    ``SummaryWriter``'s writer thread: when that thread meets a full disk it dies with a
    traceback of its own and the training thread then blocks on its full queue. Here a failed
    write raises WriteError, naming the event file, where the run can record it. ``flush`` after
    each round of logging makes the events visible to a running TensorBoard.
    """

    def __init__(self, log_dir: Path, *, purge_step: Optional[int] = None):
        # The event file is named by the second it was opened in: a unique suffix keeps an
        # attempt that starts within the same second (a quick resume) from overwriting it.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.events = EventsWriter(str(Path(log_dir) / "events"), suffix)
        except OSError as err:
            raise WriteError(log_dir, err) from err
        self.path = next(Path(log_dir).glob(f"events.out.tfevents.*{suffix}"))
        if purge_step is not None:
            # TensorBoard discards this run's earlier events at steps >= purge_step (those an
            # interrupted attempt logged after its last checkpoint), as SummaryWriter does.
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self._summary(summaries.scalar(f"{prefix}/{name}", float(value)), step)

    def text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown: indent four spaces to keep it verbatim.
        self._summary(summaries.text(tag, "\n".join("    " + line
                                                    for line in text.splitlines())))

    def images(self, step: int, prefix: str, images: Mapping[str, np.ndarray]) -> None:
        """Images (``<prefix>/<name>``): (H, W, 3) uint8 arrays."""
        for name, image in images.items():
            self._summary(summaries.image(f"{prefix}/{name}", image, dataformats="HWC"), step)

    def histograms(self, step: int, prefix: str, tree: Any) -> None:
        """One histogram per array of a pytree (``params/Dense_0/kernel``)."""
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            self._summary(summaries.histogram(f"{prefix}/{name}", np.asarray(leaf),
                                              HISTOGRAM_BINS), step)

    def hparams(self, hparams: Mapping[str, Any], *, status: Optional[str]) -> None:
        """This run's row of the HPARAMS tab: its hyperparameters (a session start info) and,
        for a run that ended with ``status`` (``completed``, ``pruned``), a session end of that
        status (``SESSION_END``). Written into the run's own event file:
        tensorboardX's ``add_hparams`` would write them into a separate sub-run, giving two
        rows per run.

        No experiment summary (its list of columns): TensorBoard takes the first one it finds
        under its logdir for every run, so under ``--logdir outputs`` a linear_fit run's list
        left the CNN runs without ``eval/accuracy``. Without one, TensorBoard takes the union
        of every run's hyperparameters and scalar tags as the columns, those that differ
        between runs first (the metric columns are the runs' own scalars).

        Integers are numbers, as floats are (protobuf's Value has one number kind): they sort
        by value and are numeric axes of the parallel-coordinates view, at the cost of
        TensorBoard's showing every number to 5 significant digits (``seed`` 0 as ``0.0000``).
        """
        _, session_start, session_end = summaries.hparams(dict(hparams), {})
        self._summary(session_start)
        if status in SESSION_END:
            self._summary(_with_status(session_end, SESSION_END[status]))

    def flush(self) -> None:
        self._io(self.events.flush)

    def close(self) -> None:
        self._io(self.events.close)

    def _summary(self, summary, step: Optional[int] = None) -> None:
        event = Event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = int(step)
        self._write(event)

    def _write(self, event) -> None:
        self._io(self.events.write_event, event)

    def _io(self, call, *args) -> None:
        try:
            call(*args)
        except OSError as err:
            raise WriteError(self.path, err) from err


def _with_status(session_end, status: str):
    """tensorboardX's session end summary (always STATUS_SUCCESS) with ``status`` instead."""
    value = session_end.value[0]
    data = HParamsPluginData.FromString(value.metadata.plugin_data.content)
    data.session_end_info.status = Status.Value(status)
    value.metadata.plugin_data.content = data.SerializeToString()
    return session_end


class NullLogger:
    """What processes other than 0 of a multi-process run log: nothing."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
