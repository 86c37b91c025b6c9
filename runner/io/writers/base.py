"""The metric writer interface: what runner calls on every sink of a run's metrics
(TensorBoard, ``metrics.jsonl``, MLflow, a user's own), and the composite that fans each call
out to the run's writers.

A writer is built from ``logger.<name>`` (``conf/logger/<name>.yaml``) by its ``_target_``,
called with that config's values and ``run=RunInfo(...)``: which run dir it writes for, the
step the run (re)starts at and, for a sweep's job, its sweep dir. A resumed run restarts at
its checkpoint's step, and every writer drops what the interrupted attempt wrote after it (or,
where the sink cannot, says what it does instead). A writer needs no base class: it has the
``MetricWriter`` methods and any of the optional ones below; runner asks for an optional one
only through these protocols (``isinstance``), so this list is the whole interface. Files it
writes into the run dir are named by its target's ``run_files`` (names relative to the run
dir): ``overwrite=true`` moves them aside with the run's own.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a writer is told of its run (the ``run`` keyword of its constructor)."""

    dir: Path  # the run dir: files go below it
    start_step: int  # 0, or the checkpoint step a resumed run restarts at
    sweep_dir: Optional[Path] = None  # a sweep job's sweep dir (its parent); None: a single run

    @property
    def name(self) -> str:
        """A sweep job's subdir (its job number), else the run dir's path."""
        return self.dir.name if self.sweep_dir is not None else str(self.dir)


@runtime_checkable
class MetricWriter(Protocol):
    """Required of every writer."""

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        """``<prefix>/<name>`` = value at ``step`` for each item (``train/loss``,
        ``eval/accuracy``, ``perf/steps_per_sec``). Called for a step once per prefix; the
        steps of one ``flush`` come in order, and later steps after it, except the run's
        ``perf/compile_s`` at its last step, once it ended."""

    def flush(self) -> None:
        """After each round of logging: make what was written so far visible."""

    def close(self) -> None:
        """The run ended (after ``hparams``): release the sink. Called however the run ends."""


@runtime_checkable
class WritesText(Protocol):
    def text(self, tag: str, text: str) -> None:
        """A text at no step: ``config`` (the resolved YAML), ``model_summary`` (the table)."""


@runtime_checkable
class WritesImages(Protocol):
    def images(self, step: int, prefix: str, images: Mapping[str, np.ndarray]) -> None:
        """The task's figures at ``step``: (H, W, 3) uint8 arrays named ``<prefix>/<name>``."""


@runtime_checkable
class WritesHistograms(Protocol):
    def histograms(self, step: int, prefix: str, tree: Any) -> None:
        """One histogram per array of a pytree (``trainer.log_histograms``)."""


@runtime_checkable
class WritesHparams(Protocol):
    def hparams(self, hparams: Mapping[str, Any], *, status: Optional[str]) -> None:
        """Once, as the run ends: its hyperparameters (``runner.run.hparams``: flat keys,
        bool/number/string values, and how it ended) and its ``metrics.json`` status
        (``completed``, ``pruned``, ``interrupted``, ``failed``)."""


class Writers:
    """The run's writers as one: each call goes to every writer that takes it. A write that
    fails raises at once (a WriteError names the file); ``close`` closes every writer, then
    raises the first failure."""

    def __init__(self, writers: Sequence[Any]):
        self.writers = list(writers)

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        self._each(MetricWriter, lambda w: w.scalars(step, prefix, values))

    def text(self, tag: str, text: str) -> None:
        self._each(WritesText, lambda w: w.text(tag, text))

    def images(self, step: int, prefix: str, images: Mapping[str, np.ndarray]) -> None:
        self._each(WritesImages, lambda w: w.images(step, prefix, images))

    def histograms(self, step: int, prefix: str, tree: Any) -> None:
        self._each(WritesHistograms, lambda w: w.histograms(step, prefix, tree))

    def hparams(self, hparams: Mapping[str, Any], *, status: Optional[str]) -> None:
        self._each(WritesHparams, lambda w: w.hparams(hparams, status=status))

    def flush(self) -> None:
        self._each(MetricWriter, lambda w: w.flush())

    def close(self) -> None:
        failed: Optional[BaseException] = None
        for writer in self.writers:
            try:
                writer.close()
            except Exception as err:  # noqa: BLE001 (the others still close; the first raises)
                failed = failed or err
        if failed is not None:
            raise failed

    def _each(self, kind: type, call: Callable[[Any], None]) -> None:
        for writer in self.writers:
            if isinstance(writer, kind):
                call(writer)
