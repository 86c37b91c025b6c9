"""``trainer.early_stop``: stop a run whose eval metric has stopped improving."""

import json
from pathlib import Path
from typing import List, Optional

from runner.io.files import write_atomic


class EarlyStop:
    """Counts evals in a row where ``eval/<trainer.best_metric>`` did not improve on its best
    by more than ``min_delta`` (in the direction of ``trainer.best_mode``); ``update`` says when
    ``patience`` of them have passed. Off when ``patience`` is null.

    The count survives a resume: each eval's (step, best, rounds) goes to ``path``
    (``checkpoints/early_stop.json``, written by process 0), back to the eval at or before the
    newest checkpoint, and a resumed run takes the one at or before the step it resumes from.
    """

    def __init__(self, trainer, *, path: Optional[Path], write: bool = True,
                 start_step: int = 0):
        self.patience = trainer.early_stop.patience
        self.min_delta = trainer.early_stop.min_delta
        self.sign = 1.0 if trainer.best_mode == "min" else -1.0  # BestMode is a str enum
        self.path = path if self.patience is not None else None
        self.write = write  # processes other than 0 read the record (on resume) but keep it
        self.best: Optional[float] = None
        self.rounds = 0
        self.evals: List[list] = []  # [step, best, rounds], from the newest checkpoint's on
        for step, best, rounds in self._recorded():
            if step <= start_step:
                self.best, self.rounds, self.evals = best, rounds, [[step, best, rounds]]

    def update(self, step: int, value: float) -> bool:
        """Record the eval at ``step``; whether the run should stop now."""
        if self.patience is None:
            return False
        if self.best is None or self.sign * (self.best - value) > self.min_delta:
            self.best, self.rounds = value, 0
        else:
            self.rounds += 1
        self.evals.append([step, self.best, self.rounds])
        self._write()
        return self.rounds >= self.patience

    def checkpointed(self, step: int) -> None:
        """A checkpoint at ``step`` exists: older evals are no longer needed to resume."""
        kept = [e for e in self.evals if e[0] <= step][-1:] + [e for e in self.evals
                                                                if e[0] > step]
        if kept != self.evals:
            self.evals = kept
            self._write()

    def _recorded(self) -> List[list]:
        try:
            return json.loads(self.path.read_text())["evals"] if self.path else []
        except (OSError, ValueError, KeyError):
            return []

    def _write(self) -> None:
        if self.path is not None and self.write:
            write_atomic(self.path, (json.dumps({"evals": self.evals}) + "\n").encode())
