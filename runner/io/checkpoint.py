"""Flax-serialized TrainState checkpoints: written atomically, validated when loaded."""

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, TypeVar

import jax
import numpy as np
from flax import serialization

from runner.config.errors import RunnerError
from runner.config.schema import choice_value
from runner.io.files import write_atomic

State = TypeVar("State")
log = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"step_(\d+)\.msgpack")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step}.msgpack"


def save_checkpoint(ckpt_dir: Path, state, *, step: int, name: Optional[str] = None) -> Path:
    """Write ``to_bytes(state)`` to ``ckpt_dir/step_<step>.msgpack`` (or ``<name>.msgpack``)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"{name}.msgpack" if name else checkpoint_path(ckpt_dir, step)
    write_atomic(path, serialization.to_bytes(state))  # device -> host copy of the state
    return path


def list_checkpoints(ckpt_dir: Path) -> List[Tuple[int, Path]]:
    """The ``step_<N>.msgpack`` files of ``ckpt_dir`` as (N, path), oldest first."""
    found = [(int(m.group(1)), p) for p in Path(ckpt_dir).glob("step_*.msgpack")
             if (m := _STEP_FILE.fullmatch(p.name))]
    return sorted(found)


def prune_checkpoints(ckpt_dir: Path, keep: Optional[int]) -> None:
    """Delete all but the newest ``keep`` step checkpoints (None keeps all; best stays)."""
    if keep is not None:
        for _, path in list_checkpoints(ckpt_dir)[:-keep]:
            path.unlink()


def load_checkpoint(path: Path, template: State) -> State:
    """Restore a state shaped like ``template`` from ``path`` (msgpack; never executes code).

    Raises RunnerError naming the file when it cannot be read, is not a msgpack of this state's
    structure, holds arrays of other shapes or dtypes, or a step other than its name says.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunnerError(f"checkpoint {path}: cannot read ({err.strerror})") from None
    if not data:
        raise RunnerError(f"checkpoint {path}: empty file")
    try:
        restored = serialization.from_bytes(template, data)
    except Exception as err:  # msgpack and flax raise many types for bad bytes or structure
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunnerError(f"checkpoint {path}: does not match this run's state ({reason})") \
            from None
    # from_bytes takes arrays of any shape; a checkpoint of another model must not load.
    expected = jax.tree_util.tree_leaves_with_path(template)
    for (key, want), got in zip(expected, jax.tree.leaves(restored)):
        if _spec(want) != _spec(got):
            raise RunnerError(f"checkpoint {path}: does not match this run's state "
                              f"({jax.tree_util.keystr(key)} is {_spec(got)}, expected "
                              f"{_spec(want)})")
    named = _STEP_FILE.fullmatch(path.name)
    if named and int(named.group(1)) != int(restored.step):
        raise RunnerError(f"checkpoint {path}: holds step {int(restored.step)}, not "
                          f"{named.group(1)}")
    return restored


def restore_latest(ckpt_dir: Path, template: State) -> Tuple[Optional[State], Optional[Path]]:
    """The newest valid step checkpoint of ``ckpt_dir`` (the newer invalid ones skipped, each
    with a warning that names it and why), or (None, None) when there is none. Checkpoints
    none of which restores are a RunnerError naming the newest one's mismatch: a resume must
    not start over them from step 0."""
    found = list_checkpoints(ckpt_dir)
    errors: List[RunnerError] = []
    for _, path in reversed(found):
        try:
            restored = load_checkpoint(path, template)
        except RunnerError as err:
            errors.append(err)
            continue
        for err in errors:
            log.warning("skipping %s; falling back to an older checkpoint", err)
        return restored, path
    if errors:
        raise RunnerError(f"{errors[0]}; none of the {len(found)} checkpoint(s) in {ckpt_dir} "
                          f"fits this run's config, so nothing was resumed or written")
    return None, None


def _spec(leaf) -> str:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return f"{dtype}{list(np.shape(leaf))}"


def read_best(ckpt_dir: Path, *, metric: str, mode: Any) -> Optional[Dict[str, Any]]:
    """``best.json``: which state ``best.msgpack`` holds (step, metric, mode, value, path);
    None when there is none, or when another rule than ``eval/<metric>`` at ``mode`` (min,
    max) picked it (a run resumed with another trainer.best_metric or best_mode)."""
    try:
        best = json.loads((Path(ckpt_dir) / "best.json").read_text())
    except (OSError, ValueError):
        return None
    rule = (f"eval/{metric}", choice_value(mode))
    if not isinstance(best, dict) or (best.get("metric"), best.get("mode", rule[1])) != rule:
        return None
    return best


class Checkpointer:
    """A run's ``checkpoints/``: step files (the newest ``keep`` kept) and ``best.msgpack``,
    the state with the best ``eval/<metric>`` so far (recorded in ``best.json``)."""

    def __init__(self, ckpt_dir: Path, *, keep: Optional[int], metric: str, mode: str,
                 write: bool = True):
        """``write=False`` (processes other than 0) tracks the best but writes no file."""
        self.dir, self.keep, self.metric = Path(ckpt_dir), keep, metric
        self.mode, self.write = choice_value(mode), write
        # a resumed run keeps comparing against its earlier best, by the same rule
        self.best = read_best(self.dir, metric=metric, mode=self.mode)

    def save(self, state, step: int) -> Path:
        if not self.write:
            return checkpoint_path(self.dir, step)
        path = save_checkpoint(self.dir, state, step=step)
        prune_checkpoints(self.dir, self.keep)
        return path

    def consider(self, state, step: int, eval_metrics: dict) -> None:
        """Save ``state`` as best.msgpack if its eval metric beats the best so far."""
        if self.metric not in eval_metrics:
            raise RunnerError(f"trainer.best_metric={self.metric}: not an eval metric of this "
                              f"task; valid: {', '.join(sorted(eval_metrics))}")
        value = eval_metrics[self.metric]
        if self.best is not None and not (value < self.best["value"] if self.mode == "min"
                                          else value > self.best["value"]):
            return
        self.best = {"step": step, "metric": f"eval/{self.metric}", "mode": self.mode,
                     "value": value, "path": str(self.dir / "best.msgpack")}
        if self.write:
            save_checkpoint(self.dir, state, step=step, name="best")
            write_atomic(self.dir / "best.json",
                         (json.dumps(self.best, indent=2) + "\n").encode())
