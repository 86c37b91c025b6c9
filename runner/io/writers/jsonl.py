"""``logger=jsonl``: the run's scalars in ``metrics.jsonl``, one JSON object per logged step,
``{"step": 100, "eval/loss": 0.25, "train/loss": 0.31, ...}``, in step order. Grep reads it;
so does pandas: ``pandas.read_json("metrics.jsonl", lines=True)`` is a frame with a row per
step and a column per scalar. A non-finite value is written as JSON's usual extension
(``NaN``, ``Infinity``), which Python's ``json`` and pandas read back."""

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from runner.config.errors import WriteError
from runner.io.files import write_atomic
from runner.io.layout import RunPaths
from runner.io.writers.base import RunInfo

STEP = "step"


class JsonlWriter:
    """A line per step, written at each ``flush`` for the steps logged since. Values logged
    later for a step that has its line already (the run's ``perf/compile_s`` at its last step)
    join that line: the file is rewritten atomically with it. A resumed run first drops the
    lines after its checkpoint's step (and a line a kill cut short), atomically."""

    run_files = (RunPaths.JSONL,)

    def __init__(self, *, run: RunInfo):
        self.path = RunPaths(run.dir).jsonl
        self.pending: Dict[int, Dict[str, float]] = {}
        self.last_step: Optional[int] = None
        kept = [line for line in read_lines(self.path) if line[STEP] <= run.start_step]
        if kept or self.path.exists():
            self._rewrite(kept)
        if kept:
            self.last_step = kept[-1][STEP]

    def scalars(self, step: int, prefix: str, values: Mapping[str, float]) -> None:
        line = self.pending.setdefault(int(step), {})
        line.update({f"{prefix}/{name}": float(value) for name, value in values.items()})

    def flush(self) -> None:
        if not self.pending:
            return
        steps = sorted(self.pending)
        if self.last_step is not None and steps[0] <= self.last_step:
            self._merge_into_file()
            return
        self._append([_line(step, self.pending[step]) for step in steps])
        self.last_step = steps[-1]
        self.pending.clear()

    def close(self) -> None:
        self.flush()

    def _append(self, lines: List[Dict[str, float]]) -> None:
        try:
            with open(self.path, "a") as f:
                f.write("".join(_dumps(line) for line in lines))
        except OSError as err:
            raise WriteError(self.path, err) from err

    def _merge_into_file(self) -> None:
        """The pending values merged into the lines of their steps (new steps in order)."""
        lines = {line[STEP]: line for line in read_lines(self.path)}
        for step, values in self.pending.items():
            lines.setdefault(step, {STEP: step}).update(values)
        merged = [_line(step, lines[step]) for step in sorted(lines)]
        self._rewrite(merged)
        self.last_step = merged[-1][STEP]
        self.pending.clear()

    def _rewrite(self, lines: List[Dict[str, float]]) -> None:
        write_atomic(self.path, "".join(_dumps(line) for line in lines).encode())


def read_lines(path: Path) -> List[Dict[str, float]]:
    """The whole lines of a ``metrics.jsonl`` (none when there is no file): a last line that
    a kill cut short, or any line that is not a step's object, is left out. WriteError when
    the file cannot be read (nor so written)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    except OSError as err:  # the file the writer is to rewrite cannot be there
        raise WriteError(path, err) from err
    lines = []
    for raw in text.splitlines(keepends=True):
        try:
            line = json.loads(raw) if raw.endswith("\n") else None
        except ValueError:
            line = None
        if isinstance(line, dict) and isinstance(line.get(STEP), int):
            lines.append(line)
    return lines


def _line(step: int, values: Mapping[str, float]) -> Dict[str, float]:
    """``step`` first, then the values by name."""
    return {STEP: step, **{k: values[k] for k in sorted(values) if k != STEP}}


def _dumps(line: Mapping[str, float]) -> str:
    return json.dumps(line, allow_nan=True) + "\n"
