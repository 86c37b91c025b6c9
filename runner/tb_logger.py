"""TensorBoard logging into the run's ``tb/`` directory (tensorboardX)."""

import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np


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
SummaryWriter = tensorboardX.SummaryWriter
hparams_summaries = tensorboardX.summary.hparams


class TensorBoardLogger:
    """Scalars grouped by prefix (``train/loss``, ``eval/accuracy``, ``perf/...``, ``opt/...``),
    text, images, histograms, and the HParams row of this run."""

    def __init__(self, log_dir: Path, *, purge_step: Optional[int] = None):
        # purge_step: TensorBoard discards this run's earlier events at steps >= purge_step
        # (those an interrupted attempt logged after its last checkpoint).
        # The event file is named by the second it was opened in: a unique suffix keeps an
        # attempt that starts within the same second (a quick resume) from overwriting it.
        self.writer = SummaryWriter(logdir=str(log_dir), purge_step=purge_step,
                                    filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", float(value), global_step=step)

    def text(self, tag: str, text: str) -> None:
        # TensorBoard renders text as markdown: indent four spaces to keep it verbatim.
        self.writer.add_text(tag, "\n".join("    " + line for line in text.splitlines()))

    def images(self, step: int, prefix: str, images: Mapping[str, np.ndarray]) -> None:
        """Images (``<prefix>/<name>``): (H, W, 3) uint8 arrays."""
        for name, image in images.items():
            self.writer.add_image(f"{prefix}/{name}", image, global_step=step,
                                  dataformats="HWC")

    def histograms(self, step: int, prefix: str, tree: Any) -> None:
        """One histogram per array of a pytree (``params/Dense_0/kernel``)."""
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            self.writer.add_histogram(f"{prefix}/{name}", np.asarray(leaf), global_step=step)

    def hparams(self, hparams: Mapping[str, Any], metric_tags: Iterable[str], *,
                completed: bool) -> None:
        """This run's hyperparameters and metric tags for the HPARAMS tab.

        Written into the run's own event file: tensorboardX's ``add_hparams`` would write them
        into a separate sub-run, giving two rows per run. The metric values are the run's own
        scalars under those tags. A run that did not complete gets no session-end record.
        """
        experiment, session_start, session_end = hparams_summaries(
            dict(hparams), {tag: 0.0 for tag in metric_tags})
        # The event file add_scalar writes to (as tensorboardX's own add_hparams uses it).
        for summary in (experiment, session_start, session_end)[:3 if completed else 2]:
            self.writer.file_writer.add_summary(summary)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NullLogger:
    """What processes other than 0 of a multi-process run log: nothing."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: None
