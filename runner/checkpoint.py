"""Flax-serialized TrainState checkpoints, written atomically."""

import os
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
from flax import serialization

from runner.errors import RunnerError

State = TypeVar("State")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step}.msgpack"


def save_checkpoint(ckpt_dir: Path, state, *, step: int) -> Path:
    """Write ``to_bytes(state)`` to ``ckpt_dir/step_<step>.msgpack``.

    The bytes go to a temporary file that is fsynced and then renamed over the final name, so
    a crash leaves either the previous file or the complete new one, never a partial one.
    """
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    tmp = path.with_name(f".{path.name}.tmp")
    data = serialization.to_bytes(state)  # device -> host transfer of the whole state
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: Path, template: State) -> State:
    """Restore a state shaped like ``template`` from ``path`` (msgpack; never executes code)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RunnerError(f"checkpoint {path}: cannot read ({err.strerror})") from None
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
    return restored


def _spec(leaf) -> str:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
    return f"{dtype}{list(np.shape(leaf))}"
